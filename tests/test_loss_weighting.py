"""train.loss_weighting=sequence: each conversation's mean loss weighted equally (LongAlign), exact at SP=2 x DP=2
with gradient accumulation against a single process that runs every conversation alone."""

from __future__ import annotations

import copy
import math
import os

import torch
import torch.nn.functional as F

from ringtrain.data.files import SAMPLES
from ringtrain.model.loss import IGNORE_INDEX
from ringtrain.testing import run_distributed
from ringtrain.validate import load_validated_config

TINY = [
    "model.arch=llama",
    "model.config={vocab_size: 384, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 1024}",
    "data.source=files", f"data.path={os.path.join(SAMPLES, 'chat.jsonl')}", "data.format=chat", "data.shuffle=true",
    "train.seq_len=1024", "train.micro_batch_size=1", "train.grad_accum_steps=2", "train.threads=1",
    "train.loss_weighting=sequence", "logging.progress_bar=false",
]


def _cfg(tmp, *overrides):
    return load_validated_config(None, [*TINY, f"train.output_dir={tmp}", f"data.cache_dir={tmp}/cache", *overrides])


def _grads(trainer):
    out = {}
    for name, p in trainer.model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name.replace("_checkpoint_wrapped_module.", "").split("lm.", 1)[-1]] = g.detach().clone()
    return out


def _distributed_step(mesh, cfg):
    from ringtrain.train.trainer import build_trainer

    trainer = build_trainer(cfg, mesh)
    micro = [next(trainer.loader) for _ in range(cfg.train.grad_accum_steps)]
    return trainer.forward_backward(micro), _grads(trainer)


def _reference_step(mesh, cfg, global_batch):
    """One process: the same 4 sequences' conversations, each run alone through the plain HF model."""
    from transformers import AutoModelForCausalLM

    from ringtrain.train.trainer import build_trainer

    trainer = build_trainer(cfg, mesh)
    order = trainer.loader.order(0)[:global_batch]
    batch = trainer.loader.dataset.batch(order)
    lm = trainer.lm
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(lm.config), attn_implementation="eager")
    plain.load_state_dict(lm.state_dict())
    means = []
    for row in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][row].bool()
        for d in batch["document_ids"][row][real].unique().tolist():
            where = (batch["document_ids"][row] == d) & real
            ids, labels = batch["input_ids"][row][where], batch["labels"][row][where]
            if where.nonzero()[0] == 0:
                labels = labels.clone()
                labels[0] = IGNORE_INDEX  # nothing predicts a row's first token
            if not (labels[1:] != IGNORE_INDEX).any():
                continue
            logits = plain(input_ids=ids[None]).logits[0]
            means.append(F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX))
    loss = torch.stack(means).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in plain.named_parameters()}
    return float(loss), grads, len(means)


def test_sequence_weighting_sp2_dp2_accumulation_equals_per_conversation_mean(tmp_path):
    cfg = _cfg(tmp_path / "dist", "parallel.sp_size=2", "parallel.layout=balanced")
    results = run_distributed(_distributed_step, 4, cfg, sp_size=2, timeout=300)
    loss, grads = results[0]
    ref_cfg = _cfg(tmp_path / "ref", "train.fsdp=false", "train.loss_weighting=token")
    ref_loss, ref_grads, n_conversations = run_distributed(_reference_step, 1, ref_cfg, 4, timeout=300)[0]
    assert n_conversations >= 6
    assert math.isclose(loss, ref_loss, rel_tol=1e-5), (loss, ref_loss)
    assert ref_grads.keys() == grads.keys()
    for name, ref in ref_grads.items():
        got = grads[name]
        err = (got - ref).abs().max().item()
        assert err <= 1e-5 * ref.abs().max().item() + 1e-9, f"{name}: {err:.3e} vs {ref.abs().max().item():.3e}"


def test_sequence_weights_sum_to_one_per_document_and_need_documents(tmp_path):
    import pytest

    from ringtrain.data.packing import sequence_token_weights
    from ringtrain.errors import ConfigError

    torch.manual_seed(0)
    labels = torch.randint(3, 300, (2, 12))
    docs = torch.tensor([[0] * 3 + [1] * 7 + [2] * 2, [0] * 12])
    labels[0, 3] = labels[0, 10] = IGNORE_INDEX  # documents' first labels
    labels[0, 5] = IGNORE_INDEX  # a prompt token
    base = torch.rand(2, 12) + 0.5
    w = sequence_token_weights(labels, docs, base)
    for row, d in ((0, 0), (0, 1), (0, 2), (1, 0)):
        where = docs[row] == d
        assert math.isclose(float(w[row][where].sum()), 1.0, rel_tol=1e-6)
    assert w[0, 0] == 0 and w[0, 5] == 0  # a row's first label (shifted away) and ignored labels weigh nothing
    assert math.isclose(float(w[0, 4] / w[0, 6]), float(base[0, 4] / base[0, 6]), rel_tol=1e-6)
    with pytest.raises(ConfigError, match="train.loss_weighting='sequence' averages each document's loss, and "
                                          "data.document_mask=false keeps no documents"):
        _cfg(tmp_path, "data.document_mask=false")
