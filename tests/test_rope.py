"""RoPE scaling: each method writes what transformers computes, round-trips through save/load, and stays fp32."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ringtrain.config import RopeConfig
from ringtrain.hf.rope import (
    apply_rope_scaling,
    check_rotary_precision,
    describe_rope,
    format_rope_report,
    resolve_rope_parameters,
    rope_report,
)

HEAD_DIM = 32
ORIGINAL = 4096


def _config(cls=LlamaConfig, **kw):
    base = dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=64, max_position_embeddings=ORIGINAL)
    base.update(kw)
    return cls(**base)


def _base_inv_freq(theta, dim=HEAD_DIM):
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _rotary(config):
    model = AutoModelForCausalLM.from_config(config)
    return model.model.rotary_emb


def _hf_reference(rope_parameters, max_position_embeddings, seq_len=None):
    """What transformers computes for a config written by hand with the documented rope_parameters keys."""
    ref = _config(rope_parameters=dict(rope_parameters), max_position_embeddings=max_position_embeddings)
    rope_type = ref.rope_parameters["rope_type"]
    if rope_type == "default":
        return _rotary(ref).compute_default_rope_parameters(ref)
    return ROPE_INIT_FUNCTIONS[rope_type](ref, None, seq_len=seq_len)


g = torch.Generator().manual_seed(0)
SHORT = (1 + torch.rand(HEAD_DIM // 2, generator=g)).tolist()
LONG = (1 + 8 * torch.rand(HEAD_DIM // 2, generator=g)).tolist()

CASES = [
    # (RopeConfig, hand-written transformers rope_parameters, max_position_embeddings transformers should see)
    (RopeConfig(method="linear", factor=4.0),
     {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, 4 * ORIGINAL),
    (RopeConfig(method="dynamic", target_length=8 * ORIGINAL),
     {"rope_type": "dynamic", "factor": 8.0, "rope_theta": 10000.0}, ORIGINAL),
    (RopeConfig(method="yarn", target_length=16 * ORIGINAL, beta_fast=24.0),
     {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 24.0,
      "rope_theta": 10000.0}, 16 * ORIGINAL),
    (RopeConfig(method="yarn", factor=8.0, rope_theta=5e5, mscale=0.707, mscale_all_dim=1.0),
     {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL, "mscale": 0.707,
      "mscale_all_dim": 1.0, "rope_theta": 5e5}, 8 * ORIGINAL),
    (RopeConfig(method="llama3", target_length=8 * ORIGINAL),
     {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": ORIGINAL, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "rope_theta": 10000.0}, 8 * ORIGINAL),
    (RopeConfig(method="longrope", factor=8.0, short_factor=SHORT, long_factor=LONG),
     {"rope_type": "longrope", "factor": 8.0, "original_max_position_embeddings": ORIGINAL, "short_factor": SHORT,
      "long_factor": LONG, "rope_theta": 10000.0}, 8 * ORIGINAL),
    (RopeConfig(method="theta", rope_theta=1e6, target_length=4 * ORIGINAL),
     {"rope_type": "default", "rope_theta": 1e6}, 4 * ORIGINAL),
    (RopeConfig(method="none"), {"rope_type": "default", "rope_theta": 10000.0}, ORIGINAL),
]


@pytest.mark.parametrize("rope_cfg,expected_params,expected_max", CASES, ids=[c[0].method for c in CASES])
def test_method_matches_transformers_and_round_trips(rope_cfg, expected_params, expected_max, tmp_path):
    config = _config()
    apply_rope_scaling(config, rope_cfg)
    assert config.rope_parameters == expected_params
    assert config.max_position_embeddings == expected_max

    # The model transformers builds from our config has exactly the frequencies of the hand-written one.
    rotary = _rotary(config)
    ref_inv_freq, ref_scaling = _hf_reference(expected_params, expected_max)
    torch.testing.assert_close(rotary.inv_freq, ref_inv_freq.float(), rtol=0, atol=0)
    assert rotary.attention_scaling == pytest.approx(ref_scaling, rel=1e-12)

    # save_pretrained -> plain AutoConfig.from_pretrained keeps the scaling, and applying again is a no-op.
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert reloaded.rope_parameters == expected_params
    assert reloaded.max_position_embeddings == expected_max
    torch.testing.assert_close(_rotary(reloaded).inv_freq, rotary.inv_freq, rtol=0, atol=0)
    assert resolve_rope_parameters(reloaded, rope_cfg) == (expected_params, expected_max)


def test_methods_do_what_the_papers_say():
    """Independent of transformers: the defining property of each method, in fp64."""
    base = _base_inv_freq(10000.0)

    def scaled(rope_cfg):
        config = _config()
        apply_rope_scaling(config, rope_cfg)
        rotary = _rotary(config)
        return rotary.inv_freq.double(), rotary.attention_scaling, config

    inv, _, _ = scaled(RopeConfig(method="linear", factor=4.0))  # position interpolation: every pair slowed by 4
    torch.testing.assert_close(inv, base / 4, rtol=1e-6, atol=0)

    inv, _, config = scaled(RopeConfig(method="theta", factor=8.0))  # NTK-aware base when no theta is given
    assert config.rope_parameters["rope_theta"] == pytest.approx(1e4 * 8 ** (HEAD_DIM / (HEAD_DIM - 2)))
    torch.testing.assert_close(inv, _base_inv_freq(config.rope_parameters["rope_theta"]), rtol=1e-6, atol=0)
    assert inv[-1] / base[-1] == pytest.approx(1 / 8, rel=1e-5)  # the slowest pair is slowed by the factor

    inv, _, _ = scaled(RopeConfig(method="llama3", factor=8.0))  # short wavelengths kept, long ones / factor
    wavelength = 2 * math.pi / base
    keep, scale = wavelength < ORIGINAL / 4.0, wavelength > ORIGINAL / 1.0
    assert keep.any() and scale.any()
    torch.testing.assert_close(inv[keep], base[keep], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv[scale], base[scale] / 8, rtol=1e-6, atol=0)

    inv, attention, _ = scaled(RopeConfig(method="yarn", factor=16.0))  # ramp from extrapolation to interpolation
    torch.testing.assert_close(inv[0], base[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv[-1], base[-1] / 16, rtol=1e-6, atol=0)
    assert attention == pytest.approx(0.1 * math.log(16) + 1)

    inv, attention, _ = scaled(RopeConfig(method="longrope", factor=8.0, short_factor=SHORT, long_factor=LONG))
    torch.testing.assert_close(inv, base / torch.tensor(SHORT, dtype=torch.float64), rtol=1e-6, atol=0)
    assert attention == pytest.approx(math.sqrt(1 + math.log(8) / math.log(ORIGINAL)))


def _fp64_angles_bound(rotary, positions):
    """fp64 cos/sin from the model's own inv_freq, and the worst error an fp32 angle product may add."""
    inv = rotary.inv_freq.double()
    angles = positions.double()[..., None] * inv
    angles = torch.cat([angles, angles], dim=-1)
    # fp32 rounds the product p * f once (relative 2**-24); cos/sin are 1-Lipschitz in the angle.
    bound = 2 * angles.abs() * 2.0**-24 + 1e-6
    return angles.cos() * rotary.attention_scaling, angles.sin() * rotary.attention_scaling, bound


