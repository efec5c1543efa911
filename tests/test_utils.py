import argparse

import numpy as np
import pytest

from utils import mixed_seed, seed_type, spread_indices, summed_seed, write_json


@pytest.mark.parametrize("total, n, expected", [
    (10, 3, [0, 3, 6]),
    (10, 5, [0, 2, 4, 6, 8]),
    (7, 7, list(range(7))),
    (7, 0, list(range(7))),   # 0: all
    (3, 10, [0, 1, 2]),       # more than there are: all
    (0, 4, []),
])
def test_spread_indices_are_evenly_spaced_distinct_and_start_at_the_first(total, n, expected):
    assert spread_indices(total, n).tolist() == expected


def test_spread_indices_reach_the_end_of_a_long_split():
    picked = spread_indices(6587, 100)
    assert len(set(picked.tolist())) == 100 and picked[-1] >= 6587 - 6587 // 100 - 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_writes_take_the_umask(tmp_path, umask, mode):
    import os
    old = os.umask(umask)
    try:
        write_json(tmp_path / "args.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "args.json").stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["args.json"]  # no temporary file left


def test_mixed_seeds_differ_where_sums_coincide():
    seeds = {mixed_seed(a, b) for a in range(7) for b in range(4)}
    assert len(seeds) == 28 and all(0 <= x < 2**63 for x in seeds)
    assert mixed_seed(42, 7) == mixed_seed(np.int64(42), np.int64(7)) == 1250292667180671650  # pinned: runs' data order
    assert summed_seed(42, 7) == 49  # runs saved before mixing resume with it


@pytest.mark.parametrize("flag_value, message", [("-1", "-1: a seed from 0 to 4294967295"),
                                                 (str(2**32), "4294967296: a seed from 0 to 4294967295")])
def test_a_seed_outside_one_word_is_refused_naming_the_flag(flag_value, message, capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=seed_type)
    assert parser.parse_args(["--seed", "4294967295"]).seed == 2**32 - 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--seed", flag_value])
    assert f"argument --seed: {message}" in capsys.readouterr().err
