"""scripts/bench_peers.py (and bench_attention.py --peers) runs end to end on CPU at tiny sizes: every implementation
either runs and matches float64 attention, or is reported unavailable with its reason. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_peer_benchmark_smoke(tmp_path):
    out = tmp_path / "peers.json"
    res = subprocess.run([sys.executable, "scripts/bench_attention.py", "--peers", "--quick", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert list(summary) == ["full", "gqa", "packed"]
    for case, rows in summary.items():
        assert {"SDPA, one process", "ringtrain ring (zigzag)", "ringtrain Ulysses U=2", "DeepSpeed Ulysses + SDPA",
                "PyTorch CP ring (alltoall)", "PyTorch CP ring (allgather)"} <= set(rows), case
        for name, row in rows.items():
            if "unavailable" in row:
                assert row["unavailable"], (case, name)
                continue
            assert row["wall_s"] > 0 and row["cpu_s"] > 0, (case, name)
            assert row.get("max_error", 0.0) < 1e-5, (case, name, row)
    assert "cannot express it" in summary["packed"]["PyTorch CP ring (alltoall)"]["unavailable"]
    assert "max error vs fp64" in res.stdout