@pytest.mark.parametrize("method", ["none", "yarn", "llama3"])
def test_rotary_at_1m_positions_matches_fp64_in_fp32_and_bf16(method):
    config = _config()
    apply_rope_scaling(config, RopeConfig(method=method, target_length=None if method == "none" else 1 << 20))
    positions = torch.cat([torch.randint(0, 1 << 20, (1, 61), generator=torch.Generator().manual_seed(1)),
                           torch.tensor([[0, 1, (1 << 20) - 1]])], dim=1)
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        check_rotary_precision(model)  # the buffers stayed fp32 even though the weights are bf16
        rotary = model.model.rotary_emb
        x = torch.randn(1, positions.shape[1], 8, dtype=dtype)
        cos, sin = rotary(x, positions)
        assert cos.dtype == dtype
        ref_cos, ref_sin, bound = _fp64_angles_bound(rotary, positions)
        if dtype == torch.bfloat16:
            bound = bound + 2.0**-8 * rotary.attention_scaling  # bf16 rounds the result, not the angle
        assert ((cos.double() - ref_cos).abs() <= bound).all()
        assert ((sin.double() - ref_sin).abs() <= bound).all()
    # inv_freq itself is within a few fp32 ulps of the fp64 formula (default RoPE).
    if method == "none":
        torch.testing.assert_close(rotary.inv_freq.double(), _base_inv_freq(1e4), rtol=4 * 2.0**-24, atol=0)


