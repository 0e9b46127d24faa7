"""The training loop: sequence-parallel forward/backward, chunked loss, FSDP2, checkpoints, metrics."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ringtrain.config.train import NONFINITE_ACTIONS, NONFINITE_FRACTION_FROM_STEP, TrainLoopConfig
from ringtrain.errors import ConfigError, RunStopped
from ringtrain.log import describe_exception, get_logger, setup_logging
from ringtrain.model.build import all_reduce_gradients
from ringtrain.model.causal_lm import CausalLMWithChunkedLoss
from ringtrain.model.flops import model_flops_per_token
from ringtrain.model.loss import count_valid_tokens

if TYPE_CHECKING:
    from ringtrain.config import TrainConfig
    from ringtrain.parallel.dims import ParallelDims
    from ringtrain.parallel.signals import SignalFlag

__all__ = ["NONFINITE_ACTIONS", "CausalLMWithChunkedLoss", "TrainLoopConfig", "Trainer", "build_trainer", "train"]

logger = get_logger(__name__)

# Written into train.output_dir by rank 0 when the run stops on a signal after saving (exit 75): launchers read it,
# since torchrun reports any rank's non-zero exit as 1 (launch/slurm/train.sbatch requeues on it).
STOP_RECORD = "stopped.json"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Trainer:
    """One training run. Build it with `build_trainer`; `fit()` runs to max_steps or to a stop signal."""

    def __init__(self, cfg: TrainConfig, dims: ParallelDims, model: CausalLMWithChunkedLoss,
                 lm: nn.Module, tokenizer: Any, loader: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                 checkpoints: Any, flops_per_token: float, reference: Any = None):
        self.cfg, self.dims, self.model, self.lm, self.tokenizer = cfg, dims, model, lm, tokenizer
        self.loader, self.optimizer, self.scheduler, self.checkpoints = loader, optimizer, scheduler, checkpoints
        self.flops_per_token = flops_per_token
        self.reference = reference
        """train.objective=dpo: the reference model's log-probabilities (`ringtrain.train.preference.Reference`)."""
        self.preference_metrics: dict[str, float] = {}
        """The last step's rewards and accuracy with a preference objective."""
        from ringtrain.train.metrics import peak_tflops

        name = torch.cuda.get_device_name(dims.device) if dims.device.type == "cuda" else None
        self.peak_tflops = peak_tflops(cfg.logging, name)
        self.step = 0
        self.wandb_run_id: str | None = None
        self.aux_loss: float | None = None
        """The last step's MoE balancing loss (unweighted, mean over micro-batches); None for a dense model."""
        self.stopped_by_signal: int | None = None
        self.skipped_steps = 0  # steps whose update a non-finite loss or gradient norm skipped, across resumes
        self.skipped_in_a_row = 0
        self.source_tokens: dict[str, int] = {}  # data.sources: tokens seen per source, across resumes

    # -- state ---------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"step": self.step, "data": self.loader.state_dict(), "wandb_run_id": self.wandb_run_id,
                "skipped_steps": self.skipped_steps, "skipped_in_a_row": self.skipped_in_a_row,
                "source_tokens": self.source_tokens}

    def resume(self) -> Path | None:
        """Continue the checkpoint checkpoint.resume names under this config's settings (collective).

        Returns the checkpoint loaded, or None for a fresh start. Settings it cannot follow (global batch, model
        shape, data position) raise ConfigError on every rank before any step: see train/checkpoint/resume.py.
        """
        from ringtrain.train.checkpoint import apply_resumed_settings, model_shapes, resume_problems

        shapes = model_shapes(self.model)
        resumed = self.checkpoints.resume(
            self.model, self.optimizer, self.scheduler,
            check=lambda path, meta: [*resume_problems(path, meta, self.cfg, self.dims.dp_size, shapes),
                                      *self.fingerprint_problems(path, meta)])
        if resumed is None:
            return None
        path, extra, meta = resumed
        changes = self.fingerprint_changes(meta)
        if changes:  # allowed by checkpoint.data_change_intended, or fingerprint_problems would have refused it
            logger.warning("resume at step %d: %s since checkpoint %s, as checkpoint.data_change_intended=true allows: "
                           "the data order restarts from its beginning", extra["step"], "; ".join(changes), path)
        else:
            try:
                self.loader.load_state_dict(extra["data"])
            except ValueError as err:  # the same on every rank: the loader state and the dataset are
                raise ConfigError([f"checkpoint {path}: {err}"], agreed=True) from None
        self.step = extra["step"]
        self.wandb_run_id = extra.get("wandb_run_id")
        forked = path.resolve().parent != self.checkpoints.root.resolve()
        if forked and self.wandb_run_id and not self.cfg.logging.wandb_continue_fork:
            logger.info("resumed from %s, a checkpoint of another run folder: this run starts a new W&B run "
                        "(logging.wandb_continue_fork=true would log into its run %s)", path, self.wandb_run_id)
            self.wandb_run_id = None
        self.skipped_steps = extra.get("skipped_steps", 0)
        self.skipped_in_a_row = extra.get("skipped_in_a_row", 0)
        self.source_tokens = dict(extra.get("source_tokens") or {})
        self.scheduler = apply_resumed_settings(meta, self.cfg, self.optimizer, self.step)
        logger.info("resumed from %s at step %d", path, self.step)
        return path

    def fingerprint_changes(self, meta: dict[str, Any]) -> list[str]:
        """How this run's data and tokenizer differ from those checkpoint `meta` was trained on (ringtrain.data.
        fingerprint); empty when they do not, or when the checkpoint predates fingerprints."""
        from ringtrain.data.fingerprint import data_changes, tokenizer_changes

        saved, now = meta.get("fingerprints"), self.checkpoints.run_meta.get("fingerprints")
        if not saved or not now:
            return []
        return [*tokenizer_changes(saved["tokenizer"], now["tokenizer"]), *data_changes(saved["data"], now["data"])]

    def fingerprint_problems(self, path: Path, meta: dict[str, Any]) -> list[str]:
        """A resume on other data or through another tokenizer, refused unless checkpoint.data_change_intended."""
        from ringtrain.config import config_to_dict
        from ringtrain.train.checkpoint import changed_settings

        changes = self.fingerprint_changes(meta)
        if not changes or self.cfg.checkpoint.data_change_intended:
            return []
        keys = [f"{k} {a} -> {b}" for k, a, b in changed_settings(meta.get("config") or {}, config_to_dict(self.cfg))
                if k.startswith("data.") and k != "data.tokenizer" or k == "train.seq_len"] if meta.get("config") else []
        why = f" (changed: {', '.join(keys)})" if keys else ""
        return [f"the data or tokenizer differ from checkpoint {path}: {'; '.join(changes)}{why}: resume on the data "
                "and data.tokenizer it was trained on, or set checkpoint.data_change_intended=true to continue on these "
                "(the data order then restarts from its beginning)"]

    def check_parameters_finite(self, doing: str) -> None:
        """Raise RunStopped on every rank if any parameter holds a NaN or inf: such weights are never saved or
        exported (collective: each rank checks its shards)."""
        bad = first_nonfinite_parameter(self.model)
        names: list[str | None] = [None] * self.dims.world_size
        dist.all_gather_object(names, bad)
        bad = next((n for n in names if n), None)
        if bad is not None:
            last = self.checkpoints.latest()
            raise RunStopped(f"the parameters are not finite at step {self.step} ({bad} first): not {doing}; resume "
                             f"from {f'the last checkpoint {last}' if last else 'the start'} with a lower optim.lr")

    def save(self) -> None:
        from ringtrain.config import config_to_dict

        self.check_parameters_finite("saving a checkpoint")
        # The config goes into meta.json: a resume compares it with the config it is given (checkpoint/resume.py).
        meta = {"config": config_to_dict(self.cfg)}
        if self.cfg.peft.enabled:  # the checkpoint holds what trains: the frozen weights are this base model's
            from ringtrain.model.adapters import base_identity

            meta["base_model"] = base_identity(self.cfg.model, self.cfg.train.seed)
        self.checkpoints.save(self.step, self.model, self.optimizer, self.scheduler, self.extra_state(), meta=meta)

    # -- one optimizer step --------------------------------------------------------------------------
    def forward_backward(self, micro: list[dict[str, torch.Tensor]]) -> float:
        """Accumulate the gradient of the step's loss over `micro` (full-sequence batches): the global mean token loss,
        or with a preference objective the mean pair loss (`ringtrain.train.preference`).

        Returns that loss. Gradients end up summed over the whole mesh (FSDP reduce-scatter, or an
        all-reduce without FSDP), so they equal the single-process gradient of the same global batch. An MoE model's
        balancing loss joins the objective (not the returned loss); its value is left in `aux_loss`.
        """
        from ringtrain.hf import shard_batch

        tcfg, dims = self.cfg.train, self.dims
        dcfg = self.cfg.data
        if tcfg.loss_weighting == "sequence":
            # Per-label weights from the full sequence's documents, before sharding: each document then sums to 1 and
            # the global normaliser below counts documents, so the loss is the mean of the documents' mean losses.
            micro = [with_sequence_weights(b) for b in micro]
        local = [shard_batch(b, self.dims.sp,
                             document_positions=dcfg.document_positions if dcfg.document_mask else "global")
                 for b in micro]
        self._aux_sum = torch.zeros((), device=dims.device)
        if tcfg.objective != "sft":
            from ringtrain.train.preference import num_responses, preference_forward_backward

            loss, self.preference_metrics = preference_forward_backward(
                self.model, self.reference, dims, tcfg, local, [num_responses(b["response_ids"]) for b in micro],
                self.with_balancing)
        else:
            loss = self.token_forward_backward(local)
        if not tcfg.fsdp:
            all_reduce_gradients(self.model, dims)
        if self.model.balancing is not None:
            dist.all_reduce(self._aux_sum)
            self.aux_loss = self._aux_sum.item() / len(local)
        return loss

    def with_balancing(self, objective: torch.Tensor, n_micro: int) -> torch.Tensor:
        """`objective` plus an MoE model's balancing loss of the micro-batch just run (unchanged for a dense model):
        its formula is a mean over the batch's tokens, so counts are summed over the whole mesh first
        (ringtrain.model.moe); the model's own weight, averaged over the `n_micro` micro-batches."""
        balancing = self.model.balancing
        if balancing is None:
            return objective
        aux = balancing.local_part(self.model.router_stats)
        self._aux_sum += aux.detach()
        return objective + balancing.coef / n_micro * aux

    def token_forward_backward(self, local: list[dict[str, Any]]) -> float:
        """train.objective=sft on the sharded micro-batches: the global mean token loss, its gradient accumulated."""
        dims, dcfg = self.dims, self.cfg.data
        # Normalise by the valid tokens of the whole step (all micro-batches, SP and DP ranks), so the
        # gradient is that of the mean token loss over the global batch, whatever the mesh or accumulation.
        weights = [b.get("token_weights") for b in local]
        n_local = sum(count_valid_tokens(b["shift_labels"], w) for b, w in zip(local, weights, strict=True))
        n_global = n_local.detach().clone().to(dims.device)
        dist.all_reduce(n_global)
        n_global = n_global.clamp(min=1.0)
        loss_sum = torch.zeros((), device=dims.device)
        for i, batch in enumerate(local):
            if self.cfg.train.fsdp:
                # Reduce-scatter once, after the last micro-batch; earlier ones accumulate locally.
                self.model.set_requires_gradient_sync(i == len(local) - 1)
            # With data.document_mask, attention stays inside each packed document.
            docs = batch.get("documents") if dcfg.document_mask else None
            part = self.model(
                batch["input_ids"].to(dims.device), batch["position_ids"].to(dims.device),
                batch["shift_labels"].to(dims.device),
                None if weights[i] is None else weights[i].to(dims.device), docs,
            )
            self.with_balancing(part / n_global, len(local)).backward()
            loss_sum += part.detach()
        dist.all_reduce(loss_sum)
        return (loss_sum / n_global).item()

    def train_step(self) -> dict[str, float]:
        tcfg, dims = self.cfg.train, self.dims
        t0 = time.perf_counter()
        micro, counts = [], {}
        for _ in range(tcfg.grad_accum_steps):
            micro.append(next(self.loader))
            # data.sources: each source's tokens in this global batch (a loader of another kind counts none).
            for name, n in getattr(self.loader, "last_source_tokens", dict)().items():
                counts[name] = counts.get(name, 0) + n
        loss = self.forward_backward(micro)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        # The norm of what trains (with LoRA: the adapters and peft.trainable_modules; frozen weights have no grad).
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], max_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        # Loss and gradient norm are reduced over the world: every rank skips (and gives up) at the same step.
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            what = describe_nonfinite(loss, grad_norm)
            if tcfg.on_nonfinite == "stop":
                raise RunStopped(f"step {self.step + 1}: {what} (train.on_nonfinite=stop): lower optim.lr, or set "
                                 "train.on_nonfinite=skip to skip such steps")
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
            logger.warning("step %d: %s: update skipped (%d in a row, %d of %d steps so far)", self.step + 1, what,
                           self.skipped_in_a_row, self.skipped_steps, self.step + 1)
        else:
            self.skipped_in_a_row = 0
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - t0
        tokens = tcfg.micro_batch_size * tcfg.seq_len * tcfg.grad_accum_steps * dims.dp_size
        tflops = tokens * self.flops_per_token / dt / dims.world_size / 1e12
        record = {
            "loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": int(skipped),
            "tokens_per_s": tokens / dt, "tokens_per_s_per_gpu": tokens / dt / dims.world_size,
            "tflops_per_gpu": tflops, "step_time_s": dt, "seq_len": tcfg.seq_len,
            "peak_memory_gib": peak_memory_bytes(dims.device) / 2**30,
        }
        if self.peak_tflops:
            record["mfu"] = tflops / self.peak_tflops
        if self.aux_loss is not None:
            record["aux_loss"] = self.aux_loss
        record.update(self.preference_metrics)
        # data.sources: each source's tokens in this step's global batch and since the run began (padding excluded).
        for name, count in counts.items():
            self.source_tokens[name] = self.source_tokens.get(name, 0) + count
            record[f"tokens/{name}"] = count
            record[f"tokens_seen/{name}"] = self.source_tokens[name]
        return record

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self, signals: SignalFlag | None = None) -> list[dict[str, float]]:
        """Train from the resumed step to train.max_steps, or until a signal stops every rank (collective).

        `signals`: the flag `train` installed before building (a signal during the build is then a stop request
        too); without one, fit installs its own.
        """
        from ringtrain.config import config_to_dict, save_config
        from ringtrain.eval import evaluate_in_training
        from ringtrain.parallel.agree import agree
        from ringtrain.parallel.signals import SignalFlag
        from ringtrain.train.metrics import MetricsLogger

        if signals is None:
            with SignalFlag(enabled=self.cfg.checkpoint.save_on_signal) as own:
                return self.fit(own)
        tcfg = self.cfg.train
        resumed = self.resume()
        # From here the run starts: its folder holds it alone, and config.yaml records what it runs (a refused
        # resume above leaves both as they were).
        self.checkpoints.begin(resumed)
        if self.dims.rank == 0:
            save_config(self.cfg, Path(tcfg.output_dir) / "config.yaml")
            (Path(tcfg.output_dir) / STOP_RECORD).unlink(missing_ok=True)  # an earlier life's
        metrics = MetricsLogger(
            self.cfg.logging, tcfg.output_dir, enabled=self.dims.rank == 0, total_steps=tcfg.max_steps,
            start_step=self.step, run_config=config_to_dict(self.cfg), wandb_run_id=self.wandb_run_id,
        )
        # Only rank 0 talks to W&B, but the id goes into every rank's (identical) checkpoint state.
        self.wandb_run_id = agree(lambda: metrics.wandb_run_id, what="starting the metrics logger")
        history = []
        try:
            while self.step < tcfg.max_steps:
                # Polled before each step: a signal during the last one lets the run finish (save, export, exit 0).
                signum = signals.agreed(self.dims)
                if signum:
                    self.stopped_by_signal = signum
                    break
                record = self.train_step()
                record.update(evaluate_in_training(self))  # {} unless eval.every_steps divides the step
                history.append(record)
                metrics.log(self.step, record)
                verdict = nonfinite_verdict(tcfg, self.step, self.skipped_steps, self.skipped_in_a_row)
                if verdict:
                    last = self.checkpoints.latest()
                    raise RunStopped(f"{verdict}: the run has diverged; stopping without saving. Lower optim.lr (or "
                                     "raise optim.warmup_steps, set optim.grad_clip) and resume from "
                                     f"{f'the last checkpoint {last}' if last else 'the start'}")
                # The last step's checkpoint is the final one, saved below.
                if self.checkpoints.should_save(self.step) and self.step < tcfg.max_steps:
                    self.save()
        finally:
            metrics.close()
        if self.stopped_by_signal is not None:
            if self.step > 0:  # step 0 of a fresh run: nothing to save
                self.save()
            if self.dims.rank == 0:  # what a launcher sees of the ranks' exit 75 (torchrun reports it as 1)
                (Path(tcfg.output_dir) / STOP_RECORD).write_text(json.dumps({
                    "exit_code": 75, "step": self.step, "signal": self.stopped_by_signal,
                    "checkpoint": str(self.checkpoints.latest()) if self.step > 0 else None}) + "\n")
            logger.warning("stopped at step %d after a signal (%d step(s) skipped as non-finite); resume with "
                           "checkpoint.resume=auto", self.step, self.skipped_steps)
        else:
            self.save()
            if self.cfg.checkpoint.export_final:
                self.export(Path(tcfg.output_dir) / "final_model")
        if history:
            logger.info("done: step %d/%d, loss %.4f -> %.4f, %d step(s) skipped as non-finite; run folder %s",
                        self.step, tcfg.max_steps, history[0]["loss"], history[-1]["loss"], self.skipped_steps,
                        tcfg.output_dir)
        return history

    def export(self, out_dir: Path, max_shard_bytes: int | None = None) -> None:
        """Write the trained weights as a plain HF folder (sharded safetensors, config, tokenizer) that
        `from_pretrained` loads; collective, and no rank gathers the model (`ringtrain.model.weights.export_hf_folder`).
        With peft.method=lora: a peft adapter folder instead, and with checkpoint.export_merged the merged model in
        `<out_dir>_merged` (`ringtrain.model.adapters`)."""
        from ringtrain.model.weights import EXPORT_SHARD_BYTES, export_hf_folder

        self.check_parameters_finite("exporting the model")
        shard_bytes = max_shard_bytes or EXPORT_SHARD_BYTES
        # Recorded in the folder: which step of which run it holds.
        latest = self.checkpoints.latest()
        record = {"step": self.step, "max_steps": self.cfg.train.max_steps, "run_id": self.checkpoints.run_id,
                  "checkpoint": str(latest) if latest else None}
        if not self.cfg.peft.enabled:
            try:
                export_hf_folder(self.lm, out_dir, self.tokenizer, shard_bytes, record=record)
            except BaseException as err:  # noqa: BLE001 - a full disk is one line; anything else goes on up
                from ringtrain.errors import DiskFull
                from ringtrain.train.checkpoint.files import disk_full

                free = disk_full(err, out_dir.parent)
                if free is None:
                    raise
                raise DiskFull(f"no space left on device exporting the model to {out_dir} ({free} bytes free): free "
                               "space, then run again to export it (the final checkpoint is saved)") from None
            return
        from ringtrain.model.adapters import base_identity, export_adapter, merged_state

        export_adapter(self.lm, self.cfg.peft, out_dir, base_identity(self.cfg.model, self.cfg.train.seed),
                       self.cfg.model.path, self.tokenizer)
        if self.cfg.checkpoint.export_merged:
            export_hf_folder(self.lm, out_dir.with_name(out_dir.name + "_merged"), self.tokenizer, shard_bytes,
                             state=merged_state(self.lm), record=record)


