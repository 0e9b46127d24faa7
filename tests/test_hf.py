"""HF models under ring attention equal single-process sdpa (logits, loss, every gradient); training round-trips."""

import copy
import json

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from ringtrain.config import RopeConfig
from ringtrain.hf import apply_ring_attention, apply_rope_scaling, remove_ring_attention, shard_batch, token_loss_sum
from ringtrain.ring import unshard_sequence
from ringtrain.testing import run_distributed

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=256, attention_dropout=0.0)
MODELS = {
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, {"sliding_window": None}),
    "qwen2": (Qwen2Config, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, {"head_dim": 16}),  # q/k norms
}
B, S = 2, 32  # S divisible by 2 x 4 ranks (zigzag)
RTOL = 1e-5  # relative to the reference max |value|; measured fp32 ring vs sdpa: <= 1e-6 (logits, loss, grads)


def _rel_err(x, ref):
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, COMMON["vocab_size"], (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - 5:] = 0  # right padding on the second row
    labels = ids.clone()
    labels[0, 3:6] = -100  # ignored labels (e.g. a prompt)
    return ids, mask, labels


def _reference(model, ids, mask, labels):
    """Single process, transformers' own sdpa attention and its own (internally shifting) loss."""
    ref_labels = labels.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=ref_labels)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _ring_step(model, batch, sp, group):
    """One forward/backward under the label contract: local loss sum / global label count, grads summed over SP."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = token_loss_sum(logits, batch["shift_labels"]) / batch["num_label_tokens"]
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)  # each rank saw only its tokens: the partial grads add up
    return sp.unshard(logits.detach()), total


def _equivalence_worker(mesh, layouts, models=tuple(MODELS)):
    group = mesh.sp_group
    results = {}
    for seed, (name, (cls, extra)) in enumerate(MODELS.items()):
        if name not in models:
            continue
        torch.manual_seed(seed)  # identical weights on every rank
        ref = AutoModelForCausalLM.from_config(cls(**COMMON, **extra), attn_implementation="sdpa")
        ids, mask, labels = _batch(100 + seed)
        ref_logits, ref_loss, ref_grads = _reference(ref, ids, mask, labels)
        for layout in layouts:
            model = copy.deepcopy(ref)
            model.zero_grad(set_to_none=True)
            sp = mesh.sp.with_layout(layout)  # ring x Ulysses as the mesh says
            apply_ring_attention(model, sp)
            batch = shard_batch({"input_ids": ids, "labels": labels, "attention_mask": mask}, sp)
            logits, loss = _ring_step(model, batch, sp, group)
            real = mask.bool()  # pad queries see other pads under the ring, never real tokens: compare real rows
            grad_errs = {n: _rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters()}
            worst = max(grad_errs, key=grad_errs.get)
            results[(name, layout)] = {
                "logits": _rel_err(logits[real], ref_logits[real]),
                "loss": abs(float(loss - ref_loss)) / float(ref_loss),
                "grad": grad_errs[worst], "worst": worst, "n_grads": len(grad_errs),
                "n_params": len(list(ref.parameters())),
            }
    return results


def _check_equivalence(per_rank, n_models, where_):
    for rank, results in enumerate(per_rank):
        assert len(results) == 2 * n_models
        for (name, layout), r in results.items():
            where = f"{name} {layout} {where_} rank={rank}"
            assert r["n_grads"] == r["n_params"], where
            assert r["logits"] <= RTOL, f"{where}: logits rel err {r['logits']:.2e}"
            assert r["loss"] <= RTOL, f"{where}: loss rel err {r['loss']:.2e}"
            assert r["grad"] <= RTOL, f"{where}: grad rel err {r['grad']:.2e} in {r['worst']}"


@pytest.mark.parametrize("world", [2, 4])
def test_models_match_single_process_sdpa(world):
    per_rank = run_distributed(_equivalence_worker, world, ("zigzag", "contiguous"), timeout=240)
    _check_equivalence(per_rank, len(MODELS), f"world={world}")


@pytest.mark.parametrize("ulysses", [2, 4])
def test_hybrid_ulysses_models_match_single_process_sdpa(ulysses):
    """Issue 13: Llama and Qwen2 (4 query heads, 2 KV heads) at (U, R) = (2, 2) and (4, 1); at U = 4 each KV head
    travels twice (U > H_kv)."""
    models = ("llama", "qwen2")
    per_rank = run_distributed(_equivalence_worker, 4, ("zigzag", "contiguous"), models, ulysses_size=ulysses,
                               timeout=240)
    _check_equivalence(per_rank, len(models), f"world=4 ulysses={ulysses}")


def _errors_worker(mesh):
    """Input mistakes that only show with several ranks must raise on *every* rank (nobody left in the ring)."""
    group = mesh.sp_group
    torch.manual_seed(0)
    model = apply_ring_attention(AutoModelForCausalLM.from_config(LlamaConfig(**COMMON)), group=group)
    ids, mask, _ = _batch(7)
    batch = shard_batch({"input_ids": ids}, group=group)
    found = {}

    def attempt(key, **kwargs):
        try:
            model(input_ids=batch["input_ids"], **kwargs)
        except ValueError as e:
            found[key] = str(e)

    attempt("no_positions")
    attempt("local_positions", position_ids=torch.arange(S // mesh.sp_size)[None])
    left = torch.ones(B, S, dtype=torch.long)
    left[0, :3] = 0
    from ringtrain.ring import shard_sequence

    attempt("left_padding", position_ids=batch["position_ids"], attention_mask=shard_sequence(left, group=group))
    # right padding, sharded, is accepted (and dropped): same logits as without it
    right = shard_sequence(mask, group=group)
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=right).logits
        b = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    found["right_padding_equal"] = bool(torch.equal(a, b))

    # longrope picks short/long factors from max(position)+1: here rank 0 sees 32 > 24 and rank 1 sees 24.
    half = COMMON["hidden_size"] // COMMON["num_attention_heads"] // 2
    config = LlamaConfig(**{**COMMON, "max_position_embeddings": 24})
    apply_rope_scaling(config, RopeConfig(method="longrope", factor=2.0, short_factor=[1.0] * half,
                                          long_factor=[2.0] * half))
    model = apply_ring_attention(AutoModelForCausalLM.from_config(config), group=group)
    attempt("longrope", position_ids=batch["position_ids"])
    return found


def _bad_positions_on_one_rank(mesh):
    """The default group (no group, no SequenceParallel passed): rank 1 alone passes wrong positions."""
    torch.manual_seed(0)
    model = apply_ring_attention(AutoModelForCausalLM.from_config(LlamaConfig(**COMMON)))
    ids, _, _ = _batch(7)
    batch = shard_batch({"input_ids": ids})
    positions = batch["position_ids"] + (1 if mesh.rank == 1 else 0)
    try:
        model(input_ids=batch["input_ids"], position_ids=positions)
    except ValueError as e:
        return str(e)
    return None


def test_bad_positions_on_one_rank_stop_every_rank_of_the_default_group():
    """Every rank agrees on the position check over the whole SP group, the default group included: both ranks
    raise at once (a check over no group left rank 0 waiting in the ring until the collective timeout)."""
    import time

    t0 = time.monotonic()
    found = run_distributed(_bad_positions_on_one_rank, 2, timeout=60)
    assert all(f is not None and "position_ids do not match the zigzag shard of a 32-token sequence" in f
               for f in found), found
    assert time.monotonic() - t0 < 60


def test_input_mistakes_raise_on_every_rank():
    for found in run_distributed(_errors_worker, 2, timeout=120):
        assert "position_ids were not passed" in found["no_positions"]
        assert "do not match the zigzag shard of a 32-token sequence" in found["local_positions"]
        assert "not right padding: row 0 has a real token at position 3" in found["left_padding"]
        assert found["right_padding_equal"]
        assert "rope_type='longrope' chooses its frequencies from each rank's largest position" in found["longrope"]


def _train_save_worker(mesh, out_dir):
    """Train a few AdamW steps with SP=2 (YaRN-scaled RoPE), save with save_pretrained, report logits."""
    group = mesh.sp_group
    config = Qwen2Config(**{**COMMON, "max_position_embeddings": 16})
    apply_rope_scaling(config, RopeConfig(method="yarn", target_length=S))
    torch.manual_seed(0)
    model = apply_ring_attention(AutoModelForCausalLM.from_config(config), group=group)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    ids, mask, labels = _batch(1000)
    batch = shard_batch({"input_ids": ids, "labels": labels, "attention_mask": mask}, group=group)
    for _ in range(4):  # the same batch: the loss must fall
        _, loss = _ring_step(model, batch, mesh.sp, group)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    ids, _, _ = _batch(2000)
    batch = shard_batch({"input_ids": ids}, group=group)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    logits = unshard_sequence(logits, group=group, dim=1, layout="zigzag")
    if mesh.sp_rank == 0:
        model.save_pretrained(out_dir)
    dist.barrier(group=group)
    return {"logits": logits, "ids": ids, "losses": losses}


def test_trained_model_saves_and_reloads_without_ringtrain(tmp_path):
    rank0, rank1 = run_distributed(_train_save_worker, 2, str(tmp_path), timeout=120)
    torch.testing.assert_close(rank0["logits"], rank1["logits"], rtol=0, atol=0)  # ranks stayed in sync
    assert rank0["losses"][-1] < rank0["losses"][0]  # it trained
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "ringtrain" not in json.dumps(saved)  # no ring implementation name leaks into the checkpoint
    assert saved["rope_parameters"]["rope_type"] == "yarn" and saved["max_position_embeddings"] == S
    # This process never registered a ring function: loading works only if the config does not need one.
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.rope_parameters == saved["rope_parameters"]
    with torch.no_grad():
        logits = model(input_ids=rank0["ids"]).logits
    assert _rel_err(logits, rank0["logits"]) <= RTOL


# --- errors that need no second rank (a world of one) -------------------------------------------------------


def _tiny(cls=LlamaConfig, **kw):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cls(**{**COMMON, **kw}))


def test_sliding_window_models_are_accepted():
    """Windows run in the ring since issue 7 (equivalence: tests/test_hf_documents.py); unknown layer types raise."""
    apply_ring_attention(_tiny(MistralConfig))  # Mistral's default window
    apply_ring_attention(_tiny(Qwen2Config, use_sliding_window=True, max_window_layers=1))
    apply_ring_attention(_tiny(Qwen3Config, head_dim=16, use_sliding_window=True, max_window_layers=0))
    with pytest.raises(ValueError, match=r"chunked_attention layers \(config.layer_types\).*full_attention and "
                                         r"sliding_attention layers only"):
        apply_ring_attention(_tiny(Qwen2Config, layer_types=["full_attention", "chunked_attention"]))


def test_dropout_in_training_is_refused():
    model = apply_ring_attention(_tiny(attention_dropout=0.1))
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    model.eval()
    model(input_ids=ids)  # dropout is inactive in eval mode
    model.train()
    with pytest.raises(ValueError, match=r"attention dropout=0.1 in training mode is not supported.*attention_dropout=0.0"):
        model(input_ids=ids)


def test_left_padding_and_caches_are_refused():
    model = apply_ring_attention(_tiny())
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    left = torch.ones(2, 8, dtype=torch.long)
    left[1, :2] = 0
    with pytest.raises(ValueError, match=r"not right padding: row 1 has a real token at position 2"):
        shard_batch({"input_ids": ids, "attention_mask": left})
    with pytest.raises(ValueError, match=r"not right padding: row 1"):
        model(input_ids=ids, attention_mask=left)
    holes = torch.ones(2, 8, dtype=torch.long)
    holes[0, 4] = 0
    with pytest.raises(ValueError, match=r"not right padding: row 0 has a real token at position 5"):
        model(input_ids=ids, attention_mask=holes)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 1, 8, 8\) but this rank holds 8 tokens: pass the sharded 2-D"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"use_cache=True with ring attention"):
        model(input_ids=ids, use_cache=True)
    with pytest.raises(ValueError, match=r"a KV cache \(past_key_values\) was passed"):
        model(input_ids=ids, cache=DynamicCache(config=model.config))
    out = model(input_ids=ids)  # config.use_cache=True is overridden: no cache is built
    assert out.cache is None


class _ManualConfig(PretrainedConfig):
    model_type = "ringtrain_test_manual"

    def __init__(self, hidden_size=16, vocab_size=32, **kw):
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        super().__init__(**kw)


class ManualAttention(nn.Module):
    """Computes attention itself instead of asking transformers' interface for a function."""

    def __init__(self, hidden):
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


