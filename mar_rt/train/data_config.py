"""How many pairs of which slices the data stage draws (:class:`DataConfig`), as jobs, and
the image-only view of pairs (:func:`image_only_view`, ``DataConfig.image_inputs``).

Notation (DESIGN.md §8 "Image-only input"): X_ma = ``ma_CT``; on the image-only route the
pipeline sees X_ma alone, so Y_ma = FP(X_ma) (a reprojection, not a measurement), the mask is
segmented from X_ma (μ > ``METAL_THRESHOLD_MU``), Tr = FP(M) > 0, Y_LI = LI(Y_ma) across Tr,
X_LI = FBP(Y_LI), and NMAR runs on that Y_ma.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mar_rt.train.pairs import SIM_RANGES
from mar_rt.train.sources import CleanSlice
from mar_rt.train.split import VAL_IDS
from mar_rt.train.validation_set import VAL_SIZES_PX

if TYPE_CHECKING:
    from mar_rt.train.pairs import PairSet


IMAGE_INPUTS = ("measured", "image_only", "both")
"""What the image U-Net's μ is made from (``DataConfig.image_inputs``)."""

IMAGE_TARGETS = ("clean", "scanner")
"""What the image U-Net is trained to output (``DataConfig.image_target``)."""


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
    metal-free scan, labelled "no metal" (:func:`clip_set` ``clean``).

    ``image_inputs``: what the image U-Net's μ is made from. "measured": LI / NMAR of the
    pair's ``ma_sinogram``; "image_only": as the image-only route makes it
    (:func:`image_only_view`: Y_ma = FP(ma_CT), mask segmented, then LI / NMAR of that);
    "both": every pair twice, once each way (one network for both routes).

    ``image_target``: what the image U-Net is trained to output. "clean": the clean slice X
    itself. "scanner": the metal-free, noise-free image of the pair's own scan
    (``domains.with_scanner_targets``): its calibration (beam-hardening correction, scatter)
    and resolution (grid, apertures, kernel) are the scanner's, so the network learns to
    remove the metal artifact and the noise and leaves the rest as the scanner made it. The
    measured route's target is reconstructed with the pipeline's kernel, the image-only
    route's with the pair's own.

    ``sim_ranges``: the simulator settings of each training pair. "protocol": the
    SynDeepLesion protocol (``SimulationSettings()``), as every pair was made before;
    "training": a seeded draw from ``mar_rt.ct.sim_settings.TRAINING_RANGES`` per pair
    (resolution, spectrum, beam-hardening correction, photons, scatter, kernel, density), the
    implant's metal kept (``mar_rt.train.pairs.pair_settings``).

    ``exclude_series``: series (``mar_rt.train.sources.series_id``) never trained on although
    the split would train them, e.g. the official simulated cases kept as a domain check."""

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
    image_inputs: str = "measured"
    image_target: str = "clean"
    sim_ranges: str = "protocol"
    exclude_series: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.image_inputs not in IMAGE_INPUTS:
            raise ValueError(
                f"DataConfig.image_inputs must be one of {IMAGE_INPUTS}, got {self.image_inputs!r}"
            )
        if self.image_target not in IMAGE_TARGETS:
            raise ValueError(
                f"DataConfig.image_target must be one of {IMAGE_TARGETS}, got {self.image_target!r}"
            )
        if self.sim_ranges not in SIM_RANGES:
            raise ValueError(
                f"DataConfig.sim_ranges must be one of {tuple(SIM_RANGES)}, got {self.sim_ranges!r}"
            )

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


def image_only_view(pairs: PairSet, *, batch: int = 8) -> PairSet:
    """``pairs`` as the image-only route sees them (module notation): ``ma_sinogram`` =
    FP(``ma_CT``), ``mask`` segmented from ``ma_CT`` (the true mask where nothing reaches the
    threshold, so every pair keeps its metal), ``metal_trace`` = FP(mask) > 0, ``LI_sinogram``
    and ``LI_CT`` the LI of that; ``image`` and ``poly_sinogram`` (targets) are kept. NMAR
    fields, if any, are dropped: call ``domains.with_nmar`` on the result. Same device.
    """
    import torch

    from mar_rt.ct.mar import METAL_THRESHOLD_MU, li_inpaint, segment_metal
    from mar_rt.ct.projector import get_projector
    from mar_rt.train.pairs import GEOMETRY, PairSet

    f = pairs.fields
    proj = get_projector(GEOMETRY, device=pairs.device, dtype=torch.float32)
    names = ("ma_sinogram", "mask", "metal_trace", "LI_sinogram", "LI_CT")
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(0, len(pairs), batch):
        x_ma = f["ma_CT"][i : i + batch].float()
        seg = segment_metal(x_ma, METAL_THRESHOLD_MU)
        found = seg.flatten(1).any(1)[:, None, None]
        mask = torch.where(found, seg, f["mask"][i : i + batch])
        y_ma = proj.forward(x_ma)
        trace = proj.forward(mask.float()) > 0
        y_li = li_inpaint(y_ma, trace)
        for n, v in zip(names, (y_ma, mask, trace, y_li, proj.fbp(y_li)), strict=True):
            parts[n].append(v)
    keep = {k: v for k, v in f.items() if not k.startswith("NMAR_")}
    return PairSet(pairs.metas, {**keep, **{n: torch.cat(v) for n, v in parts.items()}})
