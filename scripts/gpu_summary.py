"""Merge what scripts/gpu_check.sh wrote into OUT/summary.json and OUT/summary.md (the tables for docs/benchmarks.md).

    python scripts/gpu_summary.py OUT

Exits 1 when a step failed or a file a step should have written is missing, so gpu_check.sh fails with it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ringtrain.bench import markdown_table, write_json

STEP_FILES = {"attention_small": "attention_small.json", "attention_large": "attention_large.json",
              "trainer": "trainer.json", "max_context": "max_context.json", "long_context": "long_context.json"}


def _steps(out: Path) -> list[dict]:
    rows = []
    for line in (out / "status.tsv").read_text().splitlines():
        name, rc, seconds = line.split("\t")
        rows.append({"step": name, "status": "ok" if rc == "0" else "skipped" if rc == "skipped" else f"rc={rc}",
                     "seconds": int(seconds)})
    return rows


def _attention_md(records: list[dict]) -> list[str]:
    rows = []
    for r in records:
        if "baseline_s" in r:
            rows.append([r["config"], f"{r['seq']:,}", r["world"], r["baseline"], f"{r['baseline_s']:.4f}",
                         f"{r['ring_s']:.4f}", f"{r['baseline_over_ring']:.3f}"])
        else:
            rows.append([f"{r['config']} ({r['heads']} heads)", f"{r['seq']:,}", 1, "SDPA", f"{r['sdpa_s']:.4f}",
                         f"{r['ringtrain_s']:.4f}", f"{r['sdpa_over_ringtrain']:.3f}"])
    return markdown_table(["attention", "S", "P", "baseline", "baseline s", "ringtrain s", "baseline / ringtrain"],
                          rows).splitlines()


def _trainer_md(records: list[dict]) -> list[str]:
    """Trainer records; `planner GiB` is `ringtrain plan`'s peak for the same config, next to the measured."""
    rows = []
    for r in records:
        planned = r.get("predicted_peak_bytes")
        plan = "-" if planned is None else f"{planned / 2**30:.1f}"
        if "step_s" in r:
            ratio = f"{planned / r['peak_bytes']:.2f}" if planned and r["peak_bytes"] else "-"
            rows.append([r["kind"], r["recompute"], f"{r['seq_len']:,}", f"{r['step_s']:.3f}",
                         f"{r['seq_len'] / r['step_s']:,.0f}", f"{r['peak_bytes'] / 2**30:.1f}", plan, ratio])
        else:
            why = r.get("oom", r.get("not_tried", "?"))
            rows.append([r["kind"], r["recompute"], f"{r['seq_len']:,}", why[:60], "-", "-", plan, "-"])
    return markdown_table(["loop", "recompute", "context", "step s", "tokens/s", "peak GiB", "planner GiB",
                           "planner / measured"], rows).splitlines()


def main(out: Path) -> int:
    steps = _steps(out)
    summary: dict = {"steps": steps, "env": (out / "env.log").read_text() if (out / "env.log").exists() else ""}
    failed = [s["step"] for s in steps if s["status"] != "ok"]
    md = ["# GPU check", "", "```", summary["env"].strip(), "```", ""]
    md += markdown_table(["step", "status", "seconds"], [[s["step"], s["status"], s["seconds"]] for s in steps]
                         ).splitlines()
    ran = {s["step"] for s in steps if s["status"] == "ok"}
    for step, name in STEP_FILES.items():
        path = out / name
        if not path.exists():
            if step in ran:
                failed.append(f"{step} (wrote no {name})")
            continue
        data = json.loads(path.read_text())
        summary[step] = data
        partial = "" if data.get("complete", True) else ": partial, the step stopped before its end"
        md += ["", f"## {step} ({data['device']}, torch {data['torch']}{partial})", ""]
        md += _attention_md(data["records"]) if step.startswith("attention") else _trainer_md(data["records"])
        if step in ("max_context", "long_context"):
            trained = [r["seq_len"] for r in data["records"] if "step_s" in r]
            key = "longest_context" if step == "max_context" else "long_context_trained"
            summary[key] = max(trained) if trained else None
            md += ["", f"Longest context that trained one step ({step}): {summary[key]}"]
    summary["failed"] = failed
    write_json(out / "summary.json", summary, stamp=False)  # each step's file carries its own stamp
    (out / "summary.md").write_text("\n".join(md) + "\n")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/gpu_summary.py OUT")
    sys.exit(main(Path(sys.argv[1])))
