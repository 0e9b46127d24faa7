"""The trainer: SP and DP give the single-process gradients and losses; export loads in plain transformers."""

import math

import pytest
import torch

from ringtrain.testing import run_distributed
from ringtrain.validate import load_validated_config

TINY = [
    "model.arch=llama",
    "model.config={vocab_size: 384, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}",
    "data.source=passkey", "data.num_samples=64", "data.passkey_min_tokens=90",
    "train.seq_len=128", "train.threads=1", "optim.lr=3e-3", "optim.warmup_steps=0", "logging.progress_bar=false",
]


def _cfg(tmp, *overrides):
    return load_validated_config(None, [*TINY, f"train.output_dir={tmp}", *overrides])


def _grads(mesh, cfg, n_micro):
    from ringtrain.train.trainer import build_trainer

    trainer = build_trainer(cfg, mesh)
    # Every rank takes the same full batches here (a DP slice would differ): compare like for like.
    micro = [trainer.loader.dataset.batch(list(range(i * 2, i * 2 + 2))) for i in range(n_micro)]
    loss = trainer.forward_backward(micro)
    grads = {}
    for name, p in trainer.model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().clone()
    return loss, grads


def _compare(ref, got, rtol):
    ref_loss, ref_g = ref
    loss, g = got
    assert math.isclose(loss, ref_loss, rel_tol=rtol), (loss, ref_loss)
    assert ref_g.keys() == g.keys()
    for name in ref_g:
        scale = ref_g[name].abs().max().item()
        err = (g[name] - ref_g[name]).abs().max().item()
        assert err <= rtol * max(scale, 1e-6), f"{name}: max err {err:.3e} vs max |grad| {scale:.3e}"


def test_sp_gradients_equal_single_process(tmp_path):
    """SP=2 and SP=4 (FSDP over the SP ranks, with and without activation checkpointing) == one process."""
    ref = run_distributed(_grads, 1, _cfg(tmp_path / "a", "train.fsdp=false"), 2, timeout=240)[0]
    assert all(g.abs().max() > 0 for g in ref[1].values())  # every parameter gets a gradient
    sp2 = run_distributed(_grads, 2, _cfg(tmp_path / "b", "parallel.sp_size=2"), 2, timeout=240)
    _compare(ref, sp2[0], 2e-4)
    _compare(ref, sp2[1], 2e-4)
    sp2_ac = run_distributed(_grads, 2, _cfg(tmp_path / "c", "parallel.sp_size=2", "train.activation_checkpointing=true",
                                             "train.offload_activations=true", "parallel.layout=contiguous"),
                             2, timeout=240)[0]
    _compare(ref, sp2_ac, 2e-4)
    sp4_nofsdp = run_distributed(_grads, 4, _cfg(tmp_path / "d", "parallel.sp_size=4", "train.fsdp=false"), 2,
                                 timeout=240)[0]
    _compare(ref, sp4_nofsdp, 2e-4)


def _recompute_counts(mesh, cfg):
    """(loss, grads, forward calls per decoder layer in one forward/backward)."""
    from ringtrain.model.causal_lm import decoder_layers
    from ringtrain.train.trainer import build_trainer

    trainer = build_trainer(cfg, mesh)
    calls = [0] * len(decoder_layers(trainer.lm))
    for i, layer in enumerate(decoder_layers(trainer.lm)):  # the MLP: a recomputed layer runs it twice
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    batch = [trainer.loader.dataset.batch([0, 1])]
    loss = trainer.forward_backward(batch)
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    return loss, grads, calls


def test_recompute_policies_are_exact_and_recompute_what_they_name(tmp_path):
    """Issue 14: 'every:2' recomputes layers 0 and 2 of 4 (two forwards each), 'full' all of them, 'none' none;
    losses and gradients are the same (fp32 rounding)."""
    four = ["train.fsdp=false", "model.config.num_hidden_layers=4"]
    runs = {policy: run_distributed(_recompute_counts, 1, _cfg(tmp_path / policy.replace(":", ""), *four,
                                                               f"train.activation_checkpointing={policy}"))[0]
            for policy in ("none", "every:2", "full")}
    assert runs["none"][2] == [1, 1, 1, 1]
    assert runs["every:2"][2] == [2, 1, 2, 1]
    assert runs["full"][2] == [2, 2, 2, 2]
    for policy in ("every:2", "full"):
        _compare(runs["none"][:2], runs[policy][:2], 1e-5)


