"""Host memory of building the trainer from a saved model, per rank, and of exporting it (issue 15).

Saves a ~250M-parameter Llama (fp32 safetensors, 1 GB) once under --dir, then for each loader and world size spawns
that many gloo ranks (one thread each) that build the trainer with `build_trainer` (FSDP2 over the world) and report
their peak resident memory over a baseline taken just before the build:

    python scripts/bench_load.py                       # loaders slices, broadcast, every-rank; worlds 1, 2, 4
    python scripts/bench_load.py --quick               # a 25M model: a smoke run

Loaders:
- slices (the default path): meta-device model, FSDP2, then each rank reads its slice of every tensor (DCP plans
  it, `ringtrain.model.weights.SliceReader` reads it with positioned reads); this run also exports the model
  (`Trainer.export`) and reports the export's peak;
- mmap-slices: the same through DCP's stock HuggingFaceStorageReader (safetensors' memory map);
- broadcast (the fallback for folders that cannot be read by slices): rank 0 runs from_pretrained and
  set_model_state_dict(broadcast_from_rank0=True) sends one tensor at a time;
- every-rank (the builder before issue 15, for comparison): from_pretrained on every rank, then FSDP2 shards it;
- random: model.arch with the same shape, the module-by-module random init.

Memory: resident set size sampled every 2 ms from /proc/self/statm (`PeakRSS` of bench_attention.py), with glibc's
mmap threshold pinned so freed large buffers leave the RSS. RSS counts the pages of memory-mapped safetensors files a
rank touched (file-backed, shared with the page cache) as well as its own (anonymous) memory; both are reported.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # before torch allocates (ranks inherit it)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_attention import PeakRSS  # noqa: E402

from ringtrain.testing import run_distributed  # noqa: E402

MIB = 2**20
SHAPES = {  # ~246M and ~25M parameters, untied embeddings (the embedding and LM head are the largest tensors)
    "250m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=14,
                 num_attention_heads=16, num_key_value_heads=16),
    "25m": dict(vocab_size=8000, hidden_size=256, intermediate_size=704, num_hidden_layers=14,
                num_attention_heads=8, num_key_value_heads=8),
}


def anon_rss() -> int:
    """Resident memory that is this process's own: resident minus shared (file-backed and shared memory)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


class PeakAnon(PeakRSS):
    def rss(self) -> int:
        return anon_rss()


