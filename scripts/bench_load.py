"""Host memory of building the trainer from a saved model, per rank, and of exporting it.

Saves a ~250M-parameter Llama (fp32 safetensors, 1 GB) once under --dir, then for each loader and world size spawns
that many gloo ranks (--threads each) that build the trainer with `build_trainer` (FSDP2 over the world) and report
their peak resident memory over a baseline taken just before the build:

    python scripts/bench_load.py                       # loaders slices, broadcast, every-rank; worlds 1, 2, 4
    python scripts/bench_load.py --quick               # a 25M model: a smoke run

Loaders, each through the package's public functions:
- slices (the default path): meta-device model, FSDP2, then each rank reads its slice of every tensor (DCP plans
  it, `ringtrain.model.weights.SliceReader` reads it with positioned reads); this run also re-reads the weights into
  the built model (phase "read") and exports it (`Trainer.export`);
- mmap-slices: phase "read" only, the same re-read through DCP's stock HuggingFaceStorageReader (safetensors' memory
  map): what SliceReader replaces, on the same shards;
- broadcast: the fallback for folders that cannot be read by slices, taken as a user meets it: the same weights
  saved as pytorch_model.bin; rank 0 runs from_pretrained and set_model_state_dict(broadcast_from_rank0=True) sends
  one tensor at a time;
- every-rank (for comparison): from_pretrained on every rank, then FSDP2 shards it (`ringtrain.model.build.apply_fsdp`);
- random: model.arch with the same shape, the module-by-module random init.

Memory: resident set size sampled every 2 ms from /proc/self/statm (`ringtrain.bench.PeakRSS`), with glibc's mmap
threshold pinned so freed large buffers leave the RSS. RSS counts the pages of memory-mapped safetensors files a rank
touched (file-backed, shared with the page cache) as well as its own (anonymous) memory; both are reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ringtrain.bench import (
    MIB,
    PeakRSS,
    SyncedTimer,
    add_common_flags,
    markdown_table,
    meta_model,
    model_spec,
    pin_malloc_mmap_threshold,
    write_json,
)
from ringtrain.testing import run_distributed

LOADERS = ("slices", "mmap-slices", "broadcast", "every-rank", "random")


def save_model(folder: Path, spec: dict) -> int:
    """The model's bytes; saved once (fp32 safetensors) and reused."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**spec)
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return 4 * sum(p.numel() for p in meta_model(spec).parameters())


def save_bin_copy(folder: Path) -> Path:
    """The same weights as pytorch_model.bin (no safetensors), which the loader cannot read by slices; saved once."""
    from transformers import AutoModelForCausalLM

    out = folder.with_name(folder.name + "_bin")
    if not (out / "pytorch_model.bin").exists():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.config.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out


def every_rank_build(cfg: Any, mesh: Any) -> torch.nn.Module:
    """What a builder without sliced loading does: the whole model on every rank, then FSDP2 shards it."""
    from transformers import AutoModelForCausalLM

    from ringtrain.model.build import apply_fsdp
    from ringtrain.model.causal_lm import CausalLMWithChunkedLoss

    lm = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).to(mesh.device)
    model = CausalLMWithChunkedLoss(lm, cfg.train.loss_chunk_tokens)
    apply_fsdp(model, mesh)
    return model


def _phase(fn) -> tuple[dict, Any]:
    """Peak RSS and anonymous memory over the level before `fn()`, its wall and CPU seconds; and its result."""
    gc.collect()
    timer = SyncedTimer()
    with PeakRSS() as rss, PeakRSS(anonymous=True) as anon, timer.region():
        result = fn()
    return {"rss": rss.delta, "anon": anon.delta, "wall": timer.wall_s[0], "cpu": timer.cpu_s[0]}, result


