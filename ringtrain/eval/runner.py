"""Run the evaluation with the sequence-parallel forward: retrieval grids, perplexity, the trainer hook, `ringtrain eval`.

Every rank of an SP group feeds the same full-length batch through `shard_batch` and the ring, so a context that
does not fit one device still runs. Ranks only ever compute on their own shard: hidden states are turned into
logits at the few positions that are scored (the answer digits, or chunked cross-entropy for perplexity), never
as a full [tokens, vocab] tensor. Per-document results are partial sums on each SP rank and disjoint documents
across DP ranks, so one SUM all-reduce over the world completes them all.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ringtrain.config.eval import RETRIEVAL_EVAL_TASKS
from ringtrain.errors import ConfigError
from ringtrain.eval.tasks import EvalDocument, answer_token_hits, eval_documents, exact_match, sliding_windows
from ringtrain.log import get_logger
from ringtrain.model.loss import IGNORE_INDEX
from ringtrain.ring import SequenceParallel

if TYPE_CHECKING:
    from ringtrain.config import TrainConfig
    from ringtrain.parallel.distributed import Mesh
    from ringtrain.train.trainer import Trainer

logger = get_logger(__name__)


# --------------------------------------------------------------------------------------------------
# The sharded forward


def _check_mesh(mesh: Mesh | None) -> None:
    if mesh is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("mesh=None means one process, but torch.distributed runs several ranks: pass the mesh")


def _sp(mesh: Mesh | None, layout: str) -> SequenceParallel:
    """The mesh's sequence parallelism (ring x Ulysses) with `layout`; a world of one without a mesh."""
    return SequenceParallel(layout=layout) if mesh is None else mesh.sequence_parallel(layout)


