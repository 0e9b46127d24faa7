"""Evaluation inside training (FSDP2 + SP=2) equals evaluating the saved checkpoint afterwards, and reaches the
training run's W&B dashboard (offline mode, read back from the run's files)."""

import dataclasses
import json

import pytest
from wandb_offline import read_offline_run

from ringtrain.testing import run_distributed
from ringtrain.validate import load_validated_config

TINY = [
    "model.arch=llama",
    "model.config={vocab_size: 384, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}",
    "data.num_samples=16", "train.seq_len=128", "train.micro_batch_size=2", "train.max_steps=2", "train.threads=1",
    "parallel.sp_size=2", "optim.lr=3e-3", "logging.progress_bar=false", "checkpoint.export_final=false",
    "eval.every_steps=2", "eval.tasks=[passkey,perplexity]", "eval.lengths=[100,130]", "eval.depths=[0.0,1.0]",
    "eval.samples_per_cell=2", "eval.ppl_path=ringtrain/data/samples/tiny.jsonl", "eval.ppl_max_tokens=300",
    "eval.ppl_lengths=[128]", "logging.wandb_mode=offline",
]


def _train_then_eval_checkpoint(mesh, cfg):
    from ringtrain.data import build_tokenizer
    from ringtrain.eval.entry import Evaluator, flat_metrics, load_model_for_eval
    from ringtrain.train.trainer import build_trainer

    history = build_trainer(cfg, mesh).fit()
    after = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, checkpoint="latest"))
    model, step = load_model_for_eval(after, mesh)
    return history, step, flat_metrics(Evaluator(after, build_tokenizer("bytes"), mesh).run(model.lm, fsdp_root=model))


def test_in_training_eval_matches_checkpoint_eval(tmp_path):
    cfg = load_validated_config(None, [*TINY, f"train.output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"])
    history, step, reloaded = run_distributed(_train_then_eval_checkpoint, 2, cfg, timeout=240)[0]
    assert "eval/passkey/acc" not in history[0]  # step 1: not an evaluation step
    during = history[1]
    assert step == 2
    for key in ("eval/passkey/acc", "eval_passkey/acc@100", "eval_passkey/acc@130"):
        assert during[key] == reloaded[key]
    # The FSDP-gathered weights during training are the checkpointed ones: same perplexity.
    assert during["eval/ppl@128"] == pytest.approx(reloaded["eval/ppl@128"], rel=1e-5)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[1]["eval/ppl@128"] == during["eval/ppl@128"]
    results = json.loads((tmp_path / "eval" / "step_00000002" / "results.json").read_text())
    assert results["step"] == 2 and results["perplexity"][0]["ppl"] == pytest.approx(during["eval/ppl@128"])
    # W&B: the step-2 row holds the training scalars, the evaluation scalars (grouped: eval/ headline, eval_<task>/
    # per length) and the media; the media files are the evaluation's own heatmap and numbers.
    run = read_offline_run(tmp_path)
    assert "eval/passkey/acc" not in run.row(1) and run.row(1)["loss"] == pytest.approx(history[0]["loss"])
    row = run.row(2)
    for key in ("loss", "eval/passkey/acc", "eval_passkey/acc@100", "eval_passkey/nll@130", "eval/ppl@128"):
        assert row[key] == pytest.approx(during[key], rel=1e-6), key
    heatmap = tmp_path / "eval" / "step_00000002" / "passkey_heatmap.png"
    assert row["eval_passkey/heatmap/_type"] == "image-file"
    assert run.media(row, "eval_passkey/heatmap").read_bytes() == heatmap.read_bytes()
    grid = results["retrieval"]["passkey"]
    table = run.table(row, "eval_passkey/grid")
    assert table["columns"] == ["length", "depth", "accuracy", "answer_nll"]
    assert table["data"] == [[n, d, grid["accuracy"][i][j], pytest.approx(grid["answer_nll"][i][j])]
                             for j, n in enumerate(grid["lengths"]) for i, d in enumerate(grid["depths"])]
    ppl = run.table(row, "eval/ppl_by_length_table")
    assert ppl["columns"][:1] == ["length"] and ppl["data"][0][0] == 128
    assert ppl["data"][0][-1] == pytest.approx(during["eval/ppl@128"])
    by_length = run.table(row, "eval/acc_by_length_table")
    assert by_length["data"] == [[n, "passkey", a] for n, a in zip(grid["lengths"], grid["accuracy_by_length"],
                                                                    strict=True)]
