"""The benchmark harness every script in scripts/ uses, so their figures are measured and written the same way.

- Timing: `SyncedTimer` times a region with the ranks lined up (a barrier) and the device drained (CUDA synchronize)
  at both ends, in wall seconds and this process's CPU seconds; `measure` runs a callable through it after warm-up.
- Memory: `PeakMemory`, the high-water mark over a region (CUDA allocator counters; on CPU the sampled resident set,
  since the process-wide ru_maxrss cannot be reset); `SentBytes`, what this rank hands to the transports.
- Output: the flags the scripts share (`add_common_flags`), markdown tables, and JSON written atomically and stamped
  with the device, the torch and transformers versions, the host and the date.
- Workloads: the model specs the benchmarks train (`MODEL_SPECS`), and the trainer benchmark's pieces shared by
  several scripts (its config overrides, the plain transformers loop it is compared with, the spawned rank).

No figure is asserted anywhere: benchmarks print what they measure, tests check behaviour.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MIB = 2**20
GIB = 2**30

# ---------------------------------------------------------------------------------------------------------------
# Model specs: transformers Llama config keys, random weights (the benchmarks measure cost, not quality).

MODEL_SPECS: dict[str, dict[str, Any]] = {
    # A smoke run's model: seconds per step on one CPU thread.
    "tiny": {"vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    # The CPU trainer benchmarks' model (20.6M parameters): attention dominates its FLOPs from a few thousand tokens,
    # so ring attention's effect shows at contexts one CPU core can train.
    "20m": {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4},
    # The loading benchmark's models: 14 layers, untied embeddings, so the embedding and LM head are the largest
    # tensors (the ones a loader must not gather whole).
    "25m": {"vocab_size": 8000, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 14,
            "num_attention_heads": 8, "num_key_value_heads": 8},
    "250m": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 14,
             "num_attention_heads": 16, "num_key_value_heads": 16},
    # TinyLlama-1.1B's shape (GQA 32 x 4, head_dim 64): a real fine-tuning target that one GPU holds with AdamW.
    "1b": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4},
}


def model_spec(name: str, max_position_embeddings: int | None = None, **overrides: Any) -> dict[str, Any]:
    """A fresh copy of MODEL_SPECS[name] with overrides, no dropout (timings and losses are deterministic)."""
    if name not in MODEL_SPECS:
        raise KeyError(f"model spec {name!r} is not one of {', '.join(MODEL_SPECS)}")
    spec = {**MODEL_SPECS[name], "attention_dropout": 0.0, **overrides}
    if max_position_embeddings is not None:
        spec["max_position_embeddings"] = max_position_embeddings
    return spec


def meta_model(spec: dict[str, Any], arch: str = "llama") -> torch.nn.Module:
    """The model of `spec` on the meta device (shapes and parameter counts, no memory), built the trainer's way."""
    from ringtrain.config import ModelConfig
    from ringtrain.model.causal_lm import build_meta_model, build_model_config

    cfg = ModelConfig(arch=arch, config=dict(spec))
    return build_meta_model(cfg, build_model_config(cfg), torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Timing.

def sync(device: torch.device | None) -> None:
    """Wait for the device's queued work: CUDA calls return before their kernels finish."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class SyncedTimer:
    """Wall and CPU seconds of regions, synchronised at both ends; one sample per `region()`.

    CPU seconds are this process's, all threads (a transport's worker included): on a shared machine they track the
    work done while wall time also counts the time other jobs held the cores. `barrier` (e.g. dist.barrier) starts
    the ranks together, so the slowest rank's wall time is the step's.
    """

    def __init__(self, device: torch.device | None = None, barrier: Callable[[], Any] | None = None) -> None:
        self.device, self.barrier = device, barrier
        self.wall_s: list[float] = []
        self.cpu_s: list[float] = []

    @contextlib.contextmanager
    def region(self) -> Iterator[None]:
        if self.barrier is not None:
            self.barrier()
        sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        sync(self.device)
        self.wall_s.append(time.perf_counter() - t0)
        self.cpu_s.append(time.process_time() - c0)


@dataclass
class Measurement:
    """What `measure` returns. Lists hold every call, the warm-up calls first; statistics use the timed ones."""

    wall_s: list[float]
    cpu_s: list[float]
    results: list[Any]
    warmup: int
    peak_bytes: int = 0
    """Memory high-water mark over the tracked calls (`PeakMemory.peak`); 0 when memory was not tracked."""
    peak_delta_bytes: int = 0
    """That mark minus the memory in use when tracking began (`PeakMemory.delta`)."""

    @property
    def timed_wall_s(self) -> list[float]:
        return self.wall_s[self.warmup:]

    @property
    def timed_cpu_s(self) -> list[float]:
        return self.cpu_s[self.warmup:]

    def summary(self) -> dict[str, float]:
        """min and median of the timed calls' wall and CPU seconds, and the peak over the start (`mem`)."""
        wall, cpu = self.timed_wall_s, self.timed_cpu_s
        return {"wall": min(wall), "wall_median": statistics.median(wall), "cpu": min(cpu),
                "cpu_median": statistics.median(cpu), "mem": self.peak_delta_bytes}


