"""agree(): rank 0 decides once; every rank returns its value or raises its error, on 2 gloo ranks and alone."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from ringtrain.errors import ConfigError, RunStopped
from ringtrain.parallel.agree import agree
from ringtrain.testing import run_distributed


def _outcome(decide) -> tuple:
    """(value or None, the error's type, message and `agreed` or None): what one rank saw."""
    try:
        return agree(decide, what="testing"), None
    except ConfigError as err:
        return None, ("ConfigError", str(err), err.agreed)
    except Exception as err:  # noqa: BLE001 - the test compares what each rank raised
        return None, (type(err).__name__, str(err), None)


def _agree_cases(mesh) -> dict:
    rank = dist.get_rank()
    calls = []

    def value():
        calls.append(rank)
        return {"rank": rank, "nonce": [rank * 10, "x"]}

    def refused():
        calls.append(rank)
        raise ConfigError([f"train.x={rank} is wrong: set it to 1", "second problem"])

    def crashed():
        calls.append(rank)
        raise OSError(f"disk gone on rank {rank}")

    def stopped():
        calls.append(rank)
        raise RunStopped(f"the folder was taken over (seen by rank {rank})")

    out = {name: _outcome(decide) for name, decide in (("value", value), ("refused", refused), ("crashed", crashed),
                                                       ("stopped", stopped))}
    # Every rank is still in step after the errors: one more agreement over a group of both ranks.
    out["after"] = agree(lambda: "in step", group=dist.new_group([0, 1]))
    out["calls"] = calls
    return out


def test_every_rank_gets_rank_0s_value_or_error():
    r0, r1 = run_distributed(_agree_cases, 2, timeout=60)
    # decide() ran on rank 0 alone, once per agreement.
    assert r0["calls"] == [0, 0, 0, 0] and r1["calls"] == []
    assert r0["value"] == r1["value"] == ({"rank": 0, "nonce": [0, "x"]}, None)
    # A ConfigError is the same agreed error everywhere (rank 0 alone reports it).
    assert r0["refused"] == r1["refused"] == (None, ("ConfigError", "train.x=0 is wrong: set it to 1\nsecond problem",
                                                     True))
    # Any other error: itself on rank 0, named with rank 0's message on the others, instead of a hang.
    assert r0["crashed"] == (None, ("OSError", "disk gone on rank 0", None))
    assert r1["crashed"] == (None, ("RuntimeError", "rank 0 failed while testing: OSError: disk gone on rank 0", None))
    # A RunStopped is the same one-line stop everywhere (the CLI prints it without a traceback).
    assert r0["stopped"] == r1["stopped"] == (None, ("RunStopped", "the folder was taken over (seen by rank 0)", None))
    assert r0["after"] == r1["after"] == "in step"


def test_without_a_process_group_decide_runs_here():
    assert not dist.is_initialized()
    assert agree(lambda: [1, 2]) == [1, 2]
    with pytest.raises(ConfigError, match="^a problem$") as info:
        agree(lambda: (_ for _ in ()).throw(ConfigError(["a problem"])))
    assert info.value.agreed
    with pytest.raises(KeyError):
        agree(lambda: {}["missing"])


def _load_packed(mesh, path: str, cache: str) -> tuple:
    from ringtrain.config import DataConfig
    from ringtrain.data import build_packed_dataset

    try:
        ds = build_packed_dataset(DataConfig(source="files", path=path, cache_dir=cache), seq_len=16, dims=mesh)
    except ConfigError as err:
        return None, (str(err), err.agreed)
    return ds.batch(list(range(len(ds))))["input_ids"].tolist(), None


def test_rank_0_fills_the_data_cache_and_its_refusal_is_every_ranks(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"text": "one"}\n{"text": "two three"}\n')
    bad.write_text('{"text": null}\n{"text": ""}\n')
    r0, r1 = run_distributed(_load_packed, 2, str(good), str(tmp_path / "cache"), timeout=120)
    assert r0 == r1 and r0[0] and r0[1] is None
    r0, r1 = run_distributed(_load_packed, 2, str(bad), str(tmp_path / "cache"), timeout=120)
    assert r0 == r1 and r0[0] is None and r0[1][1] is True  # one agreed refusal: rank 0 alone reports it
    assert "none of its 2 records has text in data.text_field='text'" in r0[1][0]
