"""Simulated pairs in memory (:class:`PairSet`) and their cache in the SynDeepLesion layout.

Notation (DESIGN.md §3, §5):

    X, X_ma, X_LI   clean ``image``, ``ma_CT``, ``LI_CT`` (μ, cm⁻¹, (416, 416))
    Y, Y_ma, Y_LI   metal-free ``poly_sinogram``, ``ma_sinogram``, ``LI_sinogram`` ((640, 641))
    M, Tr           metal mask and ``metal_trace`` (bool)
    pair            one clean slice × one procedural implant (``implants``), simulated with
                    ``mar_rt.ct.simulate.simulate_metal_artifact`` (seeded, ``pair_meta``)
    case            ``<slice_id>/<k>``: the pair's place in the SynDeepLesion layout
                    (``<root>/<slice_id>/gt.h5`` + ``<root>/<slice_id>/<k>.h5``)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mar_rt.ct import physics
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.mar import METAL_THRESHOLD_MU
from mar_rt.ct.masks import body_outline
from mar_rt.ct.sim_settings import TRAINING_RANGES, SimulationSettings
from mar_rt.ct.simulate import simulate_metal_artifact
from mar_rt.ct.syndeeplesion import find_gt_files, read_case, read_gt, write_case
from mar_rt.errors import BadInputError
from mar_rt.train.implants import draw_implant
from mar_rt.train.pair_meta import PairMeta, describe_pair, pair_seed
from mar_rt.train.sources import CleanSlice

log = logging.getLogger(__name__)

INDEX = "pairs.json"
"""Per-folder index of the pairs written by this module (metadata and prompt facts)."""
GEOMETRY = FanBeamGeometry.syndeeplesion()
"""The geometry every pair is simulated in."""


SIM_RANGES = {"protocol": None, "training": TRAINING_RANGES}
"""``DataConfig.sim_ranges`` → where each pair's simulator settings are drawn (None: the
protocol's fixed ``SimulationSettings()``)."""


def pair_settings(sim_ranges: str, seed: int, material: str) -> SimulationSettings:
    """The simulator settings of the pair seeded ``seed`` with implant metal ``material``.

    "protocol": ``SimulationSettings(material=material)``. "training": one draw from
    ``TRAINING_RANGES`` by ``default_rng([seed, 7])`` (its own stream: the implant's draws use
    ``seed`` itself), with the drawn metal replaced by ``material`` at the drawn density scale
    (so the implant mix of ``implants.MATERIALS`` holds)."""
    ranges = SIM_RANGES[sim_ranges]
    if ranges is None:
        return SimulationSettings(material=material)
    draw = ranges.sample(np.random.default_rng([int(seed), 7]))
    scale = (draw.metal_density or physics.DENSITY[draw.material]) / physics.DENSITY[draw.material]
    metal = physics.material_name(material)
    return dataclasses.replace(
        draw, material=metal, metal_density=float(physics.DENSITY[metal] * scale)
    )


def simulate_pair(
    image_mu: np.ndarray,
    mask: np.ndarray,
    *,
    material: str,
    seed: int,
    device: str | torch.device,
    settings: SimulationSettings | None = None,
) -> dict[str, torch.Tensor]:
    """``simulate_metal_artifact`` on ``device`` → the official fields as tensors there.
    ``settings`` (default: the protocol) with its metal set to ``material``."""
    x = torch.from_numpy(np.ascontiguousarray(image_mu, dtype=np.float32)).to(device)
    m = torch.from_numpy(np.ascontiguousarray(mask)).to(device)
    cfg = SimulationSettings(material=material) if settings is None else settings
    if cfg.material != physics.material_name(material):
        raise ValueError(f"settings are for {cfg.material}, the implant is {material}")
    return simulate_metal_artifact(x, m, geometry=GEOMETRY, seed=seed, settings=cfg)


_PAIR_FIELDS = (
    "image",
    "ma_CT",
    "LI_CT",
    "mask",
    "ma_sinogram",
    "LI_sinogram",
    "poly_sinogram",
    "metal_trace",
)


