"""LoRA through peft: the same training at SP=1, SP=2 (ring) and SP=2 (Ulysses); gradients only where training is;
adapter checkpoints; the exported adapter and merged model reproduce the trained logits in a fresh process; bad
inputs are one line each."""

import math
from pathlib import Path

from ringtrain.testing import run_distributed
from ringtrain.validate import load_validated_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.arch=llama",
    "model.config={vocab_size: 384, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}",
    "data.source=passkey", "data.num_samples=32", "data.passkey_min_tokens=90", "train.micro_batch_size=2",
    "train.seq_len=128", "train.threads=1", "optim.lr=3e-3", "optim.warmup_steps=0", "logging.progress_bar=false",
    "peft.method=lora", "peft.r=4", "peft.alpha=8", "checkpoint.export_final=false",
]
STEPS = 5


def _cfg(tmp, *overrides):
    return load_validated_config(None, [*TINY, f"train.output_dir={tmp}", *overrides])


def _is_trained(name: str) -> bool:
    """Adapters, the token embeddings and the norms (the default peft.trainable_modules)."""
    return ".lora_A." in name or ".lora_B." in name or "embed_tokens" in name or "norm" in name


def _train(dims, cfg):
    """(losses of STEPS steps, the first step's gradients of every parameter by name: None where there is none)."""
    from ringtrain.train.trainer import build_trainer

    trainer = build_trainer(cfg, dims)
    grads = {}

    def snapshot(*_):
        if not grads:
            for name, p in trainer.model.named_parameters():
                g = p.grad
                grads[name] = None if g is None else (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()

    trainer.optimizer.register_step_pre_hook(snapshot)
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    n_state = len(trainer.optimizer.state)  # parameters holding AdamW moments
    return losses, grads, n_state


def _ring_and_ulysses(dims, cfg_ring, cfg_ulysses):
    from ringtrain.config import ParallelConfig
    from ringtrain.parallel import ParallelDims

    ring = _train(dims, cfg_ring)
    ulysses = _train(ParallelDims.build(ParallelConfig(sp_size=2, ulysses_size=2), device=dims.device), cfg_ulysses)
    return ring, ulysses


def _compare(ref, got, rtol):
    (ref_losses, ref_grads, _), (losses, grads, _) = ref, got
    for a, b in zip(ref_losses, losses, strict=True):
        assert math.isclose(a, b, rel_tol=rtol), (ref_losses, losses)
    assert ref_grads.keys() == grads.keys()
    for name, g in ref_grads.items():
        assert (g is None) == (grads[name] is None), name
        if g is not None:
            err, scale = (grads[name] - g).abs().max().item(), g.abs().max().item()
            assert err <= rtol * max(scale, 1e-6), f"{name}: max err {err:.3e} vs max |grad| {scale:.3e}"


def test_lora_sp_ring_ulysses_equal_single_process(tmp_path):
    """5 steps of LoRA at SP=1, SP=2 ring and SP=2 Ulysses (FSDP2 over the SP ranks): the same losses and adapter
    gradients; gradients and optimizer state only on the adapters, embeddings and norms."""
    ref = run_distributed(_train, 1, _cfg(tmp_path / "a", "train.fsdp=false"), timeout=240)[0]
    losses, grads, n_state = ref
    assert losses[-1] < losses[0]  # it trains
    for name, g in grads.items():
        assert (g is not None) == _is_trained(name), name  # frozen weights have no gradient at all
        if g is not None and ".lora_A." not in name:  # B = 0 at step 1: A's gradient is 0 then
            assert g.abs().max() > 0, name
    assert n_state == sum(_is_trained(n) for n in grads)  # AdamW state only for what trains
    ring, ulysses = run_distributed(
        _ring_and_ulysses, 2, _cfg(tmp_path / "b", "parallel.sp_size=2"),
        _cfg(tmp_path / "c", "parallel.sp_size=2", "parallel.ulysses_size=2"), timeout=300)[0]
    _compare(ref, ring, 1e-4)
    _compare(ref, ulysses, 1e-4)