def measure(fn: Callable[[], Any], *, repeats: int, warmup: int = 0, device: torch.device | None = None,
            barrier: Callable[[], Any] | None = None, memory: bool = True,
            memory_from_warmup: bool = False) -> Measurement:
    """Call `fn` warmup + repeats times, each in a `SyncedTimer` region; keep its results.

    With `memory`, a `PeakMemory` covers the timed calls (or every call with `memory_from_warmup`: the first
    step's one-time allocations, an optimizer's state say, then count). On CPU that samples the resident set from a
    thread, whose CPU time the measured process pays: leave `memory` off where CPU seconds are the figure.
    """
    timer = SyncedTimer(device, barrier)
    results: list[Any] = []
    tracker = PeakMemory(device) if memory else None
    track_from = 0 if memory_from_warmup else warmup
    with contextlib.ExitStack() as stack:
        for i in range(warmup + repeats):
            if tracker is not None and i == track_from:
                stack.enter_context(tracker)
            with timer.region():
                results.append(fn())
    entered = tracker is not None and track_from < warmup + repeats
    return Measurement(timer.wall_s, timer.cpu_s, results, warmup,
                       peak_bytes=tracker.peak if entered else 0, peak_delta_bytes=tracker.delta if entered else 0)


# ---------------------------------------------------------------------------------------------------------------
# Memory and traffic.

def resident_bytes(anonymous: bool = False) -> int:
    """This process's resident set now; `anonymous`: only its own memory (resident minus shared: file-backed pages,
    a memory-mapped checkpoint's among them, and shared memory)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    pages = int(fields[1]) - (int(fields[2]) if anonymous else 0)
    return pages * os.sysconf("SC_PAGE_SIZE")


def pin_malloc_mmap_threshold(threshold: int = 1 << 20) -> None:
    """Serve allocations above `threshold` bytes with mmap, so a freed large buffer leaves the resident set and a
    sampled peak follows live tensors (glibc otherwise keeps freed heap). glibc reads the setting when a process
    starts: it applies to the processes spawned after this call (the ranks), not to the caller. An explicit setting
    in the environment is kept."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(threshold))


class PeakRSS:
    """The peak resident set of this process while active, sampled by a thread every `interval_s` (CPU memory has
    no resettable high-water counter). `anonymous` samples `resident_bytes(anonymous=True)` instead."""

    def __init__(self, interval_s: float = 0.002, anonymous: bool = False) -> None:
        self.interval_s, self.anonymous = interval_s, anonymous
        self.base = self.peak = 0

    def rss(self) -> int:
        return resident_bytes(self.anonymous)

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base


