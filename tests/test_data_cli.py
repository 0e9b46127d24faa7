"""`ringtrain data`: the first packed sequences with exact loss spans, per-source counts, and bad data as one line
each with exit 2."""

from __future__ import annotations

import json
import os

from ringtrain.cli import main
from ringtrain.data.files import SAMPLES

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIG = os.path.join(ROOT, "configs", "tiny_chat.yaml")
CHAT = os.path.join(SAMPLES, "chat.jsonl")


def _run(tmp_path, *args):
    return main(["data", CONFIG, f"train.output_dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache", *args])


def test_data_view_marks_exactly_the_loss_tokens(tmp_path, capsys):
    report = tmp_path / "data.json"
    assert _run(tmp_path, "--show", "3", "--samples", "40", "--json", str(report)) == 0
    out = capsys.readouterr().out
    assert out.count("--- sequence ") == 3 and "[[" in out
    data = json.loads(report.read_text())
    expected = set()
    for line in open(CHAT):
        expected |= {m["content"] + "<|end|>\n" for m in json.loads(line)["messages"] if m["role"] == "assistant"}
    completions = {r["completion"] + "</s>" for r in map(json.loads, open(os.path.join(SAMPLES, "instruction.jsonl")))}
    assert len(data["samples"]) == 3
    for sample in data["samples"]:
        text, spans, docs = sample["text"], sample["loss_spans"], sample["document_ids"]
        assert len(docs) == len(text.encode()) - 3 * text.count("</s>")  # a token per byte (ASCII), EOS shown as </s>
        pieces = [text[a:b] for a, b in spans]
        assert all(p in expected or p in completions for p in pieces), [p for p in pieces if p not in expected]
        # Nothing else carries loss: every assistant turn and completion of the sequence is one span.
        documents = text.split("</s>")[:-1]
        turns = sum(d.count("<|assistant|>\n") for d in documents)
        instructions = sum(not d.startswith("<|") for d in documents)
        assert len(spans) == turns + instructions
    sources = data["sources"]
    assert set(sources) == {"chat", "instruction"}
    assert all(s["samples"] > 0 and s["tokens"] > 0 for s in sources.values())
    assert sources["chat"]["samples"] > 2 * sources["instruction"]["samples"]  # weights 3:1


def test_bad_data_is_one_line_each_exit_2(tmp_path, capsys):
    rows = [json.loads(line) for line in open(CHAT)]
    rows[2]["messages"][0]["role"] = "narrator"
    del rows[7]["messages"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one_source = [f"data.sources=[{{path: {bad}, format: chat}}]"]
    assert _run(tmp_path, *one_source) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert err == [
        f"error: data.path='{bad}': 1 of 24 records have a message with role 'narrator', not one of system, user, "
        "assistant, tool (record 2 first, counting from 0): fix or remove them",
        f"error: data.path='{bad}': 1 of 24 records have no 'messages' field (record 7 first, counting from 0): fix or "
        "remove them",
    ]
    # No record has the field: found before loading, by the file check.
    nothing = tmp_path / "nothing.jsonl"
    nothing.write_text('{"text": "hello"}\n')
    assert _run(tmp_path, f"data.sources=[{{path: {nothing}, format: chat}}]") == 2
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")] == [
        f"error: data.sources[0] ({nothing}): data.messages_field='messages' is not in any of the first 100 records of "
        f"{nothing}: choose one of text, or leave the file out of data.path"]


def test_template_less_tokenizer_with_chat_is_one_line_exit_2(tmp_path, capsys):
    from chat_tokenizers import save_chat_tokenizer

    folder = tmp_path / "base"
    save_chat_tokenizer("qwen2", folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)  # a base model's tokenizer: no template
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert _run(tmp_path, f"data.tokenizer={folder}", f"data.sources=[{{path: {CHAT}, format: chat}}]") == 2
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")] == [
        f"error: data.format='chat' needs a chat template, and data.tokenizer='{folder}' has none: set "
        "data.chat_template to a Jinja template file, or use a tokenizer that ships one (an instruct model's)"]
    # ringtrain validate finds it too, before anything is built.
    assert main(["validate", CONFIG, f"train.output_dir={tmp_path}/run", f"data.tokenizer={folder}",
                 f"data.sources=[{{path: {CHAT}, format: chat}}]"]) == 2
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")] == [
        f"error: data.format='chat' needs a chat template, and data.tokenizer='{folder}' has none: set "
        "data.chat_template to a Jinja template file, or use a tokenizer that ships one (an instruct model's)"]
