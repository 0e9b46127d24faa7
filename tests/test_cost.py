"""The attention cost model (ringtrain.ring.cost) and parallel.ulysses_size=0 (auto), which chooses by it."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from ringtrain.config import ParallelConfig, resolve_parallel_sizes
from ringtrain.errors import ConfigError
from ringtrain.ring.cost import DEVICE_COSTS, AttentionShape, plan_cost, rank_plans, typical_documents
from ringtrain.ring.plan import visible_work
from ringtrain.validate import load_validated_config

CPU, CUDA = DEVICE_COSTS["cpu"], DEVICE_COSTS["cuda"]
SHAPE = AttentionShape(batch=1, seq_len=8192, heads=8, kv_heads=8, head_dim=64, value_dim=64, dtype_bytes=4)


def _ids(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]


def test_zigzag_balances_a_causal_sequence_and_contiguous_does_not():
    zigzag = plan_cost(SHAPE, 4, 1, "zigzag", CPU)
    contiguous = plan_cost(SHAPE, 4, 1, "contiguous", CPU)
    one = plan_cost(SHAPE, 1, 1, "zigzag", CPU)
    # the busiest contiguous rank holds the last quarter: 7/16 of the causal work against zigzag's 1/4
    assert contiguous.compute_s / zigzag.compute_s == pytest.approx(7 / 4, rel=0.05)
    assert one.compute_s / zigzag.compute_s == pytest.approx(4, rel=0.05)


def test_balanced_beats_zigzag_on_packed_documents_as_measured():
    """bench_peers, P=2, [3000, 5192]: zigzag 1.064, balanced 0.955, Ulysses 0.943 CPU s (docs/benchmarks.md)."""
    ids = _ids([3000, 5192])
    plans = rank_plans(SHAPE, 2, CPU, document_ids=ids, layouts=("balanced", "zigzag"))
    costs = {(c.ulysses, c.layout): c.seconds for c in plans}
    # by default only the per-batch balanced layout is priced with documents
    assert {c.layout for c in rank_plans(SHAPE, 2, CPU, document_ids=ids)} == {"balanced", "-"}
    assert costs[(1, "zigzag")] / costs[(1, "balanced")] == pytest.approx(1.064 / 0.955, rel=0.06)
    assert costs[(2, "-")] / costs[(1, "balanced")] == pytest.approx(0.943 / 0.955, rel=0.03)


def test_entries_are_the_plans_visible_work_plus_the_diagonal():
    """The model counts the work the driver's plans run: one rank's score entries for packed documents equal the
    visible pairs of its queries (plan.visible_work) up to the masked kernels' diagonal waste."""
    ids = _ids([700, 1000, 348])
    shape = AttentionShape(1, 2048, 1, 1, 64, 64, 4)
    waste_free = dataclasses.replace(CPU, causal_waste=0, call_s=0.0, byte_s=0.0)
    cost = plan_cost(shape, 2, 1, "zigzag", waste_free, ids)
    busiest = max(visible_work(ids, 2, "zigzag"))
    assert cost.compute_s == pytest.approx(busiest * waste_free.entry_s, rel=1e-9)


def test_plans_that_cannot_run_say_why_and_come_last():
    shape = AttentionShape(1, 4096, 6, 2, 64, 64, 2)
    plans = rank_plans(shape, 4, CPU)
    assert [p.ulysses for p in plans[-1:]] == [4] and plans[-1].refused
    assert "6 query heads are not divisible by ulysses size 4" in plans[-1].describe()
    assert not plans[0].refused


def test_ulysses_stays_inside_a_node_on_gpus():
    """8 ranks per node, 16-rank SP at 128K on H100 figures: the all-to-all over InfiniBand loses to Ulysses 8 x a
    ring of 2 whose K/V traffic hides behind the compute."""
    shape = AttentionShape(1, 131072, 32, 8, 128, 128, 2)
    plans = {c.ulysses: c for c in rank_plans(shape, 16, CUDA, ranks_per_node=8) if c.layout in ("zigzag", "-")}
    assert plans[16].all_to_all_s > plans[8].all_to_all_s * 4
    assert plans[8].seconds < plans[16].seconds
    assert plans[2].ring_exposed_s == 0.0