class PeakMemory:
    """The memory high-water mark over a region: `peak` (bytes) and `delta` (peak minus the level at the start).

    CUDA: the caching allocator's live-tensor counters (`max_memory_allocated`, reset at the start). CPU: `PeakRSS`
    (pin the mmap threshold, `pin_malloc_mmap_threshold`, for a peak of live tensors rather than glibc's heap).
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.base = self.peak = 0
        self._rss: PeakRSS | None = None

    def __enter__(self) -> PeakMemory:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self._rss = PeakRSS().__enter__()
            self.base = self._rss.base
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rss is not None:
            self._rss.__exit__(*exc)
            self.peak = self._rss.peak
        else:
            self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def delta(self) -> int:
        return self.peak - self.base


class SentBytes:
    """The bytes this rank sends while active: what it hands to isend inside dist.batch_isend_irecv (the ring) and
    the parts of all_to_all_single buffers bound for other ranks (Ulysses). Counted by wrapping those two torch
    functions, which every ringtrain transport calls through the torch.distributed module."""

    def __enter__(self) -> SentBytes:
        import torch.distributed as dist

        self.total = self.ring = self.all_to_all = 0
        self._p2p, self._a2a = dist.batch_isend_irecv, dist.all_to_all_single

        def counting_p2p(ops: list) -> Any:
            n = sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
            self.ring += n
            self.total += n
            return self._p2p(ops)

        def counting_a2a(output: torch.Tensor, input: torch.Tensor, *args: Any, group: Any = None,
                         **kwargs: Any) -> Any:
            world = dist.get_world_size(group)
            n = input.numel() * input.element_size() * (world - 1) // world  # the own part stays home
            self.all_to_all += n
            self.total += n
            return self._a2a(output, input, *args, group=group, **kwargs)

        dist.batch_isend_irecv, dist.all_to_all_single = counting_p2p, counting_a2a
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        dist.batch_isend_irecv, dist.all_to_all_single = self._p2p, self._a2a


# ---------------------------------------------------------------------------------------------------------------
# Command line, tables, JSON.

def add_common_flags(parser: argparse.ArgumentParser, *, repeats: int | None = None,
                     repeats_flags: Sequence[str] = ("--repeats",), warmup: int | None = None,
                     threads: int | None = None, json_help: str | None = None,
                     quick_help: str | None = None) -> argparse.ArgumentParser:
    """Add the flags the benchmarks share, each only where its default (or help) is given. Destinations: repeats,
    warmup, threads, json (a Path or None), quick. `repeats_flags` keeps the spelling a script's users know
    (--iters, --steps) next to --repeats where that name is free."""
    if repeats is not None:
        parser.add_argument(*repeats_flags, dest="repeats", type=int, default=repeats,
                            help=f"timed repetitions of the measured region (default {repeats})")
    if warmup is not None:
        parser.add_argument("--warmup", type=int, default=warmup,
                            help=f"untimed repetitions before them (default {warmup})")
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads,
                            help=f"torch threads per process (default {threads}; one per rank on a shared CPU "
                                 "keeps ranks from stealing each other's cores)")
    if json_help is not None:
        parser.add_argument("--json", type=Path, metavar="PATH", help=json_help)
    if quick_help is not None:
        parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, pad: bool = False) -> str:
    """A GitHub markdown table; cells are str()'d, so format numbers first. `pad` aligns the columns for reading
    in a terminal (the rendered table is the same)."""
    head = [str(h) for h in header]
    body = [[str(c) for c in row] for row in rows]
    for row in body:
        if len(row) != len(head):
            raise ValueError(f"a row has {len(row)} cells for {len(head)} columns: {row}")
    if not pad:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                          *("| " + " | ".join(row) + " |" for row in body)])
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def device_name(device: torch.device | str | None = None) -> str:
    """The accelerator's name (torch.cuda.get_device_name), or "CPU"."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return "CPU"
    return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "CPU"