def test_casting_buffers_to_bf16_is_caught():
    """model.to(bf16) also casts inv_freq: angles at 1M become garbage, and check_rotary_precision says so."""
    model = AutoModelForCausalLM.from_config(_config()).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"rotary frequency buffers are not float32: .*inv_freq \(torch.bfloat16\)"):
        check_rotary_precision(model)
    rotary = model.model.rotary_emb
    positions = torch.tensor([[999_983]])
    cos, _ = rotary(torch.randn(1, 1, 8, dtype=torch.bfloat16), positions)
    ref = (positions.double()[..., None] * _base_inv_freq(1e4)).cos()
    assert (cos[..., : HEAD_DIM // 2].double() - ref).abs().max() > 0.5  # the failure the check prevents


def test_validate_names_field_value_and_fix():
    def problems(**kw):
        return dict(RopeConfig(**kw)._validate())

    assert problems() == {}
    assert "did you mean 'yarn'" in problems(method="yarnn")["method"]
    assert "method='yarnn' is not one of none, linear" in problems(method="yarnn")["method"]
    assert "needs factor or target_length" in problems(method="yarn")["factor"]
    assert "factor=0.5 must be >= 1" in problems(method="linear", factor=0.5)["factor"]
    assert "set only one" in problems(method="yarn", factor=2.0, target_length=8192)["factor"]
    assert "method='none' ignores" in problems(factor=2.0)["method"]
    assert "beta_fast=8.0 is only used by method=yarn" in problems(method="llama3", factor=2.0, beta_fast=8.0)["beta_fast"]
    assert "needs short_factor" in problems(method="longrope", factor=2.0, long_factor=[1.0])["short_factor"]
    assert "low_freq_factor=4.0, high_freq_factor=2.0" in problems(
        method="llama3", factor=2.0, low_freq_factor=4.0, high_freq_factor=2.0)["high_freq_factor"]
    assert "beta_fast > beta_slow" in problems(method="yarn", factor=2.0, beta_fast=1.0, beta_slow=2.0)["beta_fast"]
    assert "set both or neither" in problems(method="yarn", factor=2.0, mscale=1.0)["mscale"]
    assert "needs rope_theta" in problems(method="theta")["rope_theta"]


def test_apply_rejects_what_the_model_cannot_take():
    with pytest.raises(ValueError, match=r"rope.method: method='linearr' is not one of"):
        apply_rope_scaling(_config(), RopeConfig(method="linearr", factor=2.0))
    with pytest.raises(ValueError, match=r"target_length=1024 is shorter than the pretraining length 4096"):
        apply_rope_scaling(_config(), RopeConfig(method="yarn", target_length=1024))
    with pytest.raises(ValueError, match=r"short_factor has 3 values but .* needs 16"):
        apply_rope_scaling(_config(), RopeConfig(method="longrope", factor=2.0, short_factor=[1.0] * 3,
                                                 long_factor=[1.0] * 3))


def test_qwen2_and_already_scaled_configs():
    # Qwen2: same contract; the model's theta (1e6) is kept when rope_theta is unset.
    config = _config(Qwen2Config, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    apply_rope_scaling(config, RopeConfig(method="yarn", target_length=4 * ORIGINAL))
    assert config.rope_parameters["rope_theta"] == 1e6
    inv_freq, _ = _hf_reference(config.rope_parameters, config.max_position_embeddings)
    torch.testing.assert_close(_rotary(config).inv_freq, inv_freq)
    # A Llama-3.1-style config extended again: "original" is the pretraining length, not the scaled one.
    config = _config(max_position_embeddings=8 * ORIGINAL, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 5e5})
    apply_rope_scaling(config, RopeConfig(method="yarn", target_length=32 * ORIGINAL))
    assert config.rope_parameters["factor"] == 32.0
    assert config.rope_parameters["original_max_position_embeddings"] == ORIGINAL


def test_report_table():
    config = _config()
    rows = rope_report(config, target_length=4 * ORIGINAL)  # unscaled model asked to run 4x longer
    assert len(rows) == HEAD_DIM // 2
    assert all(r["treatment"] == "extrapolated" for r in rows)
    unseen = [r["pair"] for r in rows if r["unseen_angles"]]
    # exactly the pairs that did not complete a rotation in pretraining
    assert unseen == [r["pair"] for r in rows if r["pretrained_wavelength"] > ORIGINAL]
    assert unseen and unseen[-1] == HEAD_DIM // 2 - 1

    apply_rope_scaling(config, RopeConfig(method="yarn", target_length=4 * ORIGINAL))
    rows = rope_report(config)
    assert rows[0]["target_length"] == 4 * ORIGINAL and rows[0]["original_length"] == ORIGINAL
    assert rows[0]["treatment"] == "extrapolated" and rows[-1]["treatment"] == "interpolated"
    assert any(r["treatment"] == "blended" for r in rows)
    assert not any(r["unseen_angles"] for r in rows)
    text = format_rope_report(config)
    assert "'rope_type': 'yarn'" in text and "interpolated" in text
    assert len(text.splitlines()) == 4 + HEAD_DIM // 2 + 2

    text = describe_rope(_config(), RopeConfig(method="theta", rope_theta=5e5), 4 * ORIGINAL)
    assert "pretraining length=4096" in text and "0 reach angles unseen" in text
