"""Hybrid models under sequence parallelism against one process (fp32): Qwen3.5 and Qwen3-Next (gated DeltaNet),
Nemotron-H and Falcon-H1 (Mamba-2), LFM2 (short conv), each beside softmax layers, on packed documents, at SP=2 and
SP=4 with the softmax layers as a ring and as Ulysses (zigzag and balanced layouts): loss and every parameter gradient
equal each document run on its own. Each mixer alone: output and input gradient equal its own forward per document,
which differs from running across the boundaries (the test can fail). A DeltaNet whose key heads do not divide the
group is refused in one line by `apply_ring_attention` and by validate; `remove_ring_attention` gives the mixers
their own forward back. One spawned world of 4 loops over the distributed cases.
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
from ringtrain.hf.mixers import mixers
from ringtrain.hf.mixers.base import MixerBinding
from ringtrain.ring import SequenceParallel
from ringtrain.testing import run_distributed
from ringtrain.validate import load_validated_config

VOCAB = 128
COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=64,
              vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DELTANET = dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=4,
                linear_num_value_heads=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4)
FAMILIES = {
    "qwen3_5_text": dict(DELTANET),
    "qwen3_next": {**DELTANET, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 32},
    # Mamba chunks of 8 tokens: documents of 5-19 tokens span several chunks and the scan's state crosses them. Two
    # B/C groups: a share of the groups per rank at SP=2, each group on two ranks (norm groups across ranks) at SP=4.
    "nemotron_h": dict(layer_types=["linear_attention", "full_attention", "mlp"], num_hidden_layers=3,
                       mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8),
    "falcon_h1": dict(num_hidden_layers=2, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2,
                      mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8, mamba_rms_norm=True),
    "lfm2": dict(num_hidden_layers=2, layer_types=["conv", "full_attention"], conv_L_cache=3),
}
B, S = 2, 32
DOCS = [[5, 14, 13], [1, 19, 12]]  # lengths per row: documents cross every shard boundary at SP=4
RTOL = 1e-5  # relative to the reference max |value|, fp32


def document_ids() -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in DOCS])


def tiny_config(family: str, **extra):
    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **extra})


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _spans(docs: torch.Tensor, row: int) -> list[torch.Tensor]:
    return [(docs[row] == d).nonzero().flatten() for d in docs[row].unique()]


def _reference(model, ids, docs):
    """Loss (token mean) and gradients of each document run on its own, positions from 0."""
    model.zero_grad(set_to_none=True)
    loss_sum, n = 0.0, 0
    for row in range(B):
        for span in _spans(docs, row):
            doc = ids[row, span][None]
            logits = model(input_ids=doc).logits
            loss_sum = loss_sum + F.cross_entropy(logits[0, :-1].float(), doc[0, 1:], reduction="sum")
            n += doc.shape[1] - 1
    loss = loss_sum / n
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _sp_run(ref_model, sp: SequenceParallel, group, ids, docs):
    model = copy.deepcopy(ref_model)
    model.zero_grad(set_to_none=True)
    apply_ring_attention(model, sp)
    batch = shard_batch({"input_ids": ids, "document_ids": docs}, sp)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   document_ids=batch["documents"]).logits
    loss = token_loss_sum(logits, batch["shift_labels"]) / batch["num_label_tokens"]
    loss.backward()
    dist.all_reduce(total := loss.detach().clone(), group=group)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)  # each rank saw its tokens (or heads): the parts add up
    return total, model


def _mixer_alone(ref_model, sp: SequenceParallel, docs) -> dict:
    """The first mixer of the model alone: its SP form on shards against its own forward per document."""
    module, kind = mixers(ref_model)[0]
    module = copy.deepcopy(module)
    x = torch.randn(B, S, COMMON["hidden_size"], generator=torch.Generator().manual_seed(7))
    ref_out = torch.zeros_like(x)
    x_ref = x.clone().requires_grad_()
    for row in range(B):
        for span in _spans(docs, row):
            out = module(x_ref[row:row + 1, span])
            ref_out[row, span] = out[0].detach()
            out.pow(2).sum().backward()
    with torch.no_grad():
        across = module(x)  # one pass over each packed row: state and conv cross the boundaries
    documents = sp.documents(docs)
    layer_sp = sp.for_documents(documents)
    x_local = layer_sp.shard(x).requires_grad_()
    out = MixerBinding(kind, module, sp, lambda: True)(x_local, document_ids=documents)
    out.pow(2).sum().backward()
    full = layer_sp.unshard(out.detach())
    dx = layer_sp.unshard(x_local.grad)
    return {"out": _rel(full, ref_out), "dx": _rel(dx, x_ref.grad), "across": _rel(across, ref_out)}


def _refusals(sp4: SequenceParallel) -> list[str]:
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_5_text", linear_num_key_heads=6,
                                                         linear_num_value_heads=6))
    try:
        apply_ring_attention(model, sp4)
    except ValueError as e:
        return [str(e)]
    return []


def _worker(mesh, families):
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    singles = [dist.new_group([r]) for r in range(4)]
    pair = pairs[rank // 2]
    world = dist.group.WORLD
    setups = {  # name -> (SequenceParallel, the group its gradients add up over)
        "sp2 ring zigzag": (SequenceParallel(ring_group=pair, layout="zigzag"), pair),
        "sp2 ulysses": (SequenceParallel(ring_group=singles[rank], ulysses_group=pair), pair),
        "sp4 ring balanced": (SequenceParallel(ring_group=world, layout="balanced"), world),
        "sp4 ulysses2 x ring2 zigzag": (mesh.sp.with_layout("zigzag"), world),
    }
    assert (mesh.sp.ulysses_world, mesh.sp.ring_world) == (2, 2)
    g, docs, results = torch.Generator().manual_seed(1234), document_ids(), {}
    for seed, family in enumerate(families):
        torch.manual_seed(seed)  # identical weights on every rank
        ref = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager").float()
        with torch.no_grad():
            # Decays that remember a few to a few tens of tokens, so the recurrence spans the documents. transformers'
            # DeltaNet init (A up to 16: exp(g) ~ 1e-9 per token) leaves dt_bias a gradient of cancelling
            # roundoff-sized terms, 4e-6 apart in fp32 between two summation orders of one process.
            for name, p in ref.named_parameters():
                if name.endswith("A_log"):
                    p.uniform_(-4.0, -1.0)
        ids = torch.randint(3, VOCAB, (B, S), generator=g)
        ref_loss, ref_grads = _reference(ref, ids, docs)
        for name, (sp, group) in setups.items():
            loss, model = _sp_run(ref, sp, group, ids, docs)
            grads = {k: _rel(p.grad, ref_grads[k]) for k, p in model.named_parameters() if p.grad is not None}
            worst = max(grads, key=grads.get)
            results[(family, name)] = {"loss": abs(float(loss - ref_loss)) / float(ref_loss), "grad": grads[worst],
                                       "worst": worst, "n_grads": len(grads), "n_ref_grads": len(ref_grads)}
        results[(family, "alone")] = _mixer_alone(ref, setups["sp4 ulysses2 x ring2 zigzag"][0], docs)
    results["refused"] = _refusals(setups["sp4 ring balanced"][0])
    return results


@functools.cache
def _results() -> list[dict]:
    return run_distributed(_worker, 4, tuple(FAMILIES), ulysses_size=2, timeout=600)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hybrid_family_matches_one_process_per_document(family: str):
    for rank, results in enumerate(_results()):
        for name in ("sp2 ring zigzag", "sp2 ulysses", "sp4 ring balanced", "sp4 ulysses2 x ring2 zigzag"):
            r = results[(family, name)]
            where = f"{family} {name} rank={rank}"
            assert r["n_grads"] == r["n_ref_grads"] > 0, where
            assert r["loss"] <= RTOL, f"{where}: loss rel err {r['loss']:.2e}"
            assert r["grad"] <= RTOL, f"{where}: grad rel err {r['grad']:.2e} in {r['worst']}"
        alone = results[(family, "alone")]
        assert alone["out"] <= RTOL and alone["dx"] <= RTOL, (family, rank, alone)
        assert alone["across"] > 1e-3, (family, rank, alone)  # documents matter to this layer


def test_deltanet_heads_that_do_not_divide_the_group_are_refused_in_one_line():
    for results in _results():
        (message,) = results["refused"]
        assert "\n" not in message
        assert "linear_num_key_heads=6 is not divisible by the sequence-parallel size 4" in message
        assert "choose parallel.sp_size among 1, 2, 3, 6" in message


TINY_CPU = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")


def _problems(*overrides: str, world_size: int | None = None) -> list[str]:
    try:
        load_validated_config(TINY_CPU, list(overrides), world_size=world_size)
    except ConfigError as e:
        return e.problems
    return []


def test_validate_accepts_hybrid_families_and_refuses_what_sp_cannot_split():
    for arch in ("qwen3_next", "qwen3_5_text", "nemotron_h", "falcon_h1", "lfm2"):
        assert _problems(f"model.arch={arch}") == [], arch
    heads = ("model.config={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
             "head_dim: 16, linear_num_key_heads: 6, linear_num_value_heads: 6, linear_key_head_dim: 8, "
             "linear_value_head_dim: 8}")
    (problem,) = _problems("model.arch=qwen3_5_text", heads, "parallel.sp_size=4", world_size=4)
    assert "Qwen3_5GatedDeltaNet (layer 0): linear_num_key_heads=6 is not divisible by the sequence-parallel " \
           "size 4" in problem, problem
    assert _problems("model.arch=qwen3_5_text", heads, "parallel.sp_size=2", world_size=2) == []
    # A mixer class the registry does not run stays refused, by name.
    (problem,) = _problems("model.arch=bamba")
    assert "has Mamba state-space layers (BambaMixer)" in problem and "NemotronHMamba2Mixer" in problem


def test_planner_counts_the_mixers_exchange_and_states():
    """`ringtrain plan` on Qwen3-Next: the DeltaNet's all-to-all channels and recurrent state, and no SP size that
    its 4 key heads cannot split."""
    from ringtrain.config import ModelConfig
    from ringtrain.planner import Setup, candidate_setups, mixer_buffers, model_shape, predict

    shape = model_shape(ModelConfig(arch="qwen3_next", config={**COMMON, **FAMILIES["qwen3_next"]}))
    # Out: q, k (4 heads x 8), v, z (8 x 8), beta, a (8 each); back: the output (8 x 8). State: 8 heads x 8 x 8.
    assert (shape.mixer_layers, shape.mixer_channels, shape.mixer_state) == (1, 272, 512)
    assert shape.mixer_units == ((4, False),)
    setup = Setup(world=2, sp=2, ulysses=1, seq_len=128)
    assert mixer_buffers(shape, setup) == 2 * 2 * 272 * 64 + 4 * 512 // 2 * 2  # buffers of 64 tokens; 2 chunks
    assert predict(shape, setup)["components"]["mixer_buffers"] == mixer_buffers(shape, setup)
    assert {s.sp for s in candidate_setups(shape, setup, 8)} == {1, 2, 4}


def test_remove_ring_attention_gives_the_mixers_their_own_forward_back():
    from ringtrain.hf import remove_ring_attention

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("lfm2")).float()
    ids = torch.randint(3, VOCAB, (1, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        apply_ring_attention(model, SequenceParallel())  # one process: the mixers' form without exchanges
        ((module, _),) = mixers(model)
        assert isinstance(module.__dict__["forward"], MixerBinding)
        ring = model(input_ids=ids, position_ids=torch.arange(16)[None]).logits
        remove_ring_attention(model)
        assert "forward" not in module.__dict__
        after = model(input_ids=ids).logits
    torch.testing.assert_close(ring, before, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, before)
