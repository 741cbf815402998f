"""The validation set: every validation slice × one titanium mask per published size, written
in the SynDeepLesion layout with ``testmask.npy`` so ``mar-rt eval`` reads it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mar_rt.ct.masks import body_outline
from mar_rt.train.implants import draw_implant
from mar_rt.train.pair_meta import pair_seed
from mar_rt.train.pairs import PairSet, generate_pairs
from mar_rt.train.sources import CleanSlice

VAL_SIZES_PX = (2061, 890, 881, 451, 254, 124, 118, 112, 53, 35)
"""Metal sizes of the validation masks: the published SynDeepLesion test sizes, which cover
every reporting size group (``mar_rt.ct.metrics.SIZE_GROUPS``) twice."""


def validation_masks(
    slices: Sequence[CleanSlice], seed: int = 0, sizes: Sequence[int] = VAL_SIZES_PX
) -> list[tuple[np.ndarray, str]]:
    """One titanium mask per ``sizes`` entry (default ``VAL_SIZES_PX``), inside every
    validation slice's body outline, so the same K masks serve every slice (as
    SynDeepLesion's test masks do; written as ``testmask.npy``). Returns [(mask, kind)]."""
    common = np.logical_and.reduce([body_outline(s.image_mu) for s in slices])
    out = []
    for k, size in enumerate(sizes):
        mask, kind, _ = draw_implant(common, pair_seed(seed, "validation-mask", k), size_px=size)
        out.append((mask, kind))
    return out


def validation_jobs(
    slices: Sequence[CleanSlice], sizes: Sequence[int] = VAL_SIZES_PX
) -> list[tuple[int, int, int]]:
    """Every validation slice × every size in ``sizes`` (k = size rank)."""
    return [(i, k, s) for i in range(len(slices)) for k, s in enumerate(sizes)]


VAL_SIM_RANGES = "protocol"
"""The validation set's simulator settings (``pairs.pair_settings``): DESIGN §5's protocol."""


def write_validation_set(
    slices: Sequence[CleanSlice], out_dir: str | os.PathLike[str], *, seed: int = 0,
    device: str | torch.device = "cpu", store_device: str | torch.device | None = None,
    sizes: Sequence[int] = VAL_SIZES_PX,
) -> PairSet:  # fmt: skip
    """The validation set: every slice in ``slices`` × one mask per ``sizes`` entry, written to
    ``out_dir`` in the SynDeepLesion layout with ``testmask.npy`` (416, 416, K) and
    ``pairs.json``, so ``mar-rt eval out_dir`` reads it. Cached like :func:`generate_pairs`."""
    out = Path(out_dir)
    masks = validation_masks(slices, seed, sizes)
    pairs = generate_pairs(
        slices, validation_jobs(slices, sizes), seed=seed, device=device, cache_dir=out,
        store_device=store_device, fixed_masks=masks, sim_ranges=VAL_SIM_RANGES,
    )  # fmt: skip
    stack = np.stack([m for m, _ in masks], axis=-1).astype(np.uint8)
    tmp = out / ".testmask.npy.tmp.npy"
    np.save(tmp, stack)
    os.replace(tmp, out / "testmask.npy")
    return pairs
