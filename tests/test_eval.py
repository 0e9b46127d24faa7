"""Long-context evaluation: scorers on known answers, sliding windows, reports, config errors, SP == one process."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from wandb_offline import read_offline_run

from ringtrain.config import EvalConfig
from ringtrain.config.data import PASSKEY_TASKS
from ringtrain.config.eval import RETRIEVAL_EVAL_TASKS
from ringtrain.data import build_tokenizer
from ringtrain.errors import ConfigError
from ringtrain.eval import answer_token_hits, eval_documents, exact_match, sliding_windows
from ringtrain.eval.entry import Evaluator, load_model_for_eval
from ringtrain.eval.forward import evaluation_mode
from ringtrain.eval.retrieval import evaluate_retrieval
from ringtrain.eval.tasks import TASK_DOCUMENTS
from ringtrain.testing import run_distributed
from ringtrain.validate import load_validated_config

SAMPLE_TEXT = "ringtrain/data/samples/tiny.jsonl"


# ---- scorers on hand-made logits -------------------------------------------------------------------------------


def test_answer_token_hits_and_exact_match_on_known_logits():
    gen = torch.Generator().manual_seed(0)
    targets = torch.tensor([5, 7, 1, 3, 3, 0])
    logits = torch.randn(6, 10, generator=gen)
    logits[torch.arange(6), targets] = logits.max() + 1.0  # every target is the argmax
    logits[4, 9] = logits[4].max() + 0.5  # ... except token 4, where 9 wins
    hits, nll = answer_token_hits(logits, targets)
    assert hits.tolist() == [True, True, True, True, False, True]
    expected = -torch.log_softmax(logits.double(), dim=-1)[torch.arange(6), targets]
    torch.testing.assert_close(nll.double(), expected, rtol=1e-6, atol=1e-6)
    # Documents of 3, 2 and 1 answer tokens: all right / one wrong / none scored.
    correct, total = torch.tensor([3.0, 1.0, 0.0]), torch.tensor([3.0, 2.0, 0.0])
    assert exact_match(correct, total).tolist() == [True, False, False]


@pytest.mark.parametrize("n,window,stride", [(1000, 128, 64), (1000, 128, 127), (129, 128, 1), (50, 128, 64)])
def test_sliding_windows_score_every_token_once_with_enough_context(n, window, stride):
    scored = []
    for begin, end, first in sliding_windows(n, window, stride):
        assert 0 <= begin < first <= end <= n and end - begin <= window
        for pos in range(first, end):
            scored.append(pos)
            if begin > 0:
                assert pos - begin >= window - stride  # context inside the window
    assert scored == list(range(1, n))


def test_sliding_windows_reject_strides_that_skip_tokens():
    with pytest.raises(ValueError, match="stride=128 must be in 1..127"):
        sliding_windows(1000, 128, 128)


def test_eval_documents_keep_their_seeds_when_tasks_are_added():
    """A task's place in RETRIEVAL_EVAL_TASKS seeds its documents: the passkey and needle grids keep the documents
    they had before the RULER-style tasks existed (keys pinned from then), so earlier results stay comparable."""
    assert RETRIEVAL_EVAL_TASKS[:5] == ("passkey", "needle", "multikey", "multivalue", "variable_tracking")
    assert tuple(TASK_DOCUMENTS) == RETRIEVAL_EVAL_TASKS
    assert {source for source, _ in TASK_DOCUMENTS.values()} == set(PASSKEY_TASKS)  # every data task is evaluated
    tok = build_tokenizer("bytes")
    keys = [eval_documents(tok, t, [128], [0.5], 1, seed=1234, digits=5)[0].doc.key for t in ("passkey", "needle")]
    assert keys == ["69700", "41115"]


# ---- a fake model whose answers are known ---------------------------------------------------------------------


class _CopyDecoder(nn.Module):
    """An induction "model": predicts the token that followed the previous occurrence of the last `n` tokens
    (so it retrieves any pass key), optionally corrupting predicted digits to be always wrong."""

    def __init__(self, vocab: int, n: int, wrong: bool):
        super().__init__()
        self.vocab, self.n, self.wrong = vocab, n, wrong

    def forward(self, input_ids, position_ids=None, use_cache=False):
        out = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(input_ids.tolist()):
            text = "".join(map(chr, row))
            for t in range(self.n - 1, len(row)):
                j = text.rfind(text[t - self.n + 1:t + 1], 0, t)
                nxt = row[j + self.n] if j >= 0 else 0
                if self.wrong and ord("0") + 3 <= nxt <= ord("9") + 3:  # byte ids are utf-8 + 3
                    nxt = ord("0") + 3 + (nxt - ord("0") - 3 + 1) % 10
                out[b, t, nxt] = 1.0
        return (out,)


class _FakeLM(nn.Module):
    def __init__(self, wrong: bool):
        super().__init__()
        self.decoder = _CopyDecoder(384, 12, wrong)
        self.head = nn.Linear(384, 384, bias=False)
        self.head.weight.data = torch.eye(384)

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("mode", ["teacher_forced", "greedy"])
def test_retrieval_scores_a_retrieving_fake_right_and_a_corrupted_one_wrong(mode):
    tok = build_tokenizer("bytes")
    docs = eval_documents(tok, "passkey", [100, 150], [0.0, 0.5, 1.0], 2, seed=3, digits=5)
    docs += eval_documents(tok, "needle", [120], [0.25], 3, seed=3, digits=5)
    for wrong in (False, True):
        lm = _FakeLM(wrong)
        with evaluation_mode(lm):
            records = evaluate_retrieval(lm, tok, docs, batch_size=3, mode=mode)
        assert len(records) == len(docs)
        for r, d in zip(records, docs, strict=True):
            assert (r["length"], r["depth"], r["key"]) == (d.length, d.depth, d.doc.key)
            assert r["correct"] is (not wrong)
            assert (r["prediction"] == d.doc.key) is (not wrong)
            if mode == "teacher_forced" or not wrong:  # greedy continues a wrong digit off the needle's text
                assert len(r["prediction"]) == 5
            if mode == "teacher_forced":  # one-hot logits: the NLL of a right token is log(V - 1 + e) - 1
                right = math.log(383 + math.e) - 1
                assert r["answer_nll"] == pytest.approx(right if not wrong else right + 1, rel=1e-5)


class _OracleDecoder(nn.Module):
    """Knows the documents: at every position of a row that starts with a document's prompt it predicts (one-hot)
    that document's next token, in teacher-forced and greedy mode alike; `corrupt(doc)` -> answer slot to get wrong."""

    def __init__(self, docs, corrupt):
        super().__init__()
        self.docs, self.corrupt = docs, corrupt

    def forward(self, input_ids, position_ids=None, use_cache=False):
        out = torch.zeros(*input_ids.shape, 384)
        for b, row in enumerate(input_ids.tolist()):
            d = next(d.doc for d in self.docs if row[:len(d.doc.prompt_ids)] == d.doc.prompt_ids)
            target = list(d.input_ids)
            slot = self.corrupt(d)
            if slot is not None:
                pos = d.answer_token_span[0] + slot
                target[pos] = (target[pos] + 1) % 384
            for t in range(min(len(row), len(target)) - 1):
                out[b, t, target[t + 1]] = 1.0
        return (out,)


