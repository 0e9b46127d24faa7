"""HF models under ring attention with sliding windows and packed documents (issue 7).

- Mistral with `sliding_window` and Qwen2 whose `layer_types` mix full and sliding layers equal single-process
  transformers sdpa with its own masks (logits, loss, every gradient).
- A packed, document-masked batch (shard_batch: per-document positions, document_ids to the model) has the loss
  and gradients of its documents run one by one, token-weighted.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from ringtrain.data import document_position_ids
from ringtrain.hf import apply_ring_attention, shard_batch, token_loss_sum
from ringtrain.ring import unshard_sequence
from ringtrain.testing import run_distributed

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=256, attention_dropout=0.0)
WINDOWED = {
    "mistral_window5": (MistralConfig, {"sliding_window": 5}),
    # layer 0 full, layer 1 sliding (window 7): transformers passes sliding_window to layer 1 only
    "qwen2_mixed_window7": (Qwen2Config, {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1}),
}
B, S = 2, 32
RTOL = 1e-5  # relative to the reference max |value|; fp32 ring vs sdpa


def _rel_err(x, ref):
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _ring_step(model, batch, group, layout):
    """Forward/backward under the label contract; returns full logits, the global loss, grads summed over SP."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   **({"document_ids": batch["document_ids"]} if "document_ids" in batch else {})).logits
    loss = token_loss_sum(logits, batch["shift_labels"]) / batch["num_label_tokens"]
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)
    return unshard_sequence(logits.detach(), group=group, dim=1, layout=layout), total


def _compare(model, ref_grads, ref_logits, ref_loss, logits, loss):
    grads = {n: _rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters()}
    worst = max(grads, key=grads.get)
    return {"logits": None if ref_logits is None else _rel_err(logits, ref_logits),
            "loss": abs(float(loss - ref_loss)) / float(ref_loss), "grad": grads[worst], "worst": worst,
            "n_grads": len(grads)}


def _documents(seed: int) -> torch.Tensor:
    """[B, S] document ids: row 0 has a length-1 document and boundaries inside shards, row 1 one long document
    crossing every shard plus short ones."""
    rows = [[1, 6, 3, 9, 1, 12], [2, 25, 1, 4]]
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def _worker(mesh):
    group = mesh.sp_group
    results = {}
    g = torch.Generator().manual_seed(0)
    # 1. Sliding windows against transformers' own sdpa masks.
    for seed, (name, (cls, extra)) in enumerate(WINDOWED.items()):
        torch.manual_seed(seed)
        ref = AutoModelForCausalLM.from_config(cls(**COMMON, **extra), attn_implementation="sdpa")
        ids = torch.randint(0, COMMON["vocab_size"], (B, S), generator=g)
        out = ref(input_ids=ids, labels=ids)
        out.loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        for layout in ("zigzag", "contiguous"):
            model = copy.deepcopy(ref)
            model.zero_grad(set_to_none=True)
            apply_ring_attention(model, group=group, layout=layout)
            logits, loss = _ring_step(model, shard_batch({"input_ids": ids}, group=group, layout=layout), group, layout)
            results[(name, layout)] = _compare(model, ref_grads, out.logits.detach(), out.loss.detach(), logits, loss)

    # 2. Packed documents against the same documents one by one (positions from 0 in each, no packing).
    docs = _documents(0)
    for seed, (name, (cls, extra)) in enumerate([("llama", (LlamaConfig, {})), *WINDOWED.items()]):
        torch.manual_seed(10 + seed)
        ref = AutoModelForCausalLM.from_config(cls(**COMMON, **extra), attn_implementation="sdpa")
        ids = torch.randint(0, COMMON["vocab_size"], (B, S), generator=g)
        loss_sum, n_tokens, ref_logits = 0.0, 0, torch.empty(B, S, COMMON["vocab_size"])
        for row in range(B):
            for d in docs[row].unique():
                span = (docs[row] == d).nonzero().flatten()
                doc = ids[row, span][None]
                logits = ref(input_ids=doc).logits  # [1, n, V]
                ref_logits[row, span] = logits[0].detach()
                loss_sum = loss_sum + F.cross_entropy(logits[0, :-1], doc[0, 1:], reduction="sum")
                n_tokens += doc.shape[1] - 1
        ref_loss = loss_sum / n_tokens  # token-weighted mean over the documents
        ref_loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        for layout in ("zigzag", "contiguous"):
            model = copy.deepcopy(ref)
            model.zero_grad(set_to_none=True)
            apply_ring_attention(model, group=group, layout=layout)
            # No labels given: shard_batch ignores each document's last target (the next document's first token).
            batch = shard_batch({"input_ids": ids, "document_ids": docs}, group=group, layout=layout)
            assert int(batch["num_label_tokens"]) == n_tokens
            assert torch.equal(unshard_sequence(batch["position_ids"], group=group, dim=1, layout=layout),
                               document_position_ids(docs))
            logits, loss = _ring_step(model, batch, group, layout)
            results[("packed_" + name, layout)] = _compare(model, ref_grads, ref_logits, ref_loss.detach(), logits,
                                                           loss)
    return results


def test_windows_and_packed_documents_match_single_process():
    # World 4, S=32: contiguous chunks of 8 tokens, so window 5 / 7 stops the ring after one hop (the early-stop
    # path and the direct dK/dV hop home); zigzag chunks of 4 tokens put window edges across chunks.
    for world in (4,):
        per_rank = run_distributed(_worker, world, timeout=300)
        for rank, results in enumerate(per_rank):
            assert len(results) == 2 * (2 * len(WINDOWED) + 1)
            for key, r in results.items():
                where = f"{key} world={world} rank={rank}"
                assert r["logits"] <= RTOL, f"{where}: logits rel err {r['logits']:.2e}"
                assert r["loss"] <= RTOL, f"{where}: loss rel err {r['loss']:.2e}"
                assert r["grad"] <= RTOL, f"{where}: grad rel err {r['grad']:.2e} in {r['worst']}"


def test_shard_batch_document_positions_world_of_one():
    ids = torch.arange(8)[None].repeat(2, 1)
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8])
    out = shard_batch({"input_ids": ids, "document_ids": docs})
    torch.testing.assert_close(out["position_ids"], torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], list(range(8))]))
    assert out["shift_labels"][0].tolist() == [1, 2, -100, 4, -100, 6, 7, -100]
    out = shard_batch({"input_ids": ids, "document_ids": docs}, document_positions="global")
    torch.testing.assert_close(out["position_ids"], torch.arange(8).expand(2, 8))
    with pytest.raises(ValueError, match=r"document_positions='first' is not one of restart, global"):
        shard_batch({"input_ids": ids, "document_ids": docs}, document_positions="first")
    with pytest.raises(ValueError, match=r"document_ids decrease along row 0"):
        shard_batch({"input_ids": ids, "document_ids": docs.flip(1)})