def _spawned(mesh, cfg, warmup_cfg, loader: str, export_dir: str | None) -> dict:
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open  # noqa: F401 - imported by the loaders: part of the baseline
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from ringtrain.model.weights import SliceReader, unique_state
    from ringtrain.train.trainer import build_trainer

    # A tiny trainer first, so that library code, lazy imports and one-time buffers (data pipeline, datasets,
    # transformers' model module, gloo) are in the baseline and the figure is the model's own cost.
    build_trainer(warmup_cfg, mesh)
    out: dict = {}
    if loader == "every-rank":
        out["build"], _ = _phase(lambda: every_rank_build(cfg, mesh))
        return out
    build, trainer = _phase(lambda: build_trainer(cfg, mesh))
    if loader != "mmap-slices":  # its build is the slices build: only its read is its own
        out["build"] = build
    if loader in ("slices", "mmap-slices"):
        reader = SliceReader if loader == "slices" else HuggingFaceStorageReader
        out["read"], _ = _phase(lambda: dcp.load(unique_state(trainer.lm), storage_reader=reader(cfg.model.path)))
    if export_dir:
        out["export"], _ = _phase(lambda: trainer.export(Path(export_dir)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="runs/bench_load", help="where the model is saved (and reused) and exported")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--loaders", default=",".join(LOADERS))
    add_common_flags(p, threads=1, json_help="also write the per-rank figures here (stamped with the machine)",
                     quick_help="a 25M-parameter model")
    args = p.parse_args()
    unknown = [name for name in args.loaders.split(",") if name not in LOADERS]
    if unknown:
        p.error(f"--loaders: {unknown[0]!r} is not one of {', '.join(LOADERS)}")
    pin_malloc_mmap_threshold()  # for the ranks spawned below

    from ringtrain.validate import load_validated_config

    spec = model_spec("25m" if args.quick else "250m", max_position_embeddings=4096)
    root = Path(args.dir)
    folder = root / f"llama_{'25m' if args.quick else '250m'}"
    model_bytes = save_model(folder, spec)
    common = ["train.seq_len=256", f"train.threads={args.threads}", "data.source=passkey", "data.num_samples=16",
              f"train.output_dir={root / 'run'}", "logging.progress_bar=false", "model.dtype=float32"]
    warmup = load_validated_config(None, [*common, "model.arch=llama", "model.config={hidden_size: 64, "
                                          "intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 4}"])
    load = time.time()
    busy0 = os.getloadavg()[0]
    rows = []
    for loader in args.loaders.split(","):
        if loader == "random":
            model = ["model.arch=llama", f"model.config={json.dumps(spec)}"]
        else:
            model = [f"model.path={save_bin_copy(folder) if loader == 'broadcast' else folder}"]
        for world in map(int, args.worlds.split(",")):
            cfg = load_validated_config(None, [*common, *model])
            export_dir = str(root / f"export_w{world}") if loader == "slices" else None
            ranks = run_distributed(_spawned, world, cfg, warmup, loader, export_dir, sp_size=1,
                                    threads=args.threads, timeout=3600)
            rows.append((loader, world, ranks))
            print(f"done: {loader} world {world}", file=sys.stderr, flush=True)
    wall = time.time() - load

    print(f"model: {folder} ({model_bytes / MIB:.0f} MiB of fp32 parameters); machine: {os.cpu_count()} cores, "
          f"load average {busy0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {wall:.0f} s in all\n")
    table = []
    for loader, world, ranks in rows:
        for phase in ("build", "read", "export"):
            if phase not in ranks[0]:
                continue
            per = [r[phase] for r in ranks]
            rss, anon = max(r["rss"] for r in per), max(r["anon"] for r in per)
            table.append([loader, world, phase, " / ".join(f"{r['rss'] / MIB:.0f}" for r in per),
                          f"{rss / model_bytes:.3f}", f"{anon / MIB:.0f}", f"{anon / model_bytes:.3f}",
                          f"{max(r['wall'] for r in per):.1f}", f"{max(r['cpu'] for r in per):.1f}"])
    print(markdown_table(["loader", "world", "phase", "peak RSS over baseline, MiB per rank (max)", "x model bytes",
                          "anonymous MiB (max)", "x model", "wall s (max)", "CPU s (max)"], table))
    if args.json:
        write_json(args.json, {"model": str(folder), "model_bytes": model_bytes, "wall_s": wall,
                               "rows": [{"loader": loader, "world": world, "ranks": ranks}
                                        for loader, world, ranks in rows]})


if __name__ == "__main__":
    main()