def _padded_length(n: int, mesh: Mesh | None, layout: str) -> int:
    """`n` rounded up to what the layout can shard; the right padding is masked, so any length can be evaluated."""
    multiple = _sp(mesh, layout).multiple
    return -(-n // multiple) * multiple


def _world_sum(t: torch.Tensor, mesh: Mesh | None, op: Any = None) -> torch.Tensor:
    """Complete per-item results: SP ranks hold partial sums, DP ranks disjoint items (zeros elsewhere)."""
    if mesh is not None and mesh.world_size > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _my_items(n_items: int, mesh: Mesh | None) -> range:
    """Batches this rank's DP group evaluates (round robin); SP ranks of a group take the same ones."""
    if mesh is None:
        return range(n_items)
    return range(mesh.dp_rank, n_items, mesh.dp_size)


def _device(lm: nn.Module, mesh: Mesh | None) -> torch.device:
    return mesh.device if mesh is not None else next(lm.parameters()).device


def _local_hidden(lm: nn.Module, batch: dict[str, torch.Tensor], mesh: Mesh | None, layout: str,
                  device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """This rank's shard of `batch` and the final hidden states of its tokens [B, S_local, d]."""
    from ringtrain.hf import shard_batch

    local = shard_batch(batch, _sp(mesh, layout))
    local = {k: v.to(device) for k, v in local.items()}
    # The decoder stack, not the LM head: logits are only formed where they are scored.
    hidden = lm.get_decoder()(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False)[0]
    return local, hidden


@contextlib.contextmanager
def evaluation_mode(lm: nn.Module, fsdp_root: nn.Module | None = None) -> Iterator[None]:
    """no_grad + eval mode (restored after); with FSDP2, the root unit's parameters (embedding, final norm, LM
    head) are gathered for the duration, because evaluation calls the decoder and the head directly, bypassing
    the root module's forward whose hooks would otherwise gather them. Decoder layers gather themselves."""
    from torch.distributed.fsdp import FSDPModule

    was_training = lm.training
    gathered = isinstance(fsdp_root, FSDPModule)
    lm.eval()
    try:
        with torch.no_grad():
            if gathered:
                fsdp_root.unshard()
            try:
                yield
            finally:
                if gathered:
                    fsdp_root.reshard()
    finally:
        lm.train(was_training)


# --------------------------------------------------------------------------------------------------
# Retrieval (passkey / needle)


def _retrieval_batches(docs: list[EvalDocument], batch_size: int) -> list[list[int]]:
    """Indices of `docs` in batches of one length (one tensor shape per forward)."""
    by_length: dict[int, list[int]] = {}
    for i, d in enumerate(docs):
        by_length.setdefault(len(d.doc.input_ids), []).append(i)
    return [idx[s:s + batch_size] for idx in by_length.values() for s in range(0, len(idx), batch_size)]


def _full_batch(rows: list[list[int]], padded: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, padded] input_ids and attention_mask for token lists."""
    ids = torch.full((len(rows), padded), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), padded), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[b, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _teacher_forced(lm: nn.Module, docs: list[EvalDocument], mesh: Mesh | None, layout: str, pad_id: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward: ([3, B] correct / total / NLL sum over answer tokens, [B, A] predicted ids, -1 where not here)."""
    answer_len = max(d.doc.answer_token_span[1] - d.doc.answer_token_span[0] for d in docs)
    padded = _padded_length(max(len(d.doc.input_ids) for d in docs), mesh, layout)
    batch = _full_batch([d.doc.input_ids for d in docs], padded, pad_id)
    answer = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for b, d in enumerate(docs):
        answer[b, d.doc.answer_token_span[0]:d.doc.answer_token_span[1]] = True
    batch["answer_mask"] = answer  # shard_batch shifts it with the labels: True where the *target* is a digit
    local, hidden = _local_hidden(lm, batch, mesh, layout, device)
    sel = local["answer_mask"]  # [B, S_local]
    rows = sel.nonzero()[:, 0]
    logits = lm.get_output_embeddings()(hidden[sel])  # [N, V]: only the scored positions
    hits, nll = answer_token_hits(logits, local["shift_labels"][sel])
    stats = torch.zeros(3, len(docs), device=device)
    stats[0].index_add_(0, rows, hits.float())
    stats[1].index_add_(0, rows, torch.ones_like(nll))
    stats[2].index_add_(0, rows, nll)
    starts = torch.tensor([d.doc.answer_token_span[0] for d in docs], device=device)
    slot = local["position_ids"][sel] + 1 - starts[rows]  # which answer token each scored position predicts
    preds = torch.full((len(docs), answer_len), -1, dtype=torch.long, device=device)
    preds[rows, slot] = logits.argmax(dim=-1)
    return stats, preds


def _greedy(lm: nn.Module, docs: list[EvalDocument], mesh: Mesh | None, layout: str, pad_id: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode each answer's length in tokens from its prompt, one full sharded forward per token (no KV cache:
    a cache would hold one shard). Returns the same shapes as `_teacher_forced` (NLL is not measured: NaN)."""
    answer_len = max(d.doc.answer_token_span[1] - d.doc.answer_token_span[0] for d in docs)
    # Every row decodes the batch's longest answer: a row whose own answer is shorter (another task, or a key a BPE
    # tokenizer splits into fewer tokens) grows past its document, so size the batch for prompt + answer_len.
    padded = _padded_length(max(len(d.doc.prompt_ids) for d in docs) + answer_len, mesh, layout)
    seqs = [list(d.doc.prompt_ids) for d in docs]
    preds = torch.full((len(docs), answer_len), -1, dtype=torch.long, device=device)
    for k in range(answer_len):
        local, hidden = _local_hidden(lm, _full_batch(seqs, padded, pad_id), mesh, layout, device)
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        sel = local["position_ids"] == last[:, None]  # the rank holding each row's last token predicts the next
        rows = sel.nonzero()[:, 0]
        step = torch.full((len(docs),), -1, dtype=torch.long, device=device)
        step[rows] = lm.get_output_embeddings()(hidden[sel]).argmax(dim=-1)
        step = _sp_max(step, mesh)
        preds[:, k] = step
        for b, s in enumerate(seqs):
            s.append(int(step[b]))
    stats = torch.zeros(3, len(docs), device=device)
    for b, d in enumerate(docs):
        target = d.doc.input_ids[d.doc.answer_token_span[0]:d.doc.answer_token_span[1]]
        got = preds[b, :len(target)].tolist()
        stats[0, b] = sum(int(g == t) for g, t in zip(got, target, strict=True))
        stats[1, b] = len(target)
    stats[2] = float("nan")
    # Every SP rank now holds the complete decode; only SP rank 0 contributes it to the world sum.
    if mesh is not None and mesh.sp_rank != 0:
        stats.zero_()
        preds.fill_(-1)
    return stats, preds


def _sp_max(t: torch.Tensor, mesh: Mesh | None) -> torch.Tensor:
    if mesh is not None and mesh.sp_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.sp_group)
    return t


def evaluate_retrieval(
    lm: nn.Module, tokenizer: Any, docs: list[EvalDocument], *, mesh: Mesh | None = None, layout: str = "zigzag",
    batch_size: int = 4, mode: str = "teacher_forced",
) -> list[dict[str, Any]]:
    """Score each document's answer by exact match; one record per document, identical on every rank.

    `lm` is a transformers causal LM prepared for `mesh` (`apply_ring_attention` with `mesh.sequence_parallel(layout)`; with
    `mesh=None`, one process and any attention). Call it under `evaluation_mode`.
    """
    from ringtrain.data.tokenizer import pad_id_of

    _check_mesh(mesh)
    device = _device(lm, mesh)
    pad_id = pad_id_of(tokenizer)
    answer_len = max(d.doc.answer_token_span[1] - d.doc.answer_token_span[0] for d in docs)
    stats = torch.zeros(3, len(docs), device=device)
    preds = torch.full((len(docs), answer_len), -1, dtype=torch.long, device=device)
    score = _teacher_forced if mode == "teacher_forced" else _greedy
    batches = _retrieval_batches(docs, batch_size)
    for i in _my_items(len(batches), mesh):
        idx = batches[i]
        s, p = score(lm, [docs[j] for j in idx], mesh, layout, pad_id, device)
        stats[:, idx] = s
        preds[idx, :p.shape[1]] = p
    # Unfilled predictions are -1 everywhere, so a MAX completes them like the SUM completes the stats.
    _world_sum(stats, mesh)
    _world_sum(preds, mesh, op=dist.ReduceOp.MAX)
    correct = exact_match(stats[0], stats[1])
    records = []
    for j, d in enumerate(docs):
        n = d.doc.answer_token_span[1] - d.doc.answer_token_span[0]
        pred_ids = [t for t in preds[j, :n].tolist() if t >= 0]
        records.append({
            "task": d.task, "length": d.length, "depth": d.depth, "sample": d.sample, "key": d.doc.key,
            "prediction": tokenizer.decode(pred_ids), "correct": bool(correct[j]),
            "answer_nll": float(stats[2, j] / max(float(stats[1, j]), 1.0)),
        })
    return records


def summarize_retrieval(records: list[dict[str, Any]], lengths: list[int], depths: list[float]) -> dict[str, Any]:
    """Accuracy and mean answer NLL per (depth, length) cell, as [depth][length] grids (the heatmap's layout)."""
    acc = [[math.nan] * len(lengths) for _ in depths]
    nll = [[math.nan] * len(lengths) for _ in depths]
    for i, depth in enumerate(depths):
        for j, length in enumerate(lengths):
            cell = [r for r in records if r["length"] == length and r["depth"] == depth]
            if cell:
                acc[i][j] = sum(r["correct"] for r in cell) / len(cell)
                nll[i][j] = sum(r["answer_nll"] for r in cell) / len(cell)
    by_length = [sum(acc[i][j] for i in range(len(depths))) / len(depths) for j in range(len(lengths))]
    return {"lengths": list(lengths), "depths": list(depths), "accuracy": acc, "answer_nll": nll,
            "accuracy_by_length": by_length, "accuracy_mean": sum(by_length) / len(by_length)}


# --------------------------------------------------------------------------------------------------
# Perplexity


def evaluate_perplexity(
    lm: nn.Module, tokens: np.ndarray, window: int, stride: int, *, mesh: Mesh | None = None,
    layout: str = "zigzag", batch_size: int = 4, loss_chunk_tokens: int = 0,
) -> dict[str, Any]:
    """Perplexity of the token stream `tokens` with `window`-token contexts advancing by `stride` (see
    `sliding_windows`); identical on every rank. Call under `evaluation_mode`."""
    from ringtrain.model.loss import chunked_cross_entropy_sum

    _check_mesh(mesh)
    device = _device(lm, mesh)
    windows = sliding_windows(len(tokens), window, stride)
    padded = _padded_length(window, mesh, layout)
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # NLL sum, scored tokens
    batches = [windows[s:s + batch_size] for s in range(0, len(windows), batch_size)]
    for i in _my_items(len(batches), mesh):
        rows = [tokens[b:e].tolist() for b, e, _ in batches[i]]
        batch = _full_batch(rows, padded, pad_id=0)
        labels = batch["input_ids"].clone()
        for r, (b, e, first) in enumerate(batches[i]):
            labels[r, :first - b] = IGNORE_INDEX  # context only: scored by an earlier window
            labels[r, e - b:] = IGNORE_INDEX
        batch["labels"] = labels
        local, hidden = _local_hidden(lm, batch, mesh, layout, device)
        weight = lm.get_output_embeddings().weight
        totals[0] += chunked_cross_entropy_sum(hidden, weight, local["shift_labels"],
                                               chunk_tokens=loss_chunk_tokens).double()
        totals[1] += (local["shift_labels"] != IGNORE_INDEX).sum()
    _world_sum(totals, mesh)
    nll = float(totals[0] / totals[1])
    return {"length": window, "stride": stride, "tokens": int(totals[1]), "windows": len(windows),
            "nll": nll, "ppl": math.exp(nll)}


def perplexity_tokens(cfg: TrainConfig, tokenizer: Any, mesh: Mesh | None = None) -> np.ndarray:
    """The first `eval.ppl_max_tokens` tokens of the eval text (documents joined with EOS), via the data pipeline."""
    import dataclasses

    from ringtrain.data import load_documents, tokenize_documents
    from ringtrain.data.pipeline import _main_process_first

    e = cfg.eval
    dcfg = dataclasses.replace(cfg.data, source=e.ppl_source, path=e.ppl_path, subset=e.ppl_subset,
                               split=e.ppl_split, text_field=e.ppl_text_field)
    _main_process_first(mesh, before=True)  # rank 0 fills the datasets cache, the others then read it
    try:
        ds = tokenize_documents(load_documents(dcfg), tokenizer, dcfg)
    finally:
        _main_process_first(mesh, before=False)
    out: list[int] = []
    for row in ds:
        out += list(row["input_ids"]) + [tokenizer.eos_token_id]
        if len(out) >= e.ppl_max_tokens:
            break
    return np.asarray(out[:e.ppl_max_tokens], dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# One evaluation of a model: every configured task


class Evaluator:
    """The evaluation of one config: documents and text are prepared once, `run` scores a model on them."""

    def __init__(self, cfg: TrainConfig, tokenizer: Any, mesh: Mesh | None = None):
        e = cfg.eval
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        digits = e.digits or cfg.data.passkey_digits
        self.docs = {task: eval_documents(tokenizer, task, e.lengths, e.depths, e.samples_per_cell, e.seed, digits)
                     for task in e.tasks if task in RETRIEVAL_EVAL_TASKS}
        self.ppl_tokens = perplexity_tokens(cfg, tokenizer, mesh) if "perplexity" in e.tasks else None
        if self.ppl_tokens is not None:
            for window in e.ppl_lengths or e.lengths:
                if len(self.ppl_tokens) < window + 1:
                    logger.warning("perplexity text has %d tokens, fewer than one %d-token window: that length "
                                   "scores only what there is", len(self.ppl_tokens), window)

    def run(self, lm: nn.Module, step: int | None = None, fsdp_root: nn.Module | None = None) -> dict[str, Any]:
        """Results of every task (a JSON-able dict, the same on every rank)."""
        from ringtrain.config import resolve_layout

        e, layout = self.cfg.eval, resolve_layout(self.cfg.parallel, False)  # no documents in evaluation
        rope_type = (getattr(lm.config, "rope_parameters", None) or {}).get("rope_type")
        if rope_type == "dynamic" and len({*e.lengths, *e.ppl_lengths}) > 1:
            # transformers keeps dynamic NTK frequencies of the longest sequence seen until one shorter than the
            # original length arrives: after the first task's longest length, every later score uses those.
            logger.warning("rope_type='dynamic' is stateful in transformers: evaluating several lengths in one run "
                           "scores all but the first task's ascending lengths with the longest length's frequencies; "
                           "evaluate one length per run (eval.lengths=[N]) for per-length numbers")
        t0 = time.perf_counter()
        results: dict[str, Any] = {"step": step, "mode": e.mode, "samples_per_cell": e.samples_per_cell,
                                   "retrieval": {}, "perplexity": [], "documents": []}
        with evaluation_mode(lm, fsdp_root):
            for task, docs in self.docs.items():
                records = evaluate_retrieval(lm, self.tokenizer, docs, mesh=self.mesh, layout=layout,
                                             batch_size=e.batch_size, mode=e.mode)
                results["retrieval"][task] = summarize_retrieval(records, e.lengths, e.depths)
                results["documents"] += records
            if self.ppl_tokens is not None:
                for window in e.ppl_lengths or e.lengths:
                    window = min(window, len(self.ppl_tokens))
                    stride = e.ppl_stride or max(window // 2, 1)
                    results["perplexity"].append(evaluate_perplexity(
                        lm, self.ppl_tokens, window, min(stride, window - 1), mesh=self.mesh, layout=layout,
                        batch_size=e.batch_size, loss_chunk_tokens=self.cfg.train.loss_chunk_tokens))
        results["time_s"] = time.perf_counter() - t0
        return results


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Scalars for metrics.jsonl / W&B. W&B puts each prefix before the first '/' in its own panel section, so the
    headline numbers share one section (eval/<task>/acc, eval/ppl@<length>) and each task's per-length numbers
    another (eval_<task>/acc@<length>, eval_<task>/nll@<length>: mean answer NLL over depths), next to its heatmap
    and table (`ringtrain.eval.report.wandb_eval_media`)."""
    out: dict[str, float] = {}
    for task, r in results["retrieval"].items():
        out[f"eval/{task}/acc"] = r["accuracy_mean"]
        for j, (length, acc) in enumerate(zip(r["lengths"], r["accuracy_by_length"], strict=True)):
            out[f"eval_{task}/acc@{length}"] = acc
            out[f"eval_{task}/nll@{length}"] = sum(row[j] for row in r["answer_nll"]) / len(r["answer_nll"])
    for p in results["perplexity"]:
        out[f"eval/ppl@{p['length']}"] = p["ppl"]
    out["eval/time_s"] = results["time_s"]
    return out


def eval_output_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.eval.output_dir or Path(cfg.train.output_dir) / "eval")


# Evaluators of running trainers: built at the first evaluation, then reused (documents are generated once).
_TRAINER_EVALUATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def evaluate_in_training(trainer: Trainer) -> dict[str, float]:
    """The trainer's hook, called after every optimizer step: {} unless `eval.every_steps` divides the step.

    Collective (every rank calls it at every step). Rank 0 writes the results under
    <eval.output_dir>/step_<N>/ and the returned metrics go into the step's metrics record (and W&B).
    """
    every = trainer.cfg.eval.every_steps
    if not every or trainer.step % every:
        return {}
    from ringtrain.eval.report import format_table, wandb_eval_media, write_results
    from ringtrain.train.metrics import active_wandb_run

    evaluator = _TRAINER_EVALUATORS.get(trainer)
    if evaluator is None:
        evaluator = _TRAINER_EVALUATORS[trainer] = Evaluator(trainer.cfg, trainer.tokenizer, trainer.mesh)
    results = evaluator.run(trainer.lm, step=trainer.step, fsdp_root=trainer.model)
    if trainer.mesh.rank == 0:
        written = write_results(results, eval_output_dir(trainer.cfg) / f"step_{trainer.step:08d}",
                                heatmap=trainer.cfg.eval.heatmap)
        logger.info("evaluation at step %d (%.1fs):\n%s", trainer.step, results["time_s"], format_table(results))
        # The trainer's MetricsLogger is local to Trainer.fit, so the heatmaps and tables reach its W&B run as the
        # process's active run; logged before the trainer logs this step's scalars, W&B merges them into one row.
        run = active_wandb_run()
        if run is not None:
            run.log(wandb_eval_media(results, written), step=trainer.step)
    return flat_metrics(results)


# --------------------------------------------------------------------------------------------------
# `ringtrain eval`


def load_model_for_eval(cfg: TrainConfig, mesh: Mesh | None) -> tuple[nn.Module, int | None]:
    """The model of `cfg` with sequence-parallel attention over the mesh, weights from model.path or eval.checkpoint.

    Returns (model, the checkpoint's step or None). A checkpoint is loaded into an unsharded model: DCP reshards
    the saved FSDP shards into full tensors, so any world size can evaluate it. `mesh=None`: one process on CPU
    with the model's own (sdpa) attention, the reference the sharded evaluation is tested against.
    """
    from ringtrain.config import resolve_layout
    from ringtrain.hf import apply_ring_attention
    from ringtrain.model.causal_lm import build_causal_lm

    lm = build_causal_lm(cfg, torch.device("cpu") if mesh is None else mesh.device)
    step = None
    if cfg.eval.checkpoint:
        from ringtrain.model.causal_lm import CausalLMWithChunkedLoss
        from ringtrain.train.checkpoint import CheckpointManager, is_complete

        manager = CheckpointManager(cfg.checkpoint, cfg.train.output_dir, mesh)
        path = manager.latest() if cfg.eval.checkpoint == "latest" else Path(cfg.eval.checkpoint)
        if path is None:
            raise ConfigError([f"eval.checkpoint='latest' but {manager.root} holds no complete checkpoint: "
                               "train first, or pass a step_* folder"])
        if not is_complete(path):
            raise ConfigError([f"eval.checkpoint={cfg.eval.checkpoint!r} is not a complete checkpoint: pass a "
                               f"step_* folder holding a COMPLETE marker, or 'latest'"])
        # The trainer saves its CausalLMWithChunkedLoss ('lm.'-prefixed names): load through the same wrapper.
        extra = manager.load(path, CausalLMWithChunkedLoss(lm, cfg.train.loss_chunk_tokens), restore_rng=False)
        step = extra.get("step")
    if mesh is not None:
        apply_ring_attention(lm, mesh.sequence_parallel(resolve_layout(cfg.parallel, False), cfg.parallel))
    return lm, step


def run_eval(cfg: TrainConfig) -> dict[str, Any]:
    """The `ringtrain eval` entry point: bootstrap, load, evaluate every task, write results (rank 0), tear down.

    Returns the results (on every rank); rank 0 wrote results.json, the heatmaps and metrics.jsonl (and W&B when
    logging.wandb_mode is not disabled) under `eval_output_dir(cfg)`.
    """
    import dataclasses

    from ringtrain.config import config_to_dict
    from ringtrain.data import build_tokenizer
    from ringtrain.eval.report import format_table, wandb_eval_media, write_results
    from ringtrain.log import setup_logging
    from ringtrain.parallel.distributed import init_distributed, teardown_distributed
    from ringtrain.train.metrics import MetricsLogger

    setup_logging()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    mesh = init_distributed(cfg.parallel)
    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        lm, step = load_model_for_eval(cfg, mesh)
        results = Evaluator(cfg, tokenizer, mesh).run(lm, step=step)
        results["model"] = cfg.model.path or cfg.model.arch
        results["checkpoint"] = cfg.eval.checkpoint
        if mesh.rank == 0:
            out = eval_output_dir(cfg)
            written = write_results(results, out, heatmap=cfg.eval.heatmap)
            logger.info("evaluation (%.1fs), results in %s:\n%s", results["time_s"], out, format_table(results))
            # start_step far ahead: MetricsLogger drops lines past its start step (a resume rule), but lines of
            # earlier evaluations in this folder are history to keep.
            metrics = MetricsLogger(dataclasses.replace(cfg.logging, progress_bar=False), out, enabled=True,
                                    total_steps=0, start_step=2**62, run_config=config_to_dict(cfg))
            try:
                if metrics.wandb_run is not None:  # heatmaps, tables, charts: W&B only (not JSON scalars)
                    metrics.wandb_run.log(wandb_eval_media(results, written), step=step or 0)
                metrics.log(step or 0, flat_metrics(results))
            finally:
                metrics.close()
    except ConfigError as e:
        if e.agreed:  # every rank stops at this same point: a clean exit 2
            teardown_distributed()
        raise
    # Not in a `finally`: teardown waits in a barrier, which a rank that failed alone would hold up until the
    # collective timeout (its peers wait in a collective it never joins). It exits instead; torchrun stops the rest.
    teardown_distributed()
    return results