def _losses(mesh, cfg):
    from ringtrain.train.trainer import build_trainer

    trainer = build_trainer(cfg, mesh)
    history = trainer.fit()
    return [h["loss"] for h in history]


@pytest.mark.parametrize("world,sp,overrides", [
    (2, 1, ["parallel.sp_size=1", "train.micro_batch_size=2"]),           # DP=2 x SP=1
    (2, 2, ["parallel.sp_size=2", "train.micro_batch_size=4"]),           # DP=1 x SP=2
    (1, 1, ["train.micro_batch_size=2", "train.grad_accum_steps=2"]),     # accumulation, one process
    (2, 2, ["parallel.sp_size=2", "train.micro_batch_size=2", "train.grad_accum_steps=2"]),
])
def test_loss_trajectory_matches_single_process(tmp_path, world, sp, overrides):
    """Same global batch of 4 sequences per step, any mesh or accumulation: the same losses."""
    common = ["train.max_steps=4", "checkpoint.export_final=false"]
    ref = run_distributed(_losses, 1, _cfg(tmp_path / "ref", *common, "train.micro_batch_size=4"), timeout=240)[0]
    got = run_distributed(_losses, world, _cfg(tmp_path / "got", *common, *overrides), sp_size=sp, timeout=240)[0]
    assert len(got) == len(ref) == 4
    assert ref[-1] < ref[0]  # it learns
    for a, b in zip(ref, got, strict=True):
        assert math.isclose(a, b, rel_tol=1e-4), (ref, got)


def test_ulysses_loss_trajectory_matches_the_ring(tmp_path):
    """Issue 13: sp_size=4 with U = 2 and U = 4 (2 KV heads: each travels twice) follow U = 1 for 8 steps."""
    common = ["train.max_steps=8", "checkpoint.export_final=false", "parallel.sp_size=4", "train.micro_batch_size=2"]
    runs = {u: run_distributed(_losses, 4, _cfg(tmp_path / f"u{u}", *common, f"parallel.ulysses_size={u}"),
                               ulysses_size=u, timeout=240)[0] for u in (1, 2, 4)}
    assert len(runs[1]) == 8 and runs[1][-1] < runs[1][0]
    for u in (2, 4):
        for a, b in zip(runs[1], runs[u], strict=True):
            assert math.isclose(a, b, rel_tol=1e-4), (u, runs[1], runs[u])


def _export_and_logits(mesh, cfg):
    from ringtrain.train.trainer import build_trainer

    trainer = build_trainer(cfg, mesh)
    trainer.fit()
    batch = trainer.loader.dataset.batch([0, 1])
    with torch.no_grad():
        logits = trainer.lm(input_ids=batch["input_ids"]).logits
    return batch["input_ids"], logits


def test_exported_model_loads_in_plain_transformers(tmp_path):
    ids, trainer_logits = run_distributed(
        _export_and_logits, 1, _cfg(tmp_path, "train.fsdp=false", "train.max_steps=3"), timeout=240)[0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final_model", attn_implementation="sdpa")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, trainer_logits, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "final_model" / "model.safetensors").exists()


def _export_sp2_run(mesh, cfg, sharded_dir):
    """Train SP=2 under FSDP, export twice (the run's final_model/, then in files of <= 40 kB), and load final_model/
    back shard by shard; returns the trained full weights (rank 0) and whether the reloaded shards are the trained
    ones."""
    import dataclasses
    from pathlib import Path

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ringtrain.model.build import build_model
    from ringtrain.train.trainer import build_trainer

    trainer = build_trainer(cfg, mesh)
    trainer.fit()
    trainer.export(sharded_dir, max_shard_bytes=40_000)
    full = get_model_state_dict(trainer.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    reload = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, arch=None, config={}, path=str(Path(cfg.train.output_dir) / "final_model")))
    lm = build_model(reload, mesh, "train").lm
    trained, loaded = trainer.lm.state_dict(), lm.state_dict()
    same = trained.keys() == loaded.keys() and all(torch.equal(trained[k].to_local(), loaded[k].to_local())
                                                   for k in trained)
    return full, same


