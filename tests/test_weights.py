"""Issue 15: each rank loads only its shards, and they equal the matching slices of a single-process from_pretrained
model (tied or not, bf16 on disk, RoPE scaling, the rank-0 fallback for .bin weights); a random init is the same at
worlds 1, 2 and 4 and without FSDP."""

import pytest
import torch

from ringtrain.testing import run_distributed
from ringtrain.validate import load_validated_config

SHAPE = dict(vocab_size=383, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)  # 383 rows: the last rank of 4 gets a shorter shard
COMMON = ["train.seq_len=64", "train.threads=1", "data.source=passkey"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> (saved model folder, extra config overrides)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, tie, dtype, extra in [
        ("untied", False, torch.float32, []),
        ("tied_bf16", True, torch.bfloat16, []),  # bf16 on disk, float32 in training
        ("yarn", False, torch.float32, ["rope.method=yarn", "rope.factor=4"]),  # rotary buffers change
        ("bin", True, torch.float32, []),  # no safetensors: rank 0 loads and broadcasts
    ]:
        torch.manual_seed(len(out))
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE, tie_word_embeddings=tie)).to(dtype)
        if name == "bin":
            model.config.save_pretrained(root / name)
            torch.save(model.state_dict(), root / name / "pytorch_model.bin")
        else:
            model.save_pretrained(root / name)
        out[name] = (root / name, extra)
    return out


def _cfgs(tmp_path, folders):
    cfgs = {name: load_validated_config(None, [*COMMON, f"train.output_dir={tmp_path}", f"model.path={path}",
                                     "model.dtype=float32", *extra])
            for name, (path, extra) in folders.items()}
    shape = "{" + ", ".join(f"{k}: {v}" for k, v in SHAPE.items()) + "}"
    cfgs["random"] = load_validated_config(None, [*COMMON, f"train.output_dir={tmp_path}", "model.arch=llama",
                                        f"model.config={shape}", "model.config.tie_word_embeddings=true",
                                        "train.seed=3"])
    return cfgs


def _build_all(mesh, cfgs):
    """Each config built as the trainer builds it (FSDP2 over the world): this rank's local shards and buffers."""
    from torch.distributed.tensor import DTensor

    from ringtrain.model.build import build_model
    from ringtrain.model.causal_lm import build_causal_lm

    out = {}
    for name, cfg in cfgs.items():
        lm = build_model(cfg, mesh, "train").lm
        shards = {n: (t.to_local() if isinstance(t, DTensor) else t).clone() for n, t in lm.state_dict().items()}
        out[name] = (shards, {n: b.clone() for n, b in lm.named_buffers()},
                     lm.lm_head.weight is lm.model.embed_tokens.weight)
    if mesh.world_size == 1:  # the evaluation's build: no parallelisation, plain tensors
        lm = build_causal_lm(cfgs["random"], mesh.device)
        out["random_unsharded"] = ({n: t.clone() for n, t in lm.state_dict().items()}, {}, None)
    return out


def _reference(path, extra):
    """Single process, plain transformers: from_pretrained with the run's RoPE scaling applied to its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ringtrain.config import RopeConfig
    from ringtrain.hf import apply_rope_scaling

    config = AutoConfig.from_pretrained(path)
    rope = dict(e.removeprefix("rope.").split("=") for e in extra)
    apply_rope_scaling(config, RopeConfig(method=rope.get("method", "none"),
                                          factor=float(rope["factor"]) if "factor" in rope else None))
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)


def test_shards_equal_slices_of_from_pretrained_at_worlds_1_2_4(tmp_path, folders):
    cfgs = _cfgs(tmp_path, folders)
    runs = {world: run_distributed(_build_all, world, cfgs, timeout=300) for world in (1, 2, 4)}
    for name, (path, extra) in folders.items():
        ref = _reference(path, extra)
        full = ref.state_dict()
        assert set(runs[1][0][name][0]) == set(full)
        for world, ranks in runs.items():
            for rank, result in enumerate(ranks):
                shards, buffers, tied = result[name]
                assert tied == ref.config.tie_word_embeddings, (name, world)
                for key, tensor in full.items():
                    # FSDP2 shards dim 0 like torch.chunk: rank r holds chunk r (possibly none).
                    chunks = torch.chunk(tensor, world, dim=0)
                    expected = chunks[rank] if rank < len(chunks) else tensor[:0]
                    assert torch.equal(shards[key], expected), (name, world, rank, key)
                ref_buffers = dict(ref.named_buffers())
                assert buffers.keys() == ref_buffers.keys()
                for key, b in ref_buffers.items():  # rotary inv_freq (after YaRN) and original_inv_freq
                    assert torch.equal(buffers[key], b), (name, world, rank, key)
    # RoPE scaling reached the buffers: YaRN slows the low frequencies.
    yarn, plain = runs[1][0]["yarn"][1], runs[1][0]["untied"][1]
    assert (yarn["model.rotary_emb.inv_freq"] < plain["model.rotary_emb.inv_freq"]).any()

    # Random init: the same full weights at every world size, sharded or not.
    def unsharded(ranks):
        return {k: torch.cat([r["random"][0][k] for r in ranks]) for k in ranks[0]["random"][0]}

    one = unsharded(runs[1])
    assert one.keys() == runs[1][0]["random_unsharded"][0].keys()
    for key, tensor in one.items():
        assert torch.equal(tensor, runs[1][0]["random_unsharded"][0][key]), key
        for world in (2, 4):
            assert torch.equal(tensor, unsharded(runs[world])[key]), (world, key)
    # transformers' own init: N(0, 0.02) matrices, unit norms, different layers drawn differently.
    q0, q1 = one["model.layers.0.self_attn.q_proj.weight"], one["model.layers.1.self_attn.q_proj.weight"]
    assert 0.015 < float(q0.std()) < 0.025 and not torch.equal(q0, q1)
    assert torch.equal(one["model.norm.weight"], torch.ones(SHAPE["hidden_size"]))
    assert torch.equal(one["lm_head.weight"], one["model.embed_tokens.weight"]) and runs[4][0]["random"][2]