def test_typical_documents_fill_the_sequence():
    ids = typical_documents(4096, batch=2)
    assert ids.shape == (2, 4096)
    assert bool((ids[:, 1:] >= ids[:, :-1]).all()) and int(ids.max()) >= 3


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_ulysses_size_auto_resolves_in_validated_configs():
    log = logging.getLogger("ringtrain.validate")
    said, level = _Lines(), log.level
    log.addHandler(said)
    log.setLevel(logging.INFO)
    try:
        cfg = _auto_config()
    finally:
        log.removeHandler(said)
        log.setLevel(level)
    # layout auto stays for a ring of one
    assert cfg.parallel.ulysses_size in (1, 2, 4) and cfg.parallel.layout in ("zigzag", "balanced", "auto")
    # what it chose is one of the plans the cost model ranks first
    shape = AttentionShape(1, 256, 4, 2, 8, 8, 4)
    best = rank_plans(shape, 4, CPU)[0]
    assert cfg.parallel.ulysses_size == best.ulysses
    chosen = [line for line in said.lines if line.startswith("parallel.ulysses_size=0 (auto) -> ")]
    assert len(chosen) == 1 and "cpu costs" in chosen[0], said.lines


def _auto_config():
    return load_validated_config(None, ["model.arch=llama", "model.config.num_attention_heads=4",
                                       "model.config.num_key_value_heads=2", "model.config.hidden_size=32",
                                       "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
                                       "train.output_dir=runs/x", "train.seq_len=256", "parallel.sp_size=4",
                                       "parallel.ulysses_size=0", "data.document_mask=false"])


def test_the_command_line_says_the_choice(capsys):
    from pathlib import Path

    from ringtrain.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    assert main(["validate", str(config), "parallel.ulysses_size=0"]) == 0
    err = capsys.readouterr().err
    assert err.count("parallel.ulysses_size=0 (auto) -> ") == 1, err


def test_an_unresolved_auto_size_is_refused_by_the_mesh():
    with pytest.raises(ConfigError, match=r"parallel\.ulysses_size=0 is not resolved"):
        resolve_parallel_sizes(ParallelConfig(sp_size=2, ulysses_size=0), 2)
    with pytest.raises(ConfigError, match=r"ulysses_size=-1 must be >= 1 \(1 = the pure ring\), or 0 for auto"):
        load_validated_config(None, ["model.arch=llama", "train.output_dir=runs/x", "parallel.ulysses_size=-1"])


@pytest.mark.parametrize("overrides,world,expected", [
    (["parallel.sp_size=2", "train.seq_len=129"], 2,
     ["train.seq_len=129 is not a multiple of 4 (2 x parallel.sp_size=2, zigzag layout): use train.seq_len=132"]),
    (["parallel.sp_size=3", "train.seq_len=132"], 4,
     ["parallel.sp_size=3 does not divide world size 4: choose sp_size among 1, 2, 4"]),
    (["parallel.layout=zigzg"], None, ["parallel.layout='zigzg' is not one of zigzag, contiguous, balanced, auto"]),
], ids=["no-plan-fits", "world", "bad-layout"])
def test_auto_with_bad_values_is_the_usual_config_error(overrides, world, expected):
    """No exact plan (every one refused), sizes against the world, a mistyped layout: the same one-line problems as
    with ulysses_size=1, never a ValueError or an unresolved size reaching the mesh."""
    base = ["model.arch=llama", "model.config.num_attention_heads=4", "model.config.hidden_size=32",
            "model.config.intermediate_size=64", "model.config.num_hidden_layers=1", "train.output_dir=runs/x",
            "data.document_mask=false", "parallel.layout=zigzag", "parallel.ulysses_size=0"]
    with pytest.raises(ConfigError) as err:
        load_validated_config(None, [*base, *overrides], world_size=world)
    assert err.value.problems == expected


def test_a_ulysses_group_across_a_node_boundary_is_priced_on_the_network():
    shape = AttentionShape(1, 65536, 32, 8, 128, 128, 2)
    inside = plan_cost(shape, 8, 4, "zigzag", CUDA, ranks_per_node=8)
    across = plan_cost(shape, 8, 4, "zigzag", CUDA, ranks_per_node=6)  # ranks 4-7 of a group span two nodes
    assert across.all_to_all_s == pytest.approx(inside.all_to_all_s * CUDA.intra_bytes_s / CUDA.inter_bytes_s)