@pytest.mark.parametrize("mode", ["teacher_forced", "greedy"])
def test_multi_needle_tasks_score_every_answer_token(mode):
    """multikey / multivalue / variable_tracking: one-hot oracle logits retrieve every answer; one wrong token
    anywhere in a multi-part answer (here: the last value / variable, or the first digit) fails exact match."""
    tok = build_tokenizer("bytes")
    docs = [d for task in ("multikey", "multivalue", "variable_tracking")
            for d in eval_documents(tok, task, [112, 160], [0.0, 1.0], 2, seed=5, digits=5)]
    right = math.log(383 + math.e) - 1  # one-hot logits over 384 ids: NLL of the argmax target
    for corrupt in (lambda doc: None, lambda doc: len(doc.input_ids) - doc.answer_token_span[0] - 1, lambda doc: 0):
        lm = _FakeLM(False)
        lm.decoder = _OracleDecoder(docs, corrupt)
        with evaluation_mode(lm):
            records = evaluate_retrieval(lm, tok, docs, batch_size=3, mode=mode)
        for r, d in zip(records, docs, strict=True):
            n_answer = d.doc.answer_token_span[1] - d.doc.answer_token_span[0]
            wrong = corrupt(d.doc) is not None
            assert (r["task"], r["key"], r["correct"]) == (d.task, d.doc.key, not wrong)
            if not wrong:
                assert r["prediction"] == d.doc.key
            if mode == "teacher_forced":
                assert r["answer_nll"] == pytest.approx(right + wrong / n_answer, rel=1e-5)


