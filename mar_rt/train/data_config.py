"""How many pairs of which slices the data stage draws (:class:`DataConfig`), as jobs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mar_rt.train.sources import CleanSlice
from mar_rt.train.split import VAL_IDS
from mar_rt.train.validation_set import VAL_SIZES_PX


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How training pairs are drawn. ``masks_per_slice`` pairs per real slice,
    ``phantoms`` procedural slices with ``phantom_masks`` pairs each.

    ``clip_*``: DuDoCLIP's own, larger set, counted the same way (0: DuDoCLIP trains on the
    U-Net pairs). Its controller learns the metal and the artifacts, which vary with the
    mask far more than with the slice, so it needs many masks; it only sees tower-size
    inputs, so only those are kept (:func:`clip_set`). ``clip_val_masks``: training-style
    masks (every size bin, every material) per validation slice for the zero-shot check
    (0: the validation set). ``clip_clean``: DuDoCLIP's set also holds each training slice's
    metal-free scan, labelled "no metal" (:func:`clip_set` ``clean``)."""

    masks_per_slice: int = 8
    phantoms: int = 12
    phantom_masks: int = 3
    seed: int = 0
    val_ids: tuple[str, ...] = VAL_IDS
    val_sizes: tuple[int, ...] = VAL_SIZES_PX
    clip_masks_per_slice: int = 0
    clip_phantoms: int = 0
    clip_phantom_masks: int = 0
    clip_val_masks: int = 0
    clip_clean: bool = False

    def clip_counts(self) -> DataConfig:
        """This config with DuDoCLIP's counts as the pair counts (for :func:`training_jobs`)."""
        return dataclasses.replace(
            self,
            masks_per_slice=self.clip_masks_per_slice,
            phantoms=self.clip_phantoms,
            phantom_masks=self.clip_phantom_masks,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def training_jobs(slices: Sequence[CleanSlice], cfg: DataConfig) -> list[tuple[int, int, None]]:
    """[(slice index, k, None)], interleaved k-major so an early stop still covers every slice."""
    per = [
        cfg.phantom_masks if s.slice_id.startswith("phantom_") else cfg.masks_per_slice
        for s in slices
    ]
    jobs = []
    for k in range(max(per, default=0)):
        jobs += [(i, k, None) for i, n in enumerate(per) if k < n]
    return jobs
