"""Train / tune / validation split by series (patient), never by slice."""

from __future__ import annotations

import numpy as np
import pytest

from mar_rt.errors import BadInputError
from mar_rt.train import sources
from mar_rt.train.sources import CleanSlice, series_id
from mar_rt.train.split import (
    RESERVED_VAL_ID,
    SERIES_SPLIT,
    SPLITS,
    series_split,
    split_by_series,
    split_slices,
)


def _slice(sid: str, series: str = "") -> CleanSlice:
    return CleanSlice(sid, np.zeros((4, 4), np.float32), "test", series=series)


def _check_disjoint(parts: dict[str, list[CleanSlice]]) -> None:
    owner: dict[str, str] = {}
    for split, items in parts.items():
        for s in items:
            assert owner.setdefault(series_id(s), split) == split, (series_id(s), split)


def test_real_series_never_share_a_split(shared_data):
    """Every shared clean slice and every ct-volumes slice (every 8th, for speed): no series in
    two splits, each split non-empty, validation holds the reserved slice, and the same split
    comes out of a shuffled list."""
    slices = sources.load_clean_slices(shared_data) + sources.ct_volume_slices(
        shared_data / "ct-volumes", stride=8
    )
    parts = split_by_series(slices)
    _check_disjoint(parts)
    assert all(parts[k] for k in SPLITS)
    assert {series_id(s) for s in parts["tune"]} == {"ctvol_totalseg_abdomen_dicom"}
    assert {series_id(s) for s in parts["validation"]} == {
        "ctvol_lidc_chest",
        "deeplesion_000321",
        "deeplesion_000374",
    }
    assert RESERVED_VAL_ID in {s.slice_id for s in parts["validation"]}
    rng = np.random.default_rng(0)
    shuffled = [slices[i] for i in rng.permutation(len(slices))]
    again = split_by_series(shuffled)
    assert {k: [s.slice_id for s in v] for k, v in again.items()} == {
        k: [s.slice_id for s in v] for k, v in parts.items()
    }
    # the recipe's (train, val) never trains on a tune or validation series
    train, _ = split_slices(slices)
    assert {series_id(s) for s in train} <= {series_id(s) for s in parts["train"]}


def test_slices_of_one_series_go_together_and_unknown_ones_train():
    slices = [_slice(f"x_{i}", "patA") for i in range(5)] + [_slice("y_0", "patB")]
    slices += [_slice("sdl_000321_03_01_012"), _slice("dlpng_000321_04_01_007")]
    parts = split_by_series(slices, {"patA": "tune"})
    assert [s.slice_id for s in parts["tune"]] == [f"x_{i}" for i in range(5)]
    assert [s.slice_id for s in parts["train"]] == [
        "dlpng_000321_04_01_007",
        "sdl_000321_03_01_012",
        "y_0",
    ]
    # with the default table, both DeepLesion slices of patient 000321 (two studies) validate
    default = split_by_series(slices)
    assert {s.slice_id for s in default["validation"]} == {
        "sdl_000321_03_01_012",
        "dlpng_000321_04_01_007",
    }


def test_hash_fractions_are_deterministic_and_whole_series():
    names = [f"series_{i:03d}" for i in range(400)]
    first = [series_split(n, {}, (0.2, 0.2)) for n in names]
    assert first == [series_split(n, {}, (0.2, 0.2)) for n in names]
    counts = {k: first.count(k) for k in SPLITS}
    assert 50 < counts["tune"] < 110 and 50 < counts["validation"] < 110  # 80 expected each
    slices = [_slice(f"{n}_{k}", n) for n in names[:50] for k in range(3)]
    _check_disjoint(split_by_series(slices, {}, (0.3, 0.3)))
    with pytest.raises(BadInputError, match="sum to"):
        series_split("a", {}, (0.8, 0.4))
    with pytest.raises(BadInputError, match="not one of"):
        series_split("a", {"a": "test"})


def test_table_names_only_known_splits():
    assert set(SERIES_SPLIT.values()) <= set(SPLITS)
