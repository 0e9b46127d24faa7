"""The `ringtrain` command: validate, train, eval, rope, plan, data. A user mistake prints a message and exits 2, no traceback."""

from __future__ import annotations

import argparse
import os
import sys

EXIT_CONFIG = 2
# `train` stopped early on SIGINT/SIGTERM/SIGUSR1 after saving a checkpoint: resumable, not finished.
# EX_TEMPFAIL from sysexits.h ("try again later"), so launchers and SLURM scripts can requeue on it;
# torchrun reports it as a worker failure with exitcode 75 (and never restarts it with --max-restarts 0).
EXIT_STOPPED = 75


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="YAML config file (see docs/configuration.md)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides, applied after the file")
        return p

    v = add("validate", "check a config and print the resolved values, starting nothing")
    v.add_argument("--world-size", type=int, default=None,
                   help="also check the parallel sizes against this many ranks (default: $WORLD_SIZE if set)")
    add("train", "train (run under torchrun; see README)")
    add("eval", "passkey / needle grids and perplexity by context length (run under torchrun for SP; see "
                "docs/context_extension.md)")
    r = add("rope", "print the effective RoPE parameters: wavelengths against the target length")
    r.add_argument("--target-length", type=int, default=None,
                   help="length to compare against (default: the scaled context length)")
    pl = add("plan", "predict peak memory per rank, FLOPs and step time; with --gpu-memory-gib, the smallest "
                     "sp_size (and recompute, tiling, offload) that fits (no GPU needed)")
    # Values are checked by the planner, not argparse, so that a bad one is one line and exit 2 like config errors.
    pl.add_argument("--gpus", default=None, help="ranks to plan for (default: parallel.sp_size x parallel.dp_size)")
    pl.add_argument("--gpu-memory-gib", default=None, help="memory per GPU: also search for the setup that fits")
    pl.add_argument("--host-memory-gib", default=None, help="with --gpu-memory-gib: pinned host memory per rank that "
                                                              "offloaded layer inputs may use (default: no limit)")
    pl.add_argument("--device", default="cuda", help="cuda (default) or cpu: the dtype 'auto' resolves to and the "
                                                     "kernels' buffers")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    d = add("data", "print the first packed sequences of rank 0's stream with the loss-bearing tokens marked, and "
                    "each source's samples and tokens (no model is built)")
    d.add_argument("--show", type=int, default=2, metavar="N", help="sequences to print (default 2)")
    d.add_argument("--samples", type=int, default=100, metavar="M",
                   help="sequences over which each source's samples and tokens are counted (default 100)")
    d.add_argument("--json", default=None, metavar="FILE", help="also write {samples: [{text, loss_spans, "
                                                                "document_ids}], sources: {name: {samples, tokens}}}")
    return parser


def _load(args: argparse.Namespace, world_size: int | None):
    from ringtrain.log import setup_logging
    from ringtrain.validate import load_validated_config

    setup_logging()  # before the config: loading it may log (parallel.ulysses_size=0 says what it chose)

    # plan reads shapes only: a model folder with just its config.json (not downloaded yet) can be planned.
    # `data` builds no model: its weights need not be there either.
    return load_validated_config(args.config, args.overrides, world_size=world_size,
                                 weights=args.command not in ("plan", "data"),
                                 device=args.device if args.command == "plan" else None)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Options may come after the overrides; argparse leaves such trailing overrides unparsed.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    from ringtrain.errors import ConfigError, DiskFull, RunStopped

    env_world = int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE") else None
    try:
        if args.command == "validate":
            from ringtrain.config import dump_config
            from ringtrain.train.preflight import path_problems

            cfg = _load(args, args.world_size if args.world_size is not None else env_world)
            problems = path_problems(cfg)  # the output folder and local data files, as `train` checks them
            if problems:
                raise ConfigError(problems)
            sys.stdout.write(dump_config(cfg))
            return 0
        if args.command == "rope":
            from ringtrain.hf.rope import describe_rope
            from ringtrain.model.causal_lm import build_model_config

            cfg = _load(args, None)
            sys.stdout.write(describe_rope(build_model_config(cfg.model), cfg.rope, args.target_length) + "\n")
            return 0
        if args.command == "eval":
            from ringtrain.eval import format_table, run_eval

            results = run_eval(_load(args, env_world))
            if int(os.environ.get("RANK", "0")) == 0:
                sys.stdout.write(format_table(results) + "\n")
            return 0
        if args.command == "plan":
            from ringtrain.planner import plan

            text, rc = plan(_load(args, None), args.gpus, args.gpu_memory_gib, args.device, args.json,
                            host_memory_gib=args.host_memory_gib)
            sys.stdout.write(text)
            return rc
        if args.command == "data":
            import json

            from ringtrain.data.view import data_view
            from ringtrain.log import setup_logging

            if args.show < 0 or args.samples < 0:
                raise ConfigError([f"--show={args.show} and --samples={args.samples} must be >= 0"])
            from ringtrain.data.checks import data_file_problems

            cfg = _load(args, None)
            problems = data_file_problems(cfg.data, cfg.model.path)  # as `train` checks before it loads them
            if problems:
                raise ConfigError(problems)
            setup_logging()
            text, report = data_view(cfg, args.show, args.samples, color=sys.stdout.isatty())
            sys.stdout.write(text)
            if args.json:
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(report, f, ensure_ascii=False)
            return 0
        if args.command == "train":
            from ringtrain.train.trainer import train

            cfg = _load(args, env_world)
            if cfg.model.adapter is not None:  # never ignored silently: training would start from the base alone
                raise ConfigError([f"model.adapter={cfg.model.adapter!r} is read by `ringtrain eval` only: training "
                                   "does not continue from a saved adapter; unset it (model.adapter=null)"])
            trainer = train(cfg)
            return EXIT_STOPPED if trainer.stopped_by_signal else 0
    except ConfigError as e:
        # An agreed error is raised by every rank alike: rank 0 alone prints it, so it reads once.
        if not e.agreed or int(os.environ.get("RANK", "0")) == 0:
            for problem in e.problems:
                sys.stderr.write(f"error: {problem}\n")
        return EXIT_CONFIG
    except DiskFull:  # `train` has logged its one line (`rank N failed: DiskFull: ...`)
        return 1
    except RunStopped as e:  # reached by every rank together: rank 0 says it once
        if int(os.environ.get("RANK", "0")) == 0:
            sys.stderr.write(f"error: {e}\n")
        return 1
    raise AssertionError(f"unhandled command {args.command}")  # argparse guarantees a known command


def exit_now(code: int) -> None:
    """End a rank's process with `code` once its work is done and written: flush, then skip interpreter finalisation.

    gloo's worker threads free finished collectives' tensors (broadcast_object_list's, created in Python) after the
    caller has moved on; when one does so while the interpreter finalises, it takes the GIL from a dying runtime and
    the process aborts ("terminate called without an active exception", -6) after a run that succeeded or a refusal
    that every rank agreed on. teardown's barrier narrows that window; leaving without finalisation closes it. Files,
    checkpoints and W&B are closed by then (the trainer and evaluation close them on every exit path)."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":  # how torchrun, srun and the launch scripts start each rank
    exit_now(main())