# ---- config validation ----------------------------------------------------------------------------------------


def test_eval_config_messages_name_field_value_and_fix():
    with pytest.raises(ConfigError) as e:
        load_validated_config(None, ["model.arch=llama", "train.output_dir=x", "eval.tasks=[passkey,needel]",
                           "eval.mode=beam", "eval.depths=[0.5,1.5]", "eval.batch_size=0", "eval.ppl_stride=-1",
                           "eval.lengths=[]"])
    text = "\n".join(e.value.problems)
    assert ("eval.tasks=['passkey', 'needel'] must be a non-empty list of passkey, needle, multikey, multivalue, "
            "variable_tracking, perplexity") in text
    assert "eval.mode='beam' is not one of teacher_forced, greedy" in text
    assert "eval.depths=[0.5, 1.5] must lie in [0, 1]" in text
    assert "eval.batch_size=0 must be >= 1" in text
    assert "eval.ppl_stride=-1 must be >= 1 token" in text
    assert "eval.lengths=[] must be a non-empty list" in text
    problems = dict(EvalConfig(tasks=["perplexity"])._validate())
    assert problems["ppl_path"].startswith("ppl_path is empty but tasks includes perplexity: set eval.ppl_path")
    with pytest.raises(ConfigError, match=r"eval.lengths=\[50, 200\] has lengths shorter than a 5-digit passkey "
                                          r"document \(79 tokens"):
        eval_documents(build_tokenizer("bytes"), "passkey", [50, 200], [0.5], 1, seed=0, digits=5)


def test_cli_eval_config_error_exits_2(capsys):
    from ringtrain.cli import main

    assert main(["eval", "configs/tiny_cpu.yaml", "eval.tasks=[perplexity]"]) == 2
    assert "error: eval.ppl_path is empty" in capsys.readouterr().err


# ---- SP and DP give the single-process scores and perplexity --------------------------------------------------

TINY = [
    "model.arch=llama",
    "model.config={vocab_size: 384, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512}",
    "train.threads=1", "train.seed=7",
    "eval.tasks=[passkey,needle,multikey,multivalue,variable_tracking,perplexity]", "eval.lengths=[118,150]",
    "eval.depths=[0.0,0.5,1.0]",
    "eval.samples_per_cell=3", "eval.batch_size=2", f"eval.ppl_path={SAMPLE_TEXT}", "eval.ppl_max_tokens=700",
    "eval.ppl_lengths=[128,250]",
]


def _evaluate(dims, cfg):
    model, _ = load_model_for_eval(cfg, dims)
    if dims is not None:  # built as training builds it: FSDP2 (train.fsdp defaults to true) over every rank
        from torch.distributed.fsdp import FSDPModule

        assert isinstance(model, FSDPModule)
    return Evaluator(cfg, build_tokenizer("bytes"), dims).run(model.lm, fsdp_root=model)


def _assert_same_results(ref, got):
    docs_ref, docs_got = ref["documents"], got["documents"]
    assert [(d["task"], d["length"], d["depth"], d["sample"]) for d in docs_got] == \
           [(d["task"], d["length"], d["depth"], d["sample"]) for d in docs_ref]
    for a, b in zip(docs_ref, docs_got, strict=True):
        assert (a["prediction"], a["correct"]) == (b["prediction"], b["correct"])
        assert b["answer_nll"] == pytest.approx(a["answer_nll"], rel=1e-4)
    assert got["retrieval"] == ref["retrieval"] or all(
        got["retrieval"][t]["accuracy"] == ref["retrieval"][t]["accuracy"] for t in ref["retrieval"])
    assert [p["tokens"] for p in got["perplexity"]] == [p["tokens"] for p in ref["perplexity"]]
    for a, b in zip(ref["perplexity"], got["perplexity"], strict=True):
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5)