@dataclass(eq=False)
class PairSet:
    """Pairs in memory: ``fields[name]`` (N, ...) float32 (bool for ``mask``/``metal_trace``)
    with names from ``_PAIR_FIELDS`` (a subset may be loaded), and one :class:`PairMeta` each."""

    metas: list[PairMeta]
    fields: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.metas)

    @property
    def device(self) -> torch.device:
        return next(iter(self.fields.values())).device

    def to(self, device: str | torch.device) -> PairSet:
        return PairSet(self.metas, {k: v.to(device) for k, v in self.fields.items()})

    def subset(self, index: Sequence[int]) -> PairSet:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return PairSet(
            [self.metas[i] for i in index],
            {k: v[idx.to(v.device)] for k, v in self.fields.items()},
        )

    @staticmethod
    def stack(
        items: Sequence[tuple[PairMeta, dict[str, torch.Tensor]]], device: str | torch.device
    ) -> PairSet:
        if not items:
            raise BadInputError("no pairs to stack")
        names = [n for n in _PAIR_FIELDS if all(n in f for _, f in items)]
        fields = {n: torch.stack([f[n].to(device) for _, f in items]) for n in names}
        return PairSet([m for m, _ in items], fields)


def _case_fields(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: fields[n] for n in _PAIR_FIELDS if n in fields}