class _ManualModel(PreTrainedModel):
    config_class = _ManualConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.attn = ManualAttention(config.hidden_size)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        return CausalLMOutputWithPast(logits=self.attn(self.embed(input_ids)))


def test_models_that_bypass_the_interface_are_refused():
    with pytest.raises(ValueError, match=r"_ManualModel cannot switch its attention implementation"):
        apply_ring_attention(_ManualModel(_ManualConfig()))
    # A model switched back to sdpa after apply_ring_attention would attend within each shard only.
    model = apply_ring_attention(_tiny())
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"ran a forward without calling the ring attention function"):
        model(input_ids=ids)


def test_apply_and_remove():
    model = _tiny()
    with pytest.raises(ValueError, match=r"layout='zig' is not one of zigzag, contiguous"):
        apply_ring_attention(model, layout="zig")
    apply_ring_attention(model)
    with pytest.raises(ValueError, match=r"already applied"):
        apply_ring_attention(model)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ring = model(input_ids=ids).logits
        remove_ring_attention(model)
        assert model.config._attn_implementation == "sdpa"
        torch.testing.assert_close(model(input_ids=ids).logits, ring, rtol=RTOL, atol=1e-6)
    with pytest.raises(ValueError, match=r"was not applied"):
        remove_ring_attention(model)


