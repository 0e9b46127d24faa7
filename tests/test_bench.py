"""The benchmark harness (ringtrain/bench.py): what it measures, and that what it writes is whole and labelled."""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import pytest
import torch

from ringtrain import bench
from ringtrain.model.flops import model_flops_per_token
from ringtrain.testing import run_distributed


def test_timer_measures_a_sleep_in_wall_time_and_no_cpu_time():
    timer = bench.SyncedTimer()
    for _ in range(3):
        with timer.region():
            time.sleep(0.05)
    assert len(timer.wall_s) == len(timer.cpu_s) == 3
    assert all(0.05 <= w < 0.5 for w in timer.wall_s), timer.wall_s  # a busy machine only adds time
    assert all(c < 0.04 for c in timer.cpu_s), timer.cpu_s  # sleeping costs no CPU


def test_timer_counts_cpu_time_of_work():
    timer = bench.SyncedTimer()
    with timer.region():
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.1:
            pass
        spent = time.thread_time() - t0
    # The process's CPU time holds this thread's; this thread's cannot exceed the wall time. (Not the process's:
    # other threads of the pytest process, datasets' or torch's pools, may run beside it and push it past the wall.)
    assert timer.cpu_s[0] >= spent >= 0.1
    assert timer.wall_s[0] >= spent


def test_measure_keeps_warmup_apart_and_lines_ranks_up_before_every_call():
    calls, barriers = [], []
    m = bench.measure(lambda: calls.append(len(calls)) or len(calls), repeats=3, warmup=2,
                      barrier=lambda: barriers.append(1), memory=False)
    assert m.results == [1, 2, 3, 4, 5] and len(barriers) == 5
    assert len(m.wall_s) == 5 and m.timed_wall_s == m.wall_s[2:] and m.timed_cpu_s == m.cpu_s[2:]
    s = m.summary()
    assert s["wall"] == min(m.wall_s[2:]) and s["cpu"] == min(m.cpu_s[2:])
    assert m.peak_bytes == 0 and s["mem"] == 0  # memory not tracked


def test_peak_memory_sees_a_buffer_allocated_in_the_region():
    mib = 2**20
    with bench.PeakMemory(torch.device("cpu")) as mem:
        held = torch.ones(64 * mib // 4)  # 64 MiB, written (resident), still alive when the region ends
    assert mem.delta >= 60 * mib, mem.delta
    assert mem.peak >= mem.base + mem.delta and held.numel()


def test_markdown_table_compact_and_padded():
    rows = [["ring", f"{1.23456:.3f}"], ["SDPA causal", 2]]
    assert bench.markdown_table(["config", "s"], rows) == (
        "| config | s |\n|---|---|\n| ring | 1.235 |\n| SDPA causal | 2 |")
    assert bench.markdown_table(["config", "s"], rows, pad=True) == (
        "| config      | s     |\n"
        "|-------------|-------|\n"
        "| ring        | 1.235 |\n"
        "| SDPA causal | 2     |")
    assert bench.markdown_table(["a", "b"], [], pad=True) == "| a | b |\n|---|---|"
    with pytest.raises(ValueError, match="a row has 1 cells for 2 columns"):
        bench.markdown_table(["a", "b"], [["only one"]])


def test_write_json_stamps_device_versions_host_and_date(tmp_path):
    out = bench.write_json(tmp_path / "sub" / "r.json", {"records": [1, 2], "device": "as measured"})
    data = json.loads(out.read_text())
    assert data["records"] == [1, 2]
    assert data["device"] == "as measured"  # the caller's keys win over the stamp
    assert data["torch"] == torch.__version__ and data["transformers"]
    assert data["host"] and data["cpus"] >= 1
    assert datetime.datetime.fromisoformat(data["date"]).tzinfo is not None
    assert bench.run_stamp()["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")
    plain = bench.write_json(tmp_path / "plain.json", {"x": 1}, stamp=False)
    assert json.loads(plain.read_text()) == {"x": 1}


def test_write_json_failing_midway_leaves_the_previous_file_whole_and_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    bench.write_json(path, {"records": ["first"]})
    before = path.read_text()
    # A value json cannot encode, after one it has already written: the failure happens mid-write.
    with pytest.raises(TypeError):
        bench.write_json(path, {"records": ["second", object()]})
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    bench.write_json(path, {"records": ["third"]})
    assert json.loads(path.read_text())["records"] == ["third"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_common_flags_keep_a_script_s_spelling():
    p = bench.add_common_flags(argparse.ArgumentParser(), repeats=3, repeats_flags=("--repeats", "--iters"),
                               warmup=1, threads=1, json_help="records", quick_help="smoke")
    args = p.parse_args(["--iters", "5", "--json", "x.json"])
    assert (args.repeats, args.warmup, args.threads, args.json, args.quick) == (5, 1, 1, Path("x.json"), False)
    assert p.parse_args(["--repeats", "2", "--quick"]).repeats == 2
    bare = bench.add_common_flags(argparse.ArgumentParser(), json_help="records")
    assert vars(bare.parse_args([])) == {"json": None}


def test_model_specs_are_copies_and_build_on_the_meta_device():
    spec = bench.model_spec("tiny", max_position_embeddings=512)
    spec["hidden_size"] = 1
    assert bench.MODEL_SPECS["tiny"]["hidden_size"] == 128 and "max_position_embeddings" not in bench.MODEL_SPECS[
        "tiny"]
    with pytest.raises(KeyError, match="not one of"):
        bench.model_spec("7b")
    lm = bench.meta_model(bench.model_spec("tiny"))
    assert all(p.device.type == "meta" for p in lm.parameters())
    # 2 x (embedding + lm_head) 1024 x 128, 2 layers of (q, o 128x128; k, v 128x64; MLP 3 x 128x256; 2 norms), norm
    params = 2 * 1024 * 128 + 2 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256 + 2 * 128) + 128
    assert sum(p.numel() for p in lm.parameters()) == params
    assert model_flops_per_token(lm, 1000) == 6 * params + 6 * 2 * 1000 * 128


def _send_known_bytes(mesh) -> dict:
    import torch.distributed as dist

    rank = dist.get_rank()
    peer = 1 - rank
    with bench.SentBytes() as sent:
        buf = torch.empty(100)
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.ones(100), peer),
                                            dist.P2POp(dist.irecv, buf, peer)]):
            work.wait()
        out = torch.empty(8)
        dist.all_to_all_single(out, torch.full((8,), float(rank)))
    return {"total": sent.total, "ring": sent.ring, "all_to_all": sent.all_to_all,
            "restored": dist.batch_isend_irecv is sent._p2p, "received": buf.sum().item(), "a2a": out.tolist()}


def test_sent_bytes_counts_what_a_rank_sends_and_unwraps_after():
    for r in run_distributed(_send_known_bytes, 2, timeout=60):
        assert (r["ring"], r["all_to_all"], r["total"]) == (400, 16, 416)  # 100 fp32; half of 8 fp32 leaves
        assert r["restored"] and r["received"] == 100.0 and r["a2a"] == [0.0] * 4 + [1.0] * 4