def _read_pair(folder: Path, k: int, gt: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    case = read_case(folder / f"{k}.h5")
    mask = case.get("mask")
    if mask is None:  # an official file: recover the mask from the metal-affected image
        mask = (case["ma_CT"] > METAL_THRESHOLD_MU).astype(np.float32)
    out = {
        "image": gt["image"], "poly_sinogram": gt["poly_sinogram"],
        "ma_CT": case["ma_CT"], "LI_CT": case["LI_CT"],
        "ma_sinogram": case["ma_sinogram"], "LI_sinogram": case["LI_sinogram"],
    }  # fmt: skip
    t = {n: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for n, v in out.items()}
    t["mask"] = torch.from_numpy(mask > 0.5)
    t["metal_trace"] = torch.from_numpy(case["metal_trace"] > 0.5)
    return t


def _read_index(folder: Path, config: dict[str, Any] | None = None) -> dict[str, PairMeta]:
    """The cached pairs of ``folder``; none when ``config`` is given and the cache was made with
    other simulator settings (an index without ``sim_ranges`` was made with the protocol's)."""
    path = folder / INDEX
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    made = data.get("config", {}).get("sim_ranges", "protocol")
    if config is not None and made != config["sim_ranges"]:
        log.warning(
            "%s: pairs made with sim_ranges=%r, not %r; not reused",
            path,
            made,
            config["sim_ranges"],
        )
        return {}
    return {f"{m['slice_id']}/{m['k']}": PairMeta.from_dict(m) for m in data.get("pairs", [])}


def _write_index(folder: Path, metas: dict[str, PairMeta], config: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{INDEX}.tmp"
    body = {"config": config, "pairs": [metas[c].to_dict() for c in sorted(metas)]}
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, folder / INDEX)


def generate_pairs(
    slices: Sequence[CleanSlice],
    jobs: Sequence[tuple[int, int, int | None]],
    *,
    seed: int,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    store_device: str | torch.device | None = None,
    deadline: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    fixed_masks: Sequence[tuple[np.ndarray, str]] | None = None,
    min_pairs: int = 1,
    sim_ranges: str = "protocol",
) -> PairSet:
    """Simulate (or read from ``cache_dir``) the pairs ``jobs`` = [(slice index, k, size_px or
    None)] of ``slices``.

    Pair (s, k) uses ``pair_seed(seed, slice_id, k)``; training pairs (size None) take their
    size bin from k. With ``cache_dir`` every pair is written in the SynDeepLesion layout
    (``<cache>/<slice_id>/gt.h5`` from the slice's first pair, ``<k>.h5`` with the mask) plus
    ``pairs.json``, and a pair already there with the same seed is read instead of simulated.
    ``deadline`` (``time.monotonic()`` value) stops early with the pairs made so far, but
    never before ``min_pairs`` pairs.
    Tensors are kept on ``store_device`` (default ``device``). ``fixed_masks[k]`` = (mask, kind),
    when given, is pair k's titanium implant (validation). ``sim_ranges``: each pair's simulator
    settings (:func:`pair_settings`); a cache made with other settings is not reused.
    """
    if sim_ranges not in SIM_RANGES:
        raise ValueError(f"sim_ranges must be one of {sorted(SIM_RANGES)}, got {sim_ranges!r}")
    store = torch.device(store_device or device)
    folder = Path(cache_dir) if cache_dir is not None else None
    config = {"seed": int(seed), "sim_ranges": sim_ranges}
    index = _read_index(folder, config) if folder is not None else {}
    items: list[tuple[PairMeta, dict[str, torch.Tensor]]] = []
    gt_cache: dict[str, dict[str, np.ndarray]] = {}
    for n, (si, k, size_px) in enumerate(jobs):
        if deadline is not None and time.monotonic() > deadline and len(items) >= min_pairs:
            log.warning("data: time budget reached after %d of %d pairs", len(items), len(jobs))
            break
        sl = slices[si]
        pseed = pair_seed(seed, sl.slice_id, k)
        case = f"{sl.slice_id}/{k}"
        meta = index.get(case)
        if (
            folder is not None
            and meta is not None
            and meta.seed == pseed
            and (folder / case).with_suffix(".h5").is_file()
        ):
            sub = folder / sl.slice_id
            if sl.slice_id not in gt_cache:
                gt_cache[sl.slice_id] = read_gt(sub / "gt.h5")
            fields = _read_pair(sub, k, gt_cache[sl.slice_id])
            items.append((meta, {n_: v.to(store) for n_, v in fields.items()}))
        else:
            if fixed_masks is not None:
                (mask, kind), material = fixed_masks[k], "Ti"
            else:
                body = body_outline(sl.image_mu)
                mask, kind, material = draw_implant(body, pseed, size_px=size_px, bin_index=k)
            settings = pair_settings(sim_ranges, pseed, material)
            fields = simulate_pair(
                sl.image_mu, mask, material=material, seed=pseed, device=device, settings=settings
            )
            meta = describe_pair(
                sl.slice_id, k, pseed, material, kind, sl.image_mu,
                fields["ma_CT"].cpu().numpy(), mask,
            )  # fmt: skip
            if folder is not None:
                sub = folder / sl.slice_id
                gt_path = sub / "gt.h5"
                if not gt_path.is_file():
                    write_case(
                        sub, {n_: fields[n_] for n_ in ("image", "poly_CT", "poly_sinogram")}
                    )
                gt_cache.setdefault(sl.slice_id, read_gt(gt_path))
                write_case(sub, fields, k=k)
                index[case] = meta
                _write_index(folder, index, config)
                # the slice's cached gt (its first pair's poly_sinogram) is every pair's target
                fields = _read_pair(sub, k, gt_cache[sl.slice_id])
            items.append((meta, {n_: fields[n_].to(store) for n_ in _PAIR_FIELDS}))
        if progress is not None:
            progress(n + 1, len(jobs))
    return PairSet.stack(items, store)


def read_pair_folder(
    folder: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> PairSet:
    """Every ``<case>/<k>.h5`` of a SynDeepLesion-layout folder (ours or official; masks of
    official files are recovered as ``ma_CT > METAL_THRESHOLD_MU``), with prompt facts from
    ``pairs.json`` or computed (titanium assumed)."""
    folder = Path(folder)
    index = _read_index(folder)
    items = []
    for gt_path in find_gt_files(folder):
        sub = gt_path.parent
        rel = sub.relative_to(folder).as_posix().replace("/", "_") or sub.name
        gt = read_gt(gt_path)
        for h5 in sorted(sub.glob("*.h5"), key=lambda p: (len(p.stem), p.stem)):
            if h5.name == "gt.h5" or not h5.stem.isdigit():
                continue
            k = int(h5.stem)
            fields = _read_pair(sub, k, gt)
            meta = index.get(f"{rel}/{k}")
            if meta is None:
                mask = fields["mask"].numpy()
                meta = describe_pair(
                    rel, k, 0, "Ti", "unknown", gt["image"], fields["ma_CT"].numpy(), mask
                )
            items.append((meta, {n: v.to(device) for n, v in fields.items()}))
    if not items:
        raise BadInputError(f"{folder}: no SynDeepLesion cases (<case>/gt.h5 + <k>.h5) found")
    return PairSet.stack(items, device)
