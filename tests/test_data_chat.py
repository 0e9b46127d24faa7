"""Chat and instruction data: loss masks equal the assistant spans of real chat templates (also sharded at SP=2 with
the balanced layout), the instruction format, the over-long policy, and bad records refused one line each."""

from __future__ import annotations

import json
import os

import pytest
import torch
from chat_tokenizers import save_chat_tokenizer

from ringtrain.config import DataConfig
from ringtrain.data.files import SAMPLES
from ringtrain.errors import ConfigError
from ringtrain.model.loss import IGNORE_INDEX
from ringtrain.testing import run_distributed

CHAT = os.path.join(SAMPLES, "chat.jsonl")
INSTRUCTION = os.path.join(SAMPLES, "instruction.jsonl")
# What each family's template puts around an assistant turn's content, written out here (not derived from the
# code under test): the loss covers content and the end-of-turn text.
TURN_END = {"qwen2": "<|im_end|>\n", "llama3": "<|eot_id|>"}


def _packed(tmp_path, tokenizer: str, seq_len: int, **keys):
    from ringtrain.data import build_tokenizer
    from ringtrain.data.pipeline import build_packed_dataset

    cfg = DataConfig(source="files", path=keys.pop("path", CHAT), format=keys.pop("format", "chat"),
                     tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"), **keys)
    return build_packed_dataset(cfg, seq_len, build_tokenizer(tokenizer))


def _expected(tok, family: str, path: str = CHAT) -> dict[str, list[str]]:
    """rendered conversation -> the texts that must carry loss, in order."""
    out = {}
    for line in open(path):
        messages = json.loads(line)["messages"]
        text = tok.apply_chat_template(messages, tokenize=False)
        out[text] = [m["content"].strip() + TURN_END[family] for m in messages if m["role"] == "assistant"]
    return out


def _loss_runs(tok, ids: list[int], valid: list[bool]) -> list[str]:
    runs, cur = [], []
    for i, v in zip(ids, valid, strict=True):
        if v:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def _check_documents(tok, family, batch, valid_of_token, expected) -> int:
    """Every packed document is a rendered conversation whose loss-bearing tokens are exactly its assistant turns."""
    checked = 0
    for row in range(batch["input_ids"].shape[0]):
        ids, docs = batch["input_ids"][row], batch["document_ids"][row]
        real = batch["attention_mask"][row].bool()
        for d in docs[real].unique().tolist():
            where = (docs == d) & real
            tokens = ids[where].tolist()
            assert tokens[-1] == tok.eos_token_id
            text = tok.decode(tokens[:-1])
            assert text in expected, text[:120]
            assert _loss_runs(tok, tokens, valid_of_token[row][where].tolist()) == expected[text]
            checked += 1
    return checked


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_loss_mask_equals_assistant_spans_of_a_real_template(tmp_path, family, caplog):
    from ringtrain.data import build_tokenizer

    folder = save_chat_tokenizer(family, tmp_path / family)
    tok = build_tokenizer(folder)
    with caplog.at_level("WARNING"):
        packed = _packed(tmp_path, folder, 512)
    assert not [m for m in caplog.messages if "cross an assistant turn's boundary" in m]  # no token straddles
    batch = packed.batch(range(len(packed)))
    valid = batch["labels"] != IGNORE_INDEX
    assert _check_documents(tok, family, batch, valid, _expected(tok, family)) == 24


def _shard_labels(mesh, folder, cache):
    """Sharded next-token labels at SP=2 with the balanced layout, gathered back to the full sequence."""
    from ringtrain.data import build_tokenizer
    from ringtrain.data.pipeline import build_packed_dataset
    from ringtrain.hf import shard_batch
    from ringtrain.ring.layout import NAMED_LAYOUTS

    cfg = DataConfig(source="files", path=CHAT, format="chat", tokenizer=folder, cache_dir=cache)
    packed = build_packed_dataset(cfg, 256, build_tokenizer(folder), mesh)
    batch = packed.batch(range(len(packed)))
    sp = mesh.sp.with_layout(NAMED_LAYOUTS["balanced"])
    local = shard_batch(batch, sp)
    per_batch = sp.for_documents(local["documents"])
    assert per_batch.layout is not sp.layout  # a permutation chosen from this batch's documents
    return batch, per_batch.unshard(local["shift_labels"]), local["shift_labels"].shape[1]


def test_assistant_spans_survive_sp2_balanced_sharding(tmp_path):
    from ringtrain.data import build_tokenizer
    from ringtrain.hf import shard_batch

    folder = save_chat_tokenizer("qwen2", tmp_path / "qwen2")
    tok = build_tokenizer(folder)
    results = run_distributed(_shard_labels, 2, folder, str(tmp_path / "cache"), sp_size=2, timeout=120)
    batch, gathered, local_len = results[0]
    assert local_len == 128
    reference = shard_batch(batch)["shift_labels"]  # one process: the labels shifted, nothing sharded
    for _, labels, _ in results:
        assert torch.equal(labels, reference)
    # shift_labels[t] is the target of position t, i.e. token t + 1: valid exactly where token t + 1 carries loss.
    valid_of_token = torch.zeros_like(reference, dtype=torch.bool)
    valid_of_token[:, 1:] = reference[:, :-1] != IGNORE_INDEX
    assert torch.equal(reference[:, :-1][valid_of_token[:, 1:]], batch["input_ids"][:, 1:][valid_of_token[:, 1:]])
    assert _check_documents(tok, "qwen2", batch, valid_of_token, _expected(tok, "qwen2")) == 24


def test_byte_tokenizer_chat_and_instruction(tmp_path):
    from ringtrain.data import build_tokenizer

    tok = build_tokenizer("bytes")
    packed = _packed(tmp_path, "bytes", 1024)
    batch = packed.batch(range(len(packed)))
    expected = {}
    for line in open(CHAT):
        messages = json.loads(line)["messages"]
        text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)  # the shipped template
        expected[text] = [m["content"] + "<|end|>\n" for m in messages if m["role"] == "assistant"]
    valid = batch["labels"] != IGNORE_INDEX
    n = 0
    for row in range(len(packed)):
        docs, ids = batch["document_ids"][row], batch["input_ids"][row]
        for d in docs[batch["attention_mask"][row].bool()].unique().tolist():
            where = docs == d
            tokens = ids[where].tolist()
            text = bytes(t - 3 for t in tokens[:-1]).decode()
            runs = [bytes(t - 3 for t in r).decode() for r in _runs(tokens, valid[row][where].tolist())]
            assert runs == expected[text]
            n += 1
    assert n == 24

    packed = _packed(tmp_path, "bytes", 256, path=INSTRUCTION, format="instruction")
    batch = packed.batch(range(len(packed)))
    valid = batch["labels"] != IGNORE_INDEX
    records = {r["prompt"] + r["completion"]: r["completion"] for r in map(json.loads, open(INSTRUCTION))}
    n = 0
    for row in range(len(packed)):
        docs, ids = batch["document_ids"][row], batch["input_ids"][row]
        for d in docs[batch["attention_mask"][row].bool()].unique().tolist():
            tokens = ids[docs == d].tolist()
            mask = valid[row][docs == d].tolist()
            completion = records[bytes(t - 3 for t in tokens[:-1]).decode()]
            # loss on the completion and the EOS after it (where the model learns to stop)
            assert [t - 3 for t, m in zip(tokens[:-1], mask[:-1], strict=True) if m] == list(completion.encode())
            assert mask[-1] and tokens[-1] == tok.eos_token_id
            n += 1
    assert n == 24