def with_sequence_weights(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` with `token_weights` that weigh each document's mean loss equally (train.loss_weighting=sequence)."""
    from ringtrain.data.packing import sequence_token_weights

    weights = sequence_token_weights(batch["labels"], batch["document_ids"], batch.get("token_weights"))
    return {**batch, "token_weights": weights}


def describe_nonfinite(loss: float, grad_norm: float) -> str:
    """What was not finite in a step: 'non-finite gradient norm (inf); the loss 5.95 is finite', ..."""
    if not math.isfinite(loss) and not math.isfinite(grad_norm):
        return f"non-finite loss ({loss}) and gradient norm ({grad_norm})"
    if not math.isfinite(loss):
        return f"non-finite loss ({loss}); the gradient norm {grad_norm:.4g} is finite"
    return f"non-finite gradient norm ({grad_norm}); the loss {loss:.4g} is finite"


def nonfinite_verdict(cfg: TrainLoopConfig, step: int, skipped: int, in_a_row: int) -> str | None:
    """Why a run that skipped `skipped` of its `step` steps (the last `in_a_row` in a row) must give up; None to go on.

    train.max_nonfinite_steps consecutive skipped steps, or more than train.max_nonfinite_fraction of the steps
    (judged from NONFINITE_FRACTION_FROM_STEP on: earlier one bad batch is already a large fraction).
    """
    if cfg.on_nonfinite != "skip" or not skipped:
        return None
    if cfg.max_nonfinite_steps and in_a_row >= cfg.max_nonfinite_steps:
        return (f"steps {step - in_a_row + 1}-{step} were all skipped for a non-finite loss or gradient norm "
                f"(train.max_nonfinite_steps={cfg.max_nonfinite_steps})")
    if step >= NONFINITE_FRACTION_FROM_STEP and skipped > cfg.max_nonfinite_fraction * step:
        return (f"{skipped} of {step} steps were skipped for a non-finite loss or gradient norm, more than "
                f"train.max_nonfinite_fraction={cfg.max_nonfinite_fraction}")
    return None


def first_nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter of `model` whose local values (this rank's shard) hold a NaN or inf."""
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if not torch.isfinite(local.detach()).all():
            return name
    return None


def build_trainer(cfg: TrainConfig, dims: ParallelDims, run_id: str | None = None) -> Trainer:
    """Assemble a Trainer: the model (the builder eval shares), optimizer, data, checkpoints (`run_id`: the run
    holding the folder's lock, see check_before_training)."""
    from ringtrain.data import build_dataloader, build_tokenizer
    from ringtrain.data.fingerprint import data_fingerprint, tokenizer_fingerprint
    from ringtrain.model.build import build_model
    from ringtrain.train.checkpoint import CheckpointManager
    from ringtrain.train.optim import build_optimizer, build_scheduler
    from ringtrain.train.preference import build_reference

    tcfg = cfg.train
    from ringtrain.data.tokenizer import tokenizer_name

    tokenizer_id = tokenizer_name(cfg.data.tokenizer, cfg.model.path)  # 'auto': the model's own
    tokenizer = build_tokenizer(tokenizer_id)
    # Parallelised on the meta device, then each rank materialises and loads only its shards.
    model = build_model(cfg, dims, "train")
    lm = model.lm
    flops_per_token = model_flops_per_token(lm, tcfg.seq_len)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, tcfg.max_steps)
    loader = build_dataloader(cfg.data, seq_len=tcfg.seq_len, batch_size=tcfg.micro_batch_size, dims=dims,
                              tokenizer=tokenizer)
    # What the run trains on, recorded in every checkpoint: a resume on other data or tokens is refused.
    fingerprints = {"data": data_fingerprint(cfg.data, loader.dataset),
                    "tokenizer": tokenizer_fingerprint(tokenizer_id, tokenizer)}
    checkpoints = CheckpointManager(cfg.checkpoint, tcfg.output_dir, dims, run_id=run_id,
                                    run_meta={"fingerprints": fingerprints})
    reference = build_reference(cfg, dims, model)  # DPO's; None for the other objectives
    return Trainer(cfg, dims, model, lm, tokenizer, loader, optimizer, scheduler, checkpoints, flops_per_token,
                   reference)


def train(cfg: TrainConfig) -> Trainer:
    """The `ringtrain train` entry point: bootstrap, check the paths, build, fit, tear down."""
    from ringtrain.parallel.distributed import init_distributed, teardown_distributed
    from ringtrain.parallel.signals import SignalFlag
    from ringtrain.train.preflight import check_before_training
    from ringtrain.train.runlock import RunLock

    setup_logging()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dims = init_distributed(cfg.parallel, document_mask=cfg.data.document_mask)
    # Installed before anything slow: a signal while the model and data are built is a stop request too.
    run_id, rank = None, dims.rank
    with SignalFlag(enabled=cfg.checkpoint.save_on_signal) as signals:
        try:
            run_id = check_before_training(cfg, dims)  # the run folder is this run's from here on
            trainer = build_trainer(cfg, dims, run_id)
            trainer.fit(signals)
        except ConfigError as e:
            if e.agreed:  # every rank stops at this same point: a clean exit 2
                teardown_distributed()
            raise
        except RunStopped:  # every rank stops at this same step (its reason is agreed): one line, exit 1
            teardown_distributed()
            raise
        except BaseException as e:
            # One line naming this rank, whatever was raised (torch's CheckpointException and KeyboardInterrupt
            # are BaseExceptions). On a survivor a collective error (gloo "Connection closed by peer", a timeout
            # after parallel.timeout_s) means another rank died or hung first: torchrun's summary ("Root Cause")
            # names that rank.
            logger.error("rank %d failed: %s", dims.rank, describe_exception(e))
            # No destroy_process_group here: with a hung peer it blocked ~30 s more (gloo), and NCCL's can
            # block on a failed communicator. The process is exiting; the OS closes its sockets.
            raise
        finally:
            if run_id is not None and rank == 0:  # dims.rank needs the process group, perhaps torn down by now
                RunLock(Path(cfg.train.output_dir), run_id).release()
    teardown_distributed()
    return trainer