def save_model(folder: Path, shape: dict) -> int:
    """The model's bytes; saved once (fp32 safetensors) and reused."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, max_position_embeddings=4096)
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    with torch.device("meta"):
        return sum(p.numel() * 4 for p in AutoModelForCausalLM.from_config(config).parameters())


def every_rank_build(cfg, device, parallelize=None):
    """The builder before issue 15: from_pretrained on every rank, then the parallelism."""
    from transformers import AutoModelForCausalLM

    from ringtrain.hf.rope import apply_rope_scaling
    from ringtrain.model.causal_lm import build_model_config, resolve_dtype
    from ringtrain.parallel.distributed import seed_everything

    seed_everything(cfg.train.seed)
    config = build_model_config(cfg.model)
    apply_rope_scaling(config, cfg.rope)
    lm = AutoModelForCausalLM.from_pretrained(cfg.model.path, config=config,
                                              dtype=resolve_dtype(cfg.model.dtype, device)).to(device)
    return lm if parallelize is None else parallelize(lm)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _spawned(mesh, cfg, warmup_cfg, loader: str, export_dir: str | None) -> dict:
    import gc

    import torch.distributed.checkpoint  # noqa: F401 - imported by the loaders: part of the baseline
    from safetensors import safe_open  # noqa: F401

    import ringtrain.model.causal_lm
    import ringtrain.model.weights
    from ringtrain.train.trainer import build_trainer

    # A tiny trainer first, so that library code, lazy imports and one-time buffers (data pipeline, datasets,
    # transformers' model module, gloo) are in the baseline and the figure is the model's own cost.
    build_trainer(warmup_cfg, mesh)
    if loader == "mmap-slices":
        # DCP's stock reader: the same slices through safetensors' memory map (what SliceReader replaces).
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        ringtrain.model.weights.SliceReader = HuggingFaceStorageReader
    if loader == "broadcast":
        # Force the fallback the loader takes for folders it cannot read by slices (.bin weights, renamed keys).
        ringtrain.model.weights._unreadable_by_slices = lambda *_: ["forced by bench_load.py"]
    if loader == "every-rank":
        ringtrain.model.causal_lm.build_causal_lm = every_rank_build
    gc.collect()
    out = {}
    t0, c0 = time.perf_counter(), _cpu_s()
    with PeakRSS() as rss, PeakAnon() as anon:
        trainer = build_trainer(cfg, mesh)
    out["build"] = {"rss": rss.delta, "anon": anon.delta, "wall": time.perf_counter() - t0, "cpu": _cpu_s() - c0}
    if export_dir:
        gc.collect()
        t0, c0 = time.perf_counter(), _cpu_s()
        with PeakRSS() as rss, PeakAnon() as anon:
            trainer.export(Path(export_dir))
        out["export"] = {"rss": rss.delta, "anon": anon.delta, "wall": time.perf_counter() - t0,
                         "cpu": _cpu_s() - c0}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="runs/bench_load", help="where the model is saved (and reused) and exported")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--loaders", default="slices,mmap-slices,broadcast,every-rank,random")
    p.add_argument("--quick", action="store_true", help="a 25M-parameter model")
    args = p.parse_args()

    from ringtrain.validate import load_validated_config

    size = "25m" if args.quick else "250m"
    root = Path(args.dir)
    folder = root / f"llama_{size}"
    model_bytes = save_model(folder, SHAPES[size])
    shape = "{" + ", ".join(f"{k}: {v}" for k, v in SHAPES[size].items()) + "}"
    common = ["train.seq_len=256", "train.threads=1", "data.source=passkey", "data.num_samples=16",
              f"train.output_dir={root / 'run'}", "logging.progress_bar=false", "model.dtype=float32"]
    warmup = load_validated_config(None, [*common, "model.arch=llama", "model.config={hidden_size: 64, intermediate_size: 128, "
                                                             "num_hidden_layers: 1, num_attention_heads: 4}"])
    load = time.time()
    busy0 = os.getloadavg()[0]
    rows = []
    for loader in args.loaders.split(","):
        model = (["model.arch=llama", f"model.config={shape}"] if loader == "random"
                 else [f"model.path={folder}"])
        for world in map(int, args.worlds.split(",")):
            cfg = load_validated_config(None, [*common, *model])
            export_dir = str(root / f"export_w{world}") if loader == "slices" else None
            ranks = run_distributed(_spawned, world, cfg, warmup, loader, export_dir, sp_size=1, timeout=3600)
            rows.append((loader, world, ranks))
            print(f"done: {loader} world {world}", file=sys.stderr, flush=True)
    wall = time.time() - load

    print(f"model: {folder} ({model_bytes / MIB:.0f} MiB of fp32 parameters); machine: {os.cpu_count()} cores, "
          f"load average {busy0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {wall:.0f} s in all\n")
    print("| loader | world | phase | peak RSS over baseline, MiB per rank (max) | x model bytes | "
          "anonymous MiB (max) | x model | wall s (max) | CPU s (max) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for loader, world, ranks in rows:
        for phase in ("build", "export"):
            if phase not in ranks[0]:
                continue
            per = [r[phase] for r in ranks]
            rss, anon = max(r["rss"] for r in per), max(r["anon"] for r in per)
            per_rank = " / ".join(f"{r['rss'] / MIB:.0f}" for r in per)
            print(f"| {loader} | {world} | {phase} | {per_rank} "
                  f"| {rss / model_bytes:.3f} | {anon / MIB:.0f} | {anon / model_bytes:.3f} "
                  f"| {max(r['wall'] for r in per):.1f} | {max(r['cpu'] for r in per):.1f} |")


if __name__ == "__main__":
    main()
