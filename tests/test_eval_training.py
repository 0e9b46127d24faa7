"""Evaluation inside training (FSDP2 + SP=2) equals evaluating the saved checkpoint afterwards."""

import dataclasses
import json

import pytest

from ringtrain.config import load_config
from ringtrain.testing import run_distributed

TINY = [
    "model.arch=llama",
    "model.config={vocab_size: 384, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}",
    "data.num_samples=16", "train.seq_len=128", "train.micro_batch_size=2", "train.max_steps=2", "train.threads=1",
    "parallel.sp_size=2", "optim.lr=3e-3", "logging.progress_bar=false", "checkpoint.export_final=false",
    "eval.every_steps=2", "eval.tasks=[passkey,perplexity]", "eval.lengths=[100,130]", "eval.depths=[0.0,1.0]",
    "eval.samples_per_cell=2", "eval.ppl_path=ringtrain/data/samples/tiny.jsonl", "eval.ppl_max_tokens=300",
    "eval.ppl_lengths=[128]", "eval.heatmap=false",
]


def _train_then_eval_checkpoint(mesh, cfg):
    from ringtrain.data import build_tokenizer
    from ringtrain.eval.runner import Evaluator, flat_metrics, load_model_for_eval
    from ringtrain.trainer import build_trainer

    history = build_trainer(cfg, mesh).fit()
    after = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, checkpoint="latest"))
    lm, step = load_model_for_eval(after, mesh)
    return history, step, flat_metrics(Evaluator(after, build_tokenizer("bytes"), mesh).run(lm))


def test_in_training_eval_matches_checkpoint_eval(tmp_path):
    cfg = load_config(None, [*TINY, f"train.output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"])
    history, step, reloaded = run_distributed(_train_then_eval_checkpoint, 2, cfg, timeout=240)[0]
    assert "eval/passkey/acc" not in history[0]  # step 1: not an evaluation step
    during = history[1]
    assert step == 2
    for key in ("eval/passkey/acc", "eval/passkey/acc@100", "eval/passkey/acc@130"):
        assert during[key] == reloaded[key]
    # The FSDP-gathered weights during training are the checkpointed ones: same perplexity.
    assert during["eval/ppl@128"] == pytest.approx(reloaded["eval/ppl@128"], rel=1e-5)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[1]["eval/ppl@128"] == during["eval/ppl@128"]
    results = json.loads((tmp_path / "eval" / "step_00000002" / "results.json").read_text())
    assert results["step"] == 2 and results["perplexity"][0]["ppl"] == pytest.approx(during["eval/ppl@128"])
