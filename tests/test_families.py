"""The model families people extend, at SP=2 as a ring and as Ulysses, against one process (fp32, the model's own
eager attention): logits, loss and every parameter gradient, on a plain batch and on packed documents (the
reference runs each document on its own), with each family's windows on. Sinks (gpt_oss), MLA (deepseek_v3) and
soft-capping (gemma2) included. The MoE families' balancing loss (the trainer's wrapper, reduced over the SP group)
equals the model's own `aux_loss` on the whole batch, value and gradients, with routing made non-uniform. One spawned
world loops over every family.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from ringtrain.errors import ConfigError
from ringtrain.hf import apply_ring_attention, shard_batch, token_loss_sum
from ringtrain.model.causal_lm import CausalLMWithChunkedLoss
from ringtrain.ring import SequenceParallel
from ringtrain.testing import run_distributed
from ringtrain.validate import load_validated_config

VOCAB = 128
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, vocab_size=VOCAB, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
WINDOWED = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 6}
MOE = dict(num_experts_per_tok=2)
FAMILIES = {
    "llama": {},
    "gpt_oss": {**WINDOWED, **MOE, "num_local_experts": 4, "head_dim": 16},
    "deepseek_v3": {**MOE, "num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 16, "v_head_dim": 12, "n_routed_experts": 4, "n_shared_experts": 1,
                    "moe_intermediate_size": 32, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
    # Caps low enough to bite on a random init (measured below: the loss moves when they are removed).
    "gemma2": {**WINDOWED, "head_dim": 16, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 0.5,
               "final_logit_softcapping": 2.0, "initializer_range": 0.2},
    "gemma3_text": {**WINDOWED, "head_dim": 16, "query_pre_attn_scalar": 16},
    "olmo3": dict(WINDOWED),
    "qwen3_moe": {**MOE, "num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16},
    "mixtral": {**MOE, "num_local_experts": 4},
    "phi3": {},
}
B, S = 2, 32
DOCS = [[5, 14, 13], [1, 19, 12]]  # lengths per row; documents longer than the window cross shards
RTOL = 1e-5  # relative to the reference max |value|, fp32
MOE_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss")
AUX_RTOL = 1e-6


def tiny_config(family: str):
    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family]})


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _reference(model, ids, docs):
    """Loss (token mean) and gradients of each document run on its own, positions from 0 (docs None: each row)."""
    model.zero_grad(set_to_none=True)
    loss_sum, n, logits_full = 0.0, 0, torch.empty(B, S, VOCAB)
    for row in range(B):
        spans = [torch.arange(S)] if docs is None else [(docs[row] == d).nonzero().flatten()
                                                        for d in docs[row].unique()]
        for span in spans:
            doc = ids[row, span][None]
            logits = model(input_ids=doc).logits
            logits_full[row, span] = logits[0].detach()
            loss_sum = loss_sum + F.cross_entropy(logits[0, :-1].float(), doc[0, 1:], reduction="sum")
            n += doc.shape[1] - 1
    loss = loss_sum / n
    loss.backward()
    return logits_full, loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _sp_run(ref_model, sp: SequenceParallel, ids, docs, group):
    model = copy.deepcopy(ref_model)
    model.zero_grad(set_to_none=True)
    apply_ring_attention(model, sp)
    full = {"input_ids": ids} if docs is None else {"input_ids": ids, "document_ids": docs}
    batch = shard_batch(full, sp)
    extra = {} if docs is None else {"document_ids": batch["documents"]}
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **extra).logits
    loss = token_loss_sum(logits, batch["shift_labels"]) / batch["num_label_tokens"]
    loss.backward()
    dist.all_reduce(total := loss.detach().clone(), group=group)
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)  # each rank saw its tokens (or heads): the parts add up
    return sp.for_documents(batch.get("documents")).unshard(logits.detach()), total, model


def _worker(mesh, families):
    group = mesh.sp_group
    setups = {"ring": SequenceParallel(ring_group=group, layout="zigzag"), "ulysses": mesh.sp.with_layout("zigzag")}
    assert setups["ulysses"].ulysses_world == 2
    g = torch.Generator().manual_seed(1234)
    docs = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in DOCS])
    results = {}
    for seed, family in enumerate(families):
        torch.manual_seed(seed)  # identical weights on every rank
        ref = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager").float()
        ids = torch.randint(3, VOCAB, (B, S), generator=g)
        for packed in (False, True):
            ref_logits, ref_loss, ref_grads = _reference(ref, ids, docs if packed else None)
            for name, sp in setups.items():
                logits, loss, model = _sp_run(ref, sp, ids, docs if packed else None, group)
                grads = {k: _rel(p.grad, ref_grads[k]) for k, p in model.named_parameters() if p.grad is not None}
                worst = max(grads, key=grads.get)
                results[(family, packed, name)] = {
                    "logits": _rel(logits, ref_logits), "loss": abs(float(loss - ref_loss)) / float(ref_loss),
                    "grad": grads[worst], "worst": worst, "n_grads": len(grads),
                    "n_ref_grads": sum(g is not None for g in ref_grads.values()),
                }
        if family == "gemma2":  # the caps matter on these weights: a test that ignored them would fail
            uncapped = copy.deepcopy(ref)
            uncapped.config.attn_logit_softcapping = uncapped.config.final_logit_softcapping = None
            for layer in uncapped.model.layers:
                layer.self_attn.attn_logit_softcapping = None
            results["gemma2_uncapped_loss_change"] = abs(float(_reference(uncapped, ids, None)[1] - ref_loss))
        if family in MOE_FAMILIES:
            results[("aux", family)] = _balancing_loss(ref, setups["ring"], ids, group)
    return results


def _balancing_loss(ref_model, sp: SequenceParallel, ids, group) -> dict:
    """The trainer's balancing loss at SP=2 against the model's own aux_loss on the whole batch (one process)."""
    ref = copy.deepcopy(ref_model)
    with torch.no_grad():  # skew the routing: a random init routes almost uniformly
        for name, p in ref.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.mul_(40.0)
    ref.zero_grad(set_to_none=True)
    ref_aux = ref(input_ids=ids, output_router_logits=True).aux_loss
    ref_aux.backward()
    ref_aux = ref_aux.detach()
    ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters() if p.grad is not None}
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    apply_ring_attention(model, sp)
    wrapper = CausalLMWithChunkedLoss(model, 0)
    batch = shard_batch({"input_ids": ids}, sp)
    wrapper(batch["input_ids"], batch["position_ids"], batch["shift_labels"])
    stats = wrapper.router_stats
    part = wrapper.balancing.local_part(stats, group=group)
    part.backward()
    aux = part.detach().clone()
    dist.all_reduce(aux, group=group)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
    grads = {k: _rel(p.grad, ref_grads[k]) for k, p in model.named_parameters() if k in ref_grads}
    # What a per-shard loss would give: the model's formula on this rank's tokens alone, averaged over the ranks.
    shard = (wrapper.balancing.experts * (stats.counts / stats.rows * stats.probs.detach() / stats.rows).sum())
    dist.all_reduce(shard, group=group)
    counts = stats.counts.clone()
    dist.all_reduce(counts, group=group)
    return {"aux": abs(float(aux - ref_aux)) / float(ref_aux), "grad": max(grads.values()), "n_grads": len(grads),
            "n_ref_grads": len(ref_grads), "per_shard": abs(float(shard / sp.world - ref_aux)) / float(ref_aux),
            "skew": float(counts.max() / counts.sum())}


@functools.cache
def _results() -> list[dict]:
    return run_distributed(_worker, 2, tuple(FAMILIES), ulysses_size=2, timeout=600)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_one_process(family: str):
    per_rank = _results()
    for rank, results in enumerate(per_rank):
        for packed in (False, True):
            for name in ("ring", "ulysses"):
                r = results[(family, packed, name)]
                where = f"{family} {'packed documents' if packed else 'plain'} {name} rank={rank}"
                assert r["n_grads"] == r["n_ref_grads"] > 0, where
                assert r["logits"] <= RTOL, f"{where}: logits rel err {r['logits']:.2e}"
                assert r["loss"] <= RTOL, f"{where}: loss rel err {r['loss']:.2e}"
                assert r["grad"] <= RTOL, f"{where}: grad rel err {r['grad']:.2e} in {r['worst']}"
    if family == "gemma2":
        assert per_rank[0]["gemma2_uncapped_loss_change"] > 1e-3


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_balancing_loss_under_sp_matches_one_process(family: str):
    for rank, results in enumerate(_results()):
        r = results[("aux", family)]
        where = f"{family} rank={rank}"
        # Uniform routing puts 1/4 of the assignments on each of the 4 experts.
        assert r["skew"] > 0.28, f"{where}: routing is not skewed ({r['skew']:.2f} of assignments on one expert)"
        assert r["aux"] <= AUX_RTOL, f"{where}: aux loss rel err {r['aux']:.2e}"
        assert r["n_grads"] == r["n_ref_grads"] > 0, where
        assert r["grad"] <= RTOL, f"{where}: aux grad rel err {r['grad']:.2e}"
        assert r["per_shard"] > 10 * AUX_RTOL, f"{where}: a per-shard loss would pass too ({r['per_shard']:.2e})"


# --- the command line: `ringtrain validate` on these families ---------------------------------------------------------

TINY_CPU = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")


def _problems(*overrides: str) -> list[str]:
    try:
        load_validated_config(TINY_CPU, list(overrides))
    except ConfigError as e:
        return e.problems
    return []


@pytest.mark.parametrize("arch,kind,mixer", [("bamba", "Mamba state-space", "BambaMixer"),
                                             ("olmo_hybrid", "linear-attention",
                                              "OlmoHybridLinearAttentionDecoderLayer")])
def test_unknown_mixers_are_refused_by_validate_naming_the_layer_kind(arch, kind, mixer):
    """Mixer classes the registry does not run (hf/mixers; tests/test_hybrid.py runs the ones it does)."""
    problems = _problems(f"model.arch={arch}")
    assert len(problems) == 1, problems
    assert f"has {kind} layers ({mixer})" in problems[0] and "sequence parallelism runs only" in problems[0]


def test_families_validate_from_the_command_line():
    """rope.method=none keeps per-layer-type RoPE (Gemma 3, OLMo 3) untouched; gemma3 trains its text model; keys the
    modeling code reads are accepted; default special-token ids outside a small vocabulary are unset (Phi-3)."""
    from ringtrain.model.causal_lm import build_model_config

    for arch in ("gpt_oss", "deepseek_v3", "gemma2", "gemma3", "gemma3_text", "olmo3", "phi3", "mixtral"):
        assert _problems(f"model.arch={arch}") == [], arch
    assert _problems("model.arch=qwen3_moe", "model.config.head_dim=16", "model.config.num_local_experts=4") == []
    assert _problems("model.arch=deepseek_v3", "model.config.head_dim=16") == []
    assert "unknown key 'model.config.head_dimm'" in _problems("model.arch=qwen3_moe", "model.config.head_dimm=16")[0]
    cfg = load_validated_config(TINY_CPU, ["model.arch=qwen3_moe", "model.config.head_dim=16",
                                           "model.config.num_local_experts=4"])
    config = build_model_config(cfg.model)
    assert (config.head_dim, config.num_experts) == (16, 4)
    cfg = load_validated_config(TINY_CPU, ["model.arch=gemma3"])
    assert type(build_model_config(cfg.model)).__name__ == "Gemma3TextConfig"
    phi3 = build_model_config(load_validated_config(TINY_CPU, ["model.arch=phi3"]).model)
    assert phi3.pad_token_id is None and phi3.bos_token_id == 1  # 32000 > vocab 384 unset; 1 kept


def test_rope_none_keeps_per_layer_type_parameters():
    from ringtrain.config import RopeConfig
    from ringtrain.hf import apply_rope_scaling

    for arch in ("gemma3_text", "olmo3", "nemotron_h"):
        config = AutoConfig.for_model(arch)
        before = copy.deepcopy(getattr(config, "rope_parameters", None))
        apply_rope_scaling(config, RopeConfig(method="none"))
        assert getattr(config, "rope_parameters", None) == before, arch
    with pytest.raises(ValueError, match="per-layer-type"):  # rewriting them is still refused, in one line
        apply_rope_scaling(AutoConfig.for_model("gemma3_text"), RopeConfig(method="yarn", factor=2.0))
    from ringtrain.hf import describe_rope  # `ringtrain rope`: one report per layer type, or a line without RoPE

    report = describe_rope(AutoConfig.for_model("gemma3_text"), RopeConfig(method="none"))
    assert "layer type sliding_attention:" in report and "layer type full_attention:" in report
    assert "'rope_theta': 1000000.0" in report and "'rope_theta': 10000.0" in report
    assert "nothing to report" in describe_rope(AutoConfig.for_model("nemotron_h"), RopeConfig(method="none"))


def test_planner_counts_both_head_dims_of_mla():
    """`ringtrain plan` on DeepSeek V3: q/k head dim nope + rope (24), v head dim 12, each where it belongs."""
    from ringtrain.config import ModelConfig
    from ringtrain.planner import Setup, attention_saved, attention_transients, model_shape

    shape = model_shape(ModelConfig(arch="deepseek_v3", config={**COMMON, **FAMILIES["deepseek_v3"]}))
    assert (shape.head_dim, shape.value_dim, shape.heads, shape.kv_heads) == (24, 12, 4, 4)
    h, kv, qk, vd, a = 4, 4, 24, 12, 2
    assert attention_saved(shape, a, 1) == a * (qk * (h + kv) + vd * kv) + a * vd * h + 4 * h
    q, o, k_v = qk * h, vd * h, (qk + vd) * kv
    assert attention_transients(shape, Setup(world=2, sp=2, ulysses=1, seq_len=128)) == {
        "forward": 2 * a * k_v + 4 * o + a * o, "backward": 2 * a * k_v + (a + 4) * (q + k_v) + 2 * 4 * k_v + 4 * q}
