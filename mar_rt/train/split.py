"""Which clean slices train and which validate, split by slice and never by pair.

``RESERVED_VAL_ID`` (SynDeepLesion 000321_03_01/011) and the other ids in ``VAL_IDS`` are
validation slices; :func:`split_slices` refuses to put them into the training set, so no pair
of theirs is ever trained on. Procedural phantom slices (:func:`phantom_slices`) only train.
"""

from __future__ import annotations

from collections.abc import Sequence

from mar_rt.errors import BadInputError
from mar_rt.train.pair_meta import PairMeta, pair_seed
from mar_rt.train.phantoms import ellipse_phantom
from mar_rt.train.sources import CleanSlice

RESERVED_VAL_ID = "sdl_000321_03_01_011"
"""SynDeepLesion 000321_03_01/011: validation only, never trained on."""

VAL_IDS = (RESERVED_VAL_ID, "cleanct_000374_06_01_278")
"""Validation slices: the reserved one plus one more clean slice training never sees."""


def split_slices(
    slices: Sequence[CleanSlice], val_ids: Sequence[str] = VAL_IDS
) -> tuple[list[CleanSlice], list[CleanSlice]]:
    """(train, val) by slice id: ids in ``val_ids`` (always including ``RESERVED_VAL_ID``) go to
    validation, everything else to training. Order follows the sorted ids (deterministic)."""
    val_set = set(val_ids) | {RESERVED_VAL_ID}
    ordered = sorted(slices, key=lambda s: s.slice_id)
    train = [s for s in ordered if s.slice_id not in val_set]
    val = [s for s in ordered if s.slice_id in val_set]
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