def test_shard_batch_labels_world_of_one():
    """The label contract, checked by hand on one rank: shift before sharding, pads and the last token ignored."""
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    labels = ids.clone()
    labels[0, 2] = -100
    out = shard_batch({"input_ids": ids, "labels": labels, "attention_mask": mask})
    expected = torch.full_like(ids, -100)
    expected[0, :7] = ids[0, 1:]
    expected[0, 1] = -100  # the ignored label at t=2 is the target of t=1
    expected[1, :4] = ids[1, 1:5]  # last real token (t=4) predicts a pad: ignored
    torch.testing.assert_close(out["shift_labels"], expected)
    assert int(out["num_label_tokens"]) == 6 + 4
    torch.testing.assert_close(out["position_ids"], torch.arange(8).expand(2, 8))
    assert set(out) == {"input_ids", "position_ids", "shift_labels", "num_label_tokens"}

    # per-label data keys shift with the labels; per-token ones do not; unknown keys are refused
    weights = torch.rand(2, 8, generator=torch.Generator().manual_seed(4))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)
    out = shard_batch({"input_ids": ids, "token_weights": weights, "answer_mask": weights > 0.5,
                       "document_ids": docs})
    torch.testing.assert_close(out["token_weights"][:, :7], weights[:, 1:])
    assert (out["token_weights"][:, 7] == 0).all() and not out["answer_mask"][:, 7].any()
    torch.testing.assert_close(out["answer_mask"][:, :7], weights[:, 1:] > 0.5)
    torch.testing.assert_close(out["document_ids"], docs)
    with pytest.raises(ValueError, match=r"does not know the batch keys \['segment_ids'\]"):
        shard_batch({"input_ids": ids, "segment_ids": docs})


def test_communicators_are_built_once_per_sequence_parallel(monkeypatch):
    """Every layer and every batch (per-batch layouts included) reuse the SequenceParallel's communicators."""
    from ringtrain.ring import SequenceParallel, comm

    sp = SequenceParallel(layout="balanced")
    built = []
    for cls in (comm.RingComm, comm.AllToAllComm):
        init = cls.__init__
        monkeypatch.setattr(cls, "__init__", lambda self, *a, _init=init, **k: (built.append(1), _init(self, *a, **k))[1])
    model = apply_ring_attention(_tiny(), sp)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 16))
    docs = torch.tensor([[0] * 5 + [1] * 11])
    for _ in range(2):
        batch = shard_batch({"input_ids": ids, "document_ids": docs}, sp)
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["documents"])
    assert built == []
