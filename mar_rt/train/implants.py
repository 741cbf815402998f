"""The implant of a training or validation pair: metal size, shape kind and material.

Sizes follow the reporting size groups (``mar_rt.ct.masks.SIZE_GROUPS``), so every group is
trained on; shapes come from ``mar_rt.ct.masks.generate_metal_mask``.
"""

from __future__ import annotations

import math

import numpy as np

from mar_rt.ct.masks import SIZE_GROUPS, SIZE_RANGE_PX, generate_metal_mask, suitable_kinds
from mar_rt.errors import BadInputError

TRAIN_SIZE_BINS: tuple[tuple[int, int], ...] = tuple(
    (max(int(g.lo), SIZE_RANGE_PX[0]), min(g.hi, SIZE_RANGE_PX[1])) for g in reversed(SIZE_GROUPS)
)
"""Training mask sizes (px at 416²): the reporting size groups (``SIZE_GROUPS``), small to
large, cut to the sizes masks are drawn in (``SIZE_RANGE_PX``). Pair k of a slice draws
log-uniformly inside one bin, cycling through the bins."""

MATERIALS = (("Ti", 0.7), ("Fe", 0.2), ("Cu", 0.05), ("Au", 0.05))
"""Implant metals of training pairs and their probabilities (validation is all titanium)."""


def draw_implant(
    body: np.ndarray, seed: int, *, size_px: int | None = None, bin_index: int | None = None
) -> tuple[np.ndarray, str, str]:
    """(mask, kind, material) for one pair inside the body outline ``body``: size from
    ``size_px`` or log-uniform in ``TRAIN_SIZE_BINS[bin_index]``, kind drawn among the kinds
    suited to the size, material from ``MATERIALS`` (Ti when ``size_px`` is given:
    validation). Retries other draws (finally a disc) when the implant does not fit."""
    if body.sum() < 2000:
        raise BadInputError("clean slice has no body outline large enough for an implant")
    rng = np.random.default_rng(seed)
    if size_px is None:
        lo, hi = TRAIN_SIZE_BINS[(bin_index or 0) % len(TRAIN_SIZE_BINS)]
        size_px = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        names, probs = zip(*MATERIALS, strict=True)
        material = str(rng.choice(names, p=np.asarray(probs) / sum(probs)))
    else:
        material = "Ti"
    last: Exception | None = None
    for attempt in range(8):
        kinds = suitable_kinds(size_px)
        kind = kinds[int(rng.integers(len(kinds)))] if attempt < 6 else "disc"
        try:
            mask = generate_metal_mask(
                body.shape, seed=int(rng.integers(2**62)), body_mask=body, size_px=size_px,
                kind=kind,
            )  # fmt: skip
            return mask, kind, material
        except ValueError as err:
            last = err
    raise BadInputError(f"no implant of {size_px} px fits this slice ({last})")