def test_sharded_export_of_an_sp2_run_reloads_with_identical_logits(tmp_path):
    """Issue 15: no rank gathers the model to export it; the folder (one file, or several with an index) loads in
    plain transformers with the trained weights bit for bit, hence identical logits; and it loads back sharded."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = _cfg(tmp_path / "run", "parallel.sp_size=2", "train.max_steps=2", "model.config.tie_word_embeddings=true")
    results = run_distributed(_export_sp2_run, 2, cfg, tmp_path / "sharded", timeout=240)
    full = results[0][0]
    assert all(same for _, same in results)
    final, sharded = tmp_path / "run" / "final_model", tmp_path / "sharded"
    assert (final / "model.safetensors").exists() and not (final / "model.safetensors.index.json").exists()
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(weight_map.values())) == files
    assert not (sharded / "sharded").exists() and (sharded / "tokenizer_config.json").exists()
    assert "lm_head.weight" not in weight_map  # tied: saved once, as save_pretrained does

    ids = torch.randint(0, 384, (2, 40))
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(final), attn_implementation="sdpa")
    reference.load_state_dict(full)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        for folder in (final, sharded):
            model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
            assert model.lm_head.weight is model.model.embed_tokens.weight
            for key, tensor in model.state_dict().items():
                assert torch.equal(tensor, full[key]), (folder.name, key)
            assert torch.equal(model(input_ids=ids).logits, expected), folder.name


def _wandb_run_ids(mesh, cfg_first, cfg_second):
    from ringtrain.train.trainer import build_trainer

    first = build_trainer(cfg_first, mesh)
    first.fit()
    second = build_trainer(cfg_second, mesh)
    second.fit()
    return first.wandb_run_id, second.wandb_run_id, second.step


def test_wandb_offline_run_continues_after_resume(tmp_path):
    common = ["logging.wandb_mode=offline", "checkpoint.export_final=false", "checkpoint.every_steps=1"]
    first, second, step = run_distributed(
        _wandb_run_ids, 2, _cfg(tmp_path, *common, "train.max_steps=2", "parallel.sp_size=2"),
        _cfg(tmp_path, *common, "train.max_steps=3", "parallel.sp_size=2"), timeout=240)[0]
    assert first and first == second and step == 3
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(first) for r in runs)
    import json

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu", "tflops_per_gpu",
                "step_time_s", "seq_len", "peak_memory_gib"):
        assert all(math.isfinite(r[key]) and r[key] >= 0 for r in records), key
    assert "mfu" not in records[0]  # no known peak on CPU: no made-up MFU


def _nonfinite(mesh, cfg):
    from ringtrain.errors import RunStopped
    from ringtrain.train.trainer import build_trainer

    trainer = build_trainer(cfg, mesh)
    with torch.no_grad():
        trainer.lm.get_input_embeddings().weight.fill_(float("nan"))  # every token embeds to NaN
    before = {n: p.detach().clone() for n, p in trainer.lm.named_parameters()}
    try:
        record = trainer.train_step()
    except RunStopped as e:
        return str(e)
    unchanged = all(torch.equal(p, before[n]) or n.endswith("embed_tokens.weight")
                    for n, p in trainer.lm.named_parameters())
    return record["skipped"], unchanged, trainer.step


def test_nonfinite_loss_is_skipped_or_stops(tmp_path):
    skipped, unchanged, step = run_distributed(
        _nonfinite, 1, _cfg(tmp_path / "a", "train.fsdp=false", "train.on_nonfinite=skip"), timeout=240)[0]
    assert skipped == 1 and unchanged and step == 1
    message = run_distributed(
        _nonfinite, 1, _cfg(tmp_path / "b", "train.fsdp=false", "train.on_nonfinite=stop"), timeout=240)[0]
    assert message == ("step 1: non-finite loss (nan) and gradient norm (nan) (train.on_nonfinite=stop): lower "
                       "optim.lr, or set train.on_nonfinite=skip to skip such steps")