def test_sp_and_dp_evaluation_equal_single_process(tmp_path):
    """dp=2 x sp=2 ring evaluation == one process with sdpa: same predictions, NLL and perplexity (rel 1e-4/1e-5).

    Every retrieval task (the multi-needle ones have answers of several values or names). Lengths 118 and 150 are not
    multiples of 2 x sp_size: the right padding added for sharding must not change anything. A random model scores
    ~0 exact match, so the predicted tokens themselves are compared."""
    cfg = load_validated_config(None, [*TINY, f"train.output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"])
    ref = _evaluate(None, cfg)
    assert len(ref["documents"]) == 5 * 2 * 3 * 3
    assert ref["perplexity"][0]["tokens"] == ref["perplexity"][1]["tokens"] == 699
    assert 50 < ref["perplexity"][0]["ppl"] < 1000  # random init over 384 ids
    sp_cfg = load_validated_config(None, [*TINY, f"train.output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
                                "parallel.sp_size=2"])
    got = run_distributed(_evaluate, 4, sp_cfg, sp_size=2, timeout=240)  # dp 2 x sp 2, FSDP over all 4
    got += run_distributed(_evaluate, 2, sp_cfg, sp_size=2, timeout=240)  # world 2, FSDP over the SP ranks
    for rank_result in got:
        _assert_same_results(ref, rank_result)


# ---- `ringtrain eval` end to end: a saved model folder -> table, results.json, heatmap PNG, W&B ---------------


def test_cli_eval_writes_table_json_and_heatmap(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 max_position_embeddings=256)).save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "ringtrain.cli", "eval", "configs/tiny_cpu.yaml", "model.arch=null", "model.config={}",
         f"model.path={tmp_path / 'model'}", "parallel.sp_size=1", f"eval.output_dir={out}",
         "eval.lengths=[100,200]", "eval.depths=[0.0,1.0]", "eval.samples_per_cell=2", "train.threads=1",
         "logging.wandb_mode=offline"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "passkey exact match" in proc.stdout and "     100     200" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    grid = results["retrieval"]["passkey"]
    assert grid["lengths"] == [100, 200] and grid["depths"] == [0.0, 1.0]
    assert len(results["documents"]) == 8
    png = (out / "passkey_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["eval_passkey/acc@100"] == grid["accuracy_by_length"][0]
    assert metrics[-1]["eval_passkey/nll@200"] == pytest.approx(sum(row[1] for row in grid["answer_nll"]) / 2)
    run = read_offline_run(out)  # W&B: the same scalars, the heatmap and the grid in one row
    row = run.row(0)
    assert row["eval_passkey/acc@100"] == grid["accuracy_by_length"][0] and "loss" not in row
    assert run.media(row, "eval_passkey/heatmap").read_bytes() == png
    assert [r[2] for r in run.table(row, "eval_passkey/grid")["data"]] == [grid["accuracy"][i][j] for j in range(2)
                                                                           for i in range(2)]


def test_a_rank_failing_alone_ends_the_evaluation_without_waiting_for_the_timeout(tmp_path):
    """Rank 1 raises while rank 0 evaluates: the job ends in seconds with rank 1's error, not after
    parallel.timeout_s (a barrier in a `finally` had the failing rank wait for peers stuck in a collective)."""
    script = tmp_path / "one_rank_fails.py"
    script.write_text(
        "import os, sys\n"
        "from ringtrain.validate import load_validated_config\n"
        "from ringtrain.eval import entry\n"
        "if os.environ['RANK'] == '1':\n"
        "    def broken(self, lm, step=None, fsdp_root=None):\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    entry.Evaluator.run = broken\n"
        "entry.run_eval(load_validated_config(None, sys.argv[1:]))\n")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *TINY,
         "eval.tasks=[passkey]", "eval.lengths=[118]", "parallel.sp_size=2", "parallel.timeout_s=300",
         f"train.output_dir={tmp_path}", f"eval.output_dir={tmp_path / 'eval'}", "logging.wandb_mode=disabled"],
        capture_output=True, text=True, timeout=200,
    )
    assert proc.returncode != 0 and "injected failure on rank 1" in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 120, "waited for the collective timeout"
