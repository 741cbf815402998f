"""Which clean slices train, which tune and which validate: split by series (patient), never
by slice or pair.

``RESERVED_VAL_ID`` (SynDeepLesion 000321_03_01/011) and the other ids in ``VAL_IDS`` are
validation slices; :func:`split_slices` refuses to put them into the training set, so no pair
of theirs is ever trained on. Procedural phantom slices (:func:`phantom_slices`) only train.

Series (``mar_rt.train.sources.series_id``: the reader's series, DeepLesion patient, NIfTI file)
go whole to one of ``SPLITS`` (:func:`split_by_series`): those named in ``SERIES_SPLIT``
(the shared ``ct-volumes`` series and the validation slices' patients) as listed there, any
other series to ``train``, or, with ``fractions``, by a hash of its id (deterministic, the
same on every machine). :func:`split_slices` keeps every slice of a tune or validation series
out of training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from mar_rt.errors import BadInputError
from mar_rt.train.pair_meta import PairMeta, pair_seed
from mar_rt.train.phantoms import ellipse_phantom
from mar_rt.train.sources import CleanSlice, series_id

RESERVED_VAL_ID = "sdl_000321_03_01_011"
"""SynDeepLesion 000321_03_01/011: validation only, never trained on."""

VAL_IDS = (RESERVED_VAL_ID, "cleanct_000374_06_01_278")
"""Validation slices: the reserved one plus one more clean slice training never sees."""


SPLITS = ("train", "tune", "validation")
"""The three splits: train the networks, tune α and the switches, report."""

SERIES_SPLIT: Mapping[str, str] = {
    # ../shared/data/ct-volumes (README there): four patients, four scanners
    "ctvol_pancreas_ct_cb001": "train",  # 134 slices, chest to pelvis, Philips
    "ctvol_totalseg_body_3mm": "train",  # 92 low-res slices (read only with low_res="pad")
    "ctvol_totalseg_abdomen_dicom": "tune",  # 20 slices, upper abdomen, Siemens Br38f
    "ctvol_lidc_chest": "validation",  # 72 slices, chest and upper abdomen, GE LightSpeed
    # the patients of VAL_IDS
    "deeplesion_000321": "validation",
    "deeplesion_000374": "validation",
}
"""Fixed split of known series. With four real patients a hash cannot be trusted to give
each split one; the largest series trains, the second largest full-resolution one
validates, the smallest tunes."""


def series_split(
    series: str,
    assignment: Mapping[str, str] = SERIES_SPLIT,
    fractions: tuple[float, float] | None = None,
) -> str:
    """The split of ``series``: ``assignment[series]`` when listed; else, with ``fractions``
    = (tune, validation) shares, by the first 8 bytes of sha256(series) as a fraction of 2⁶⁴
    (below tune → tune, below tune + validation → validation); else ``train``."""
    if series in assignment:
        split = assignment[series]
        if split not in SPLITS:
            raise BadInputError(f"series {series!r} assigned to {split!r}, not one of {SPLITS}")
        return split
    if fractions is None:
        return "train"
    tune, val = fractions
    if not (0.0 <= tune and 0.0 <= val and tune + val <= 1.0):
        raise BadInputError(f"split fractions (tune, validation) = {fractions} must sum to ≤ 1")
    u = int.from_bytes(hashlib.sha256(series.encode()).digest()[:8], "big") / 2.0**64
    return "tune" if u < tune else "validation" if u < tune + val else "train"


def split_by_series(
    slices: Sequence[CleanSlice],
    assignment: Mapping[str, str] = SERIES_SPLIT,
    fractions: tuple[float, float] | None = None,
) -> dict[str, list[CleanSlice]]:
    """{"train", "tune", "validation"} → slices, every slice of a series in the same split
    (:func:`series_split` of ``series_id(slice)``), each list sorted by slice id."""
    out: dict[str, list[CleanSlice]] = {k: [] for k in SPLITS}
    for s in sorted(slices, key=lambda s: s.slice_id):
        out[series_split(series_id(s), assignment, fractions)].append(s)
    return out


def split_slices(
    slices: Sequence[CleanSlice],
    val_ids: Sequence[str] = VAL_IDS,
    exclude_series: Sequence[str] = (),
) -> tuple[list[CleanSlice], list[CleanSlice]]:
    """(train, val) by slice id: ids in ``val_ids`` (always including ``RESERVED_VAL_ID``) go to
    validation; slices of a series that ``SERIES_SPLIT`` holds out (tune or validation) or
    that ``exclude_series`` names go to neither; everything else to training. Order follows
    the sorted ids (deterministic)."""
    val_set = set(val_ids) | {RESERVED_VAL_ID}
    ordered = sorted(slices, key=lambda s: s.slice_id)
    val = [s for s in ordered if s.slice_id in val_set]
    train = [
        s
        for s in ordered
        if s.slice_id not in val_set
        and series_split(series_id(s)) == "train"
        and series_id(s) not in exclude_series
    ]
    assert all(s.slice_id != RESERVED_VAL_ID for s in train)
    return train, val


def check_no_validation(metas: Sequence[PairMeta], val_ids: Sequence[str] = VAL_IDS) -> None:
    """BadInputError if any training pair comes from a validation slice."""
    bad = sorted({m.slice_id for m in metas} & (set(val_ids) | {RESERVED_VAL_ID}))
    if bad:
        raise BadInputError(f"training data contains validation slice(s) {bad}")


def phantom_slices(n: int, seed: int = 0) -> list[CleanSlice]:
    """``n`` procedural phantoms (``mar_rt.train.phantoms``), ids ``phantom_<seed>_<i>``."""
    return [
        CleanSlice(
            f"phantom_{seed}_{i:03d}",
            ellipse_phantom(int(pair_seed(seed, "phantom", i))),
            f"procedural ellipse phantom (seed {seed}, index {i})",
            "generated",
        )
        for i in range(n)
    ]
