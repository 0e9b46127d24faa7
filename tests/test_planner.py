"""`ringtrain plan` (issue 16): the component formulas against hand computations and against what autograd really
saves, the H200 and CPU measurements they must match, every shipped config, the search, and bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ringtrain.cli import main
from ringtrain.config import ModelConfig
from ringtrain.planner import (
    GIB,
    ModelShape,
    Setup,
    attention_saved,
    attention_transients,
    layer_saved,
    loss_bytes,
    mlp_tile_tokens,
    model_shape,
    predict,
    rmsnorm_saved,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("**/*.yaml"))
# TinyLlama-1.1B's shape: the model of the H200 measurements in docs/benchmarks.md.
TINYLLAMA = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4}
SMALL = ModelShape(name="small", layers=2, hidden=64, intermediate=160, heads=4, kv_heads=2, head_dim=16, vocab=100,
                   params=60_000, layer_params=25_000, mlp_params=30_720)


def test_component_formulas_by_hand():
    d, i, h, kv, hd = 64, 160, 4, 2, 16
    assert rmsnorm_saved(d, 2, fresh_input=False) == 4 * d + 2 * d + 4  # fp32 upcast, bf16 normalized, fp32 rsqrt
    assert rmsnorm_saved(d, 4, fresh_input=False) == 4 * d + 4  # fp32: the normalized tensor (input kept elsewhere)
    assert rmsnorm_saved(d, 4, fresh_input=True) == 8 * d + 4
    assert attention_saved(SMALL, 2, 1) == 2 * hd * (h + 2 * kv) + 2 * hd * h + 4 * h
    # Ulysses 4 > 2 KV heads: each travels twice; the output is saved before and after the all-to-all back.
    assert attention_saved(SMALL, 2, 4) == 2 * hd * (h + 2 * 2 * kv) + 2 * 2 * hd * h + 4 * h
    parts = layer_saved(SMALL, 2, 1, tiled=False, checkpointed_input=True)
    assert parts == {"pre_attention": 6 * d + 4 + 2 * d, "attention": attention_saved(SMALL, 2, 1),
                     "post_attention": 6 * d + 4 + 2 * d, "mlp": 4 * 2 * i}
    assert layer_saved(SMALL, 2, 1, tiled=True, checkpointed_input=True)["mlp"] == 0
    # Ring of 2, bf16, CUDA: K/V and receive buffers, a block's gradients, fp32 accumulators, fp32 dK/dV mine and
    # send (no third buffer with 2 steps), FlashAttention's fp32 dq accumulator.
    q, k = hd * h, hd * kv
    assert attention_transients(SMALL, Setup(world=2, sp=2, ulysses=1, seq_len=128)) == {
        "forward": 4 * 2 * k + 4 * q + 2 * q,
        "backward": 4 * 2 * k + (2 + 4) * (q + 2 * k) + 2 * 8 * k + 4 * q}
    assert attention_transients(SMALL, Setup(world=8, sp=8, ulysses=1, seq_len=128))["backward"] == \
        4 * 2 * k + (2 + 4) * (q + 2 * k) + 3 * 8 * k + 4 * q
    # One kernel call in fp32 on CPU: only its gradients.
    assert attention_transients(SMALL, Setup(world=1, sp=1, ulysses=1, seq_len=128, dtype_bytes=4, device="cpu")) \
        == {"forward": 0, "backward": 4 * (q + 2 * k)}
    # Loss: fp32 [chunk, vocab] + its bf16 source, fp32 [vocab, hidden] weight gradient, [tokens, hidden] input grad.
    one = Setup(world=1, sp=1, ulysses=1, seq_len=512, loss_chunk=128)
    assert loss_bytes(SMALL, one) == {"forward": 6 * 128 * 100 + 4 * 100 * d + 2 * 512 * d,
                                      "backward": 8 * 100 * d + 2 * 100 * d + 4 * 512 * d}
    assert mlp_tile_tokens(SMALL, Setup(world=1, sp=1, ulysses=1, seq_len=1000, tiled_mlp=True)) == 63  # 16 tiles


def test_static_parts_flops_and_offload_by_hand():
    setup = Setup(world=4, sp=2, ulysses=1, seq_len=1024, recompute="full", offload=True)
    pred = predict(SMALL, setup)
    step = pred["moments"]["optimizer step"]
    # AdamW: parameters, gradients, two states and one parameter-sized temporary, each 1/4 (FSDP over 4 ranks).
    assert step == pytest.approx(5 * SMALL.params * 2 / 4)
    n = 1024 // 2
    assert pred["offload_host_bytes"] == 2 * 2 * 64 * n  # both layers' inputs, bf16
    tokens = 1024 * 2  # dp = 2
    assert pred["flops_per_step"] == (6 * SMALL.params + 6 * 2 * 1024 * 64) * tokens
    assert pred["hardware_flops_per_step"] == pred["flops_per_step"] + 2 * (2 * SMALL.layer_params
                                                                            + 2 * 1024 * 64) * tokens


@pytest.fixture(scope="module")
def tinyllama():
    return model_shape(ModelConfig(arch="llama", config=TINYLLAMA))


@pytest.mark.parametrize("seq_len,measured_gib", [(8192, 10.3), (32768, 13.0), (131072, 31.6)])
def test_h200_measurements_within_15_percent(tinyllama, seq_len, measured_gib):
    """docs/benchmarks.md, one H200: ringtrain SP=1, bf16, recompute full, FSDP2, peak max_memory_allocated."""
    assert tinyllama.params == 1_100_048_384
    pred = predict(tinyllama, Setup(world=1, sp=1, ulysses=1, seq_len=seq_len, recompute="full"))
    assert abs(pred["peak_bytes"] / GIB / measured_gib - 1) <= 0.15


def _saved_in_layer(model, layer_index: int, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves while decoder layer `layer_index` runs forward, weights and the
    shared rotary cos/sin excluded."""
    from ringtrain.model.causal_lm import decoder_layers

    layer = decoder_layers(model)[layer_index]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside, storages = [False], {}

    def pack(t):
        s = t.untyped_storage()
        if inside[0] and s.data_ptr() not in weights and tuple(t.shape[:2]) != (1, 1):  # cos/sin: [B, 1, S, hd]
            storages[s.data_ptr()] = s.nbytes()
        return t

    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(storages.values())


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                          ("qwen3", torch.bfloat16)])
def test_layer_formula_matches_what_autograd_saves(family, dtype):
    """A decoder layer under ringtrain's attention (world of one), untiled and tiled: the formula's bytes per token
    against the storages autograd really saves (measured: equal to the byte)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ringtrain.hf import apply_ring_attention
    from ringtrain.model.causal_lm import decoder_layers
    from ringtrain.model.tiled_mlp import tile_mlp

    kwargs = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, attention_dropout=0.0)
    kwargs.update({"head_dim": 32} if family == "qwen3" else {})
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).train()
    apply_ring_attention(model)
    shape = model_shape(ModelConfig(arch=family, config=kwargs))
    ids = torch.randint(0, 128, (1, 256))
    a = dtype.itemsize
    for tiled in (False, True):
        if tiled:
            for layer in decoder_layers(model):
                tile_mlp(layer.mlp, 4)
        # The tile function saves its input, the norm's output: what the untiled projections saved, no more.
        expected = sum(layer_saved(shape, a, 1, tiled, checkpointed_input=False).values()) * 256
        assert _saved_in_layer(model, 1, ids) == expected, (family, dtype, tiled)


def _plan(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["plan", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_plan_every_shipped_config(path, capsys, tmp_path):
    extra = []
    if "model:\n  path:" in path.read_text():
        # Stage 2 of the context-extension demo reads stage 1's export: give it that model's config.json alone (plan
        # needs shapes, not weights: a model can be planned before it is downloaded; validate would refuse this).
        from transformers import AutoConfig

        from ringtrain.validate import load_validated_config

        stage1 = load_validated_config(ROOT / "configs/passkey_short.yaml").model
        AutoConfig.for_model(stage1.arch, **stage1.config).save_pretrained(tmp_path / "stage1")
        extra = [f"model.path={tmp_path / 'stage1'}"]
    rc, out, err = _plan(capsys, path, *extra, "--json", "--device", "cpu")
    assert rc == 0, err
    result = json.loads(out)
    assert result["peak_memory_gib_per_rank"] > 0 and result["flops_per_step"] > 0
    assert result["peak_memory_gib_per_rank"] == pytest.approx(sum(result["components_gib"].values()))
    rc, out, _ = _plan(capsys, path, *extra, "--gpu-memory-gib", "80")
    assert rc == 0 and "predicted peak per rank" in out and "smallest sp_size that fits: sp_size=" in out


def test_plan_searches_the_smallest_sp_that_fits(capsys, tmp_path):
    cfg = tmp_path / "big.yaml"
    cfg.write_text(json.dumps({"model": {"arch": "llama", "dtype": "bfloat16", "config": TINYLLAMA},
                               "train": {"output_dir": str(tmp_path), "seq_len": 1048576,
                                         "activation_checkpointing": "full"}}))
    rc, out, err = _plan(capsys, cfg, "--gpus", "8", "--gpu-memory-gib", "40", "--json")
    result = json.loads(out)
    assert rc == 0 and result["fits"] and not result["config_fits"]
    rec = result["recommended"]
    assert rec["peak_memory_gib_per_rank"] <= 40 * 0.9 and rec["setup"]["sp"] > 1
    shape = model_shape(ModelConfig(arch="llama", config=TINYLLAMA))
    for sp in (s for s in (1, 2, 4) if s < rec["setup"]["sp"]):  # a smaller one does not fit with every saving on
        lowest = predict(shape, Setup(world=8, sp=sp, ulysses=1, seq_len=1048576, recompute="full", tiled_mlp=True,
                                      offload=True))
        assert lowest["peak_bytes"] > 40 * 0.9 * GIB
    # Offloaded inputs need pinned host memory: with little of it, offload is not an option and a larger sp is needed.
    rc, out, _ = _plan(capsys, cfg, "--gpus", "8", "--gpu-memory-gib", "40", "--host-memory-gib", "1", "--json")
    limited = json.loads(out)["recommended"]
    assert rc == 0 and limited["offload_host_gib_per_rank"] <= 1 and limited["setup"]["sp"] > rec["setup"]["sp"]
    rc, out, _ = _plan(capsys, cfg, "--gpus", "1", "--gpu-memory-gib", "24")
    assert rc == 1 and "nothing fits on these GPUs: the lowest peak is" in out


@pytest.mark.parametrize("argv,pattern", [
    (["--gpus", "0"], r"--gpus='0' must be a positive integer"),
    (["--gpus", "two"], r"--gpus='two' must be a positive integer"),
    (["--gpu-memory-gib", "-8"], r"--gpu-memory-gib='-8' must be a positive number"),
    (["--device", "tpu"], r"--device='tpu' is not one of cuda, cpu"),
    (["--host-memory-gib", "0"], r"--host-memory-gib='0' must be a positive number"),
    (["--gpus", "3"], r"--gpus=3 is not a multiple of parallel\.sp_size=2"),
    (["model.path=/nonexistent/model"], r"model\.arch='llama' conflicts with model\.path"),
    (["model.arch=null", "model.path=/nonexistent/model"],
     r"model\.path='/nonexistent/model' does not exist .*: fix the path"),
    (["train.tiled_mlp=maybe"], r"train\.tiled_mlp='maybe': expected true or false"),
])
def test_bad_plan_input_is_one_line_exit_2(capsys, argv, pattern):
    rc, out, err = _plan(capsys, ROOT / "configs/tiny_cpu.yaml", *argv)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), err


# scripts/validate_plan.py on the 2-core CPU VM (docs/benchmarks.md, "Planner"): VmHWM of the largest rank at 4,096 and
# 12,288 tokens, glibc mmap threshold 1 MiB; the model of scripts/bench_train.py, fp32.
CPU_RUNS = [  # (overrides, world, measured peak bytes at 4K, at 12K)
    (["train.activation_checkpointing=full"], 1, 965_865_472, 1_287_913_472),
    (["train.activation_checkpointing=none"], 1, 1_381_306_368, 2_291_634_176),
    (["train.activation_checkpointing=full", "parallel.sp_size=2"], 2, 830_840_832, 925_491_200),
    (["train.activation_checkpointing=full", "train.tiled_mlp=true"], 1, 972_742_656, 1_038_888_960),
    (["train.activation_checkpointing=full", "parallel.sp_size=2", "parallel.ulysses_size=2"], 2, 829_480_960,
     932_188_160),
]


@pytest.mark.parametrize("overrides,world,at_4k,at_12k", CPU_RUNS)
def test_cpu_measurements_growth_within_20_percent(overrides, world, at_4k, at_12k):
    """The process baseline (interpreter, libraries, data) cancels in the growth between the two contexts."""
    from ringtrain.planner import setup_from_config
    from ringtrain.validate import load_validated_config

    model = ("model.config={vocab_size: 32000, hidden_size: 256, intermediate_size: 1024, num_hidden_layers: 4, "
             "num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 12288}")
    peaks = []
    for seq_len in (4096, 12288):
        cfg = load_validated_config(None, ["model.arch=llama", model, "model.dtype=float32", "train.output_dir=unused",
                                 f"train.seq_len={seq_len}", *overrides])
        peaks.append(predict(model_shape(cfg.model), setup_from_config(cfg, world, "cpu"))["peak_bytes"])
    growth = peaks[1] - peaks[0]
    assert abs(growth / (at_12k - at_4k) - 1) <= 0.20