def _runs(tokens, valid):
    runs, cur = [], []
    for t, v in zip(tokens, valid, strict=True):
        if v:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_overlong_records_are_dropped_and_counted_or_refused(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        packed = _packed(tmp_path, "bytes", 400)
    dropped = [r for r in caplog.messages if "longer than train.seq_len=400" in r]
    assert len(dropped) == 1 and "dropped (data.overlong=drop), never cut" in dropped[0]
    n_dropped = int(dropped[0].split(" of ")[0].split()[-1])
    assert 0 < n_dropped < 24 and packed.num_documents == 24 - n_dropped
    with pytest.raises(ConfigError, match=r"records are longer than a sequence \(train.seq_len=400.*data.overlong"):
        _packed(tmp_path, "bytes", 400, overlong="error")


def test_bad_chat_records_are_counted_one_line_each(tmp_path):
    rows = [json.loads(line) for line in open(CHAT)]
    rows[3]["messages"][1]["role"] = "bot"
    rows[9]["messages"][0]["role"] = "bot"
    del rows[5]["messages"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError) as err:
        _packed(tmp_path, "bytes", 1024, path=str(bad))
    assert err.value.problems == [
        f"data.path='{bad}': 2 of 24 records have a message with role 'bot', not one of system, user, assistant, tool "
        "(record 3 first, counting from 0): fix or remove them",
        f"data.path='{bad}': 1 of 24 records have no 'messages' field (record 5 first, counting from 0): fix or "
        "remove them",
    ]
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(save_chat_tokenizer("qwen2", tmp_path / "qwen2"))
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "plain")  # a base model's tokenizer: no template
    with pytest.raises(ConfigError, match=r"data.format='chat' needs a chat template, and data.tokenizer=.* has none"):
        _packed(tmp_path, str(tmp_path / "plain"), 1024)


def test_records_a_template_refuses_are_counted(tmp_path):
    """Templates that raise (Mistral-style alternation checks) make a record problem, not a traceback."""
    template = tmp_path / "alternating.jinja"
    template.write_text(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    with pytest.raises(ConfigError) as err:  # every sample conversation with a system prompt breaks alternation
        _packed(tmp_path, "bytes", 1024, chat_template=str(template))
    assert err.value.problems == [
        f"data.path='{CHAT}': 16 of 24 records are refused by the chat template (Conversation roles must alternate "
        "user/assistant/user/assistant/...) (record 0 first, counting from 0): fix or remove them"]