def run_stamp(device: torch.device | str | None = None) -> dict[str, Any]:
    """Where and with what a figure was measured: device, torch, transformers, host, date (UTC, ISO 8601), CPUs."""
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return {"device": device_name(device), "torch": torch.__version__, "transformers": transformers_version,
            "host": socket.gethostname(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "cpus": os.cpu_count()}


def write_json(path: str | os.PathLike, data: dict[str, Any], *, stamp: bool = True,
               device: torch.device | str | None = None, default: Callable[[Any], Any] | None = None) -> Path:
    """Write `data` to `path` atomically: into a temporary file in the same folder, then renamed over `path`, so a
    reader, or a run stopped mid-write (a time limit's SIGTERM), sees the previous file or the new one, never half
    of one. `stamp` adds the `run_stamp` fields (the data's own keys win). Returns the path."""
    path = Path(path)
    payload = {**run_stamp(device), **data} if stamp else data
    path.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target (os.replace is atomic within one file system), named per writer, with the usual permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, default=default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------------
# The trainer benchmark's pieces: scripts/bench_train.py, bench_gpu.py and validate_plan.py run them.

def seeded_tokens(seq_len: int, vocab: int, seed: int = 1) -> torch.Tensor:
    """[1, seq_len] random token ids, the same for every configuration of a run (so their losses compare)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, seq_len), generator=g)


def trainer_overrides(spec: dict[str, Any], sp_size: int, out: str) -> list[str]:
    """The trainer config of one benchmark configuration. `spec`: model (config keys), seq_len, layout, ac (the
    activation_checkpointing policy), loss_chunk (0: the default) and extra `overrides`."""
    return [
        "model.arch=llama", f"model.config={json.dumps(spec['model'])}",
        f"parallel.sp_size={sp_size}", f"parallel.layout={spec['layout']}",
        # The data pipeline is built (build_trainer always does) but bypassed: two passkey documents.
        "data.source=passkey", "data.num_samples=2",
        f"train.seq_len={spec['seq_len']}", "train.micro_batch_size=1",
        f"train.activation_checkpointing={str(spec['ac']).lower()}",
        *([f"train.loss_chunk_tokens={spec['loss_chunk']}"] if spec.get("loss_chunk") else []),
        "train.seed=0", f"train.output_dir={out}", "train.max_steps=1000",
        "optim.warmup_steps=0", "optim.schedule=constant", "logging.progress_bar=false",
        *spec.get("overrides", []),
    ]


def plain_model(spec: dict[str, Any], dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The plain transformers loop's model and AdamW: the weights build_trainer draws (its builder without the
    parallelism: the random init does not depend on how the model is sharded), sdpa attention."""
    from ringtrain.config import OptimConfig
    from ringtrain.model.causal_lm import DTYPES, build_causal_lm
    from ringtrain.train.optim import build_optimizer
    from ringtrain.validate import load_validated_config

    dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
    cfg = load_validated_config(None, [*trainer_overrides(spec, 1, "unused"), f"model.dtype={dtype_name}"])
    model = build_causal_lm(cfg, device)
    model.set_attn_implementation("sdpa")
    model.train()
    return model, build_optimizer(model, OptimConfig(warmup_steps=0, schedule="constant"))


def plain_step(model: torch.nn.Module, optimizer: Any, ids: torch.Tensor) -> float:
    """One step of the plain loop: transformers' loss on full logits, backward, clip, AdamW. Returns the loss."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _memory_now() -> dict[str, int]:
    from ringtrain.train.trainer import peak_memory_bytes

    return {"rss": resident_bytes(), "hwm": peak_memory_bytes(torch.device("cpu"))}


def run_steps(build: Callable[[], Callable[[], float]], steps: int,
              barrier: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Build a loop (`build()` returns its step function, which returns the loss), then time `steps` steps on CPU,
    in a fresh process per configuration (a process's CPU peak memory cannot be reset).

    Returns start / built / end: memory at the start, once built and at the end ({"rss": resident now, "hwm": the
    process's high-water mark}); records: per step wall_s, cpu_s and loss; cpu_total_s: CPU seconds of it all.
    """
    c_start = time.process_time()
    start = _memory_now()
    step = build()
    built = _memory_now()
    m = measure(step, repeats=steps, barrier=barrier, memory=False)  # CPU seconds are a figure: no sampler thread
    records = [{"wall_s": w, "cpu_s": c, "loss": loss} for w, c, loss in zip(m.wall_s, m.cpu_s, m.results,
                                                                            strict=True)]
    return {"start": start, "built": built, "end": _memory_now(), "records": records,
            "cpu_total_s": time.process_time() - c_start}


def ringtrain_rank(dims: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """A spawned rank (`ringtrain.testing.run_distributed`): the real Trainer, fed the same synthetic sequence every
    step through `train_step`, fp32, one thread; spec['steps'] steps, the ranks starting each after a barrier."""
    import itertools
    import warnings

    import torch.distributed as dist

    from ringtrain.train.trainer import build_trainer
    from ringtrain.validate import load_validated_config

    # The trainer calls a name transformers deprecates (reported upstream); keep the benchmark's output readable.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
    with tempfile.TemporaryDirectory() as out:
        def build() -> Callable[[], float]:
            cfg = load_validated_config(None, [*trainer_overrides(spec, dims.sp_size, out), "model.dtype=float32",
                                               "train.threads=1"])
            trainer = build_trainer(cfg, dims)
            # The loader, bypassed: every rank of the SP group gets the same full sequence, as the loader would give.
            trainer.loader = itertools.repeat({"input_ids": seeded_tokens(spec["seq_len"],
                                                                          spec["model"]["vocab_size"])})
            dist.barrier()
            return lambda: trainer.train_step()["loss"]

        return run_steps(build, spec["steps"], barrier=dist.barrier)
