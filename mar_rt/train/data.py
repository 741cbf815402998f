"""Training and validation pairs: simulation, caching, split, augmentation and patch batches.

Notation (DESIGN.md §3, §5):

    X, X_ma, X_LI   clean ``image``, ``ma_CT``, ``LI_CT`` (μ, cm⁻¹, (416, 416))
    Y, Y_ma, Y_LI   metal-free ``poly_sinogram``, ``ma_sinogram``, ``LI_sinogram`` ((640, 641))
    M, Tr           metal mask and ``metal_trace`` (bool)
    x = clip(μ, 0, 0.5)/0.5 and y = clip(p, 0, 4)/4      network scales (``mar_rt.ct.units``)
    pair            one clean slice × one procedural implant, simulated with
                    ``mar_rt.ct.simulate.simulate_metal_artifact`` (seeded)
    case            ``<slice_id>/<k>``: the pair's place in the SynDeepLesion layout
                    (``<root>/<slice_id>/gt.h5`` + ``<root>/<slice_id>/<k>.h5``)

Split: by clean slice, never by pair. ``RESERVED_VAL_ID`` (SynDeepLesion 000321_03_01/011)
and the other ids in ``VAL_IDS`` are validation slices; :func:`split_slices` refuses to put
them into the training set, so no pair of theirs is ever trained on.

Seeds: pair k of slice s uses ``pair_seed(seed, s, k)`` (sha256 of the three) for its mask
size, kind, material and noise, so a pair is the same whatever else is generated with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mar_rt.ct import units
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.mar import fbp_with
from mar_rt.ct.masks import body_outline, generate_metal_mask, suitable_kinds
from mar_rt.ct.projector import get_projector
from mar_rt.ct.simulate import simulate_metal_artifact
from mar_rt.ct.syndeeplesion import read_case, read_gt, write_case
from mar_rt.errors import BadInputError
from mar_rt.models import prompts
from mar_rt.models.dudoclip import resize_to_tower
from mar_rt.train.phantoms import ellipse_phantom
from mar_rt.train.sources import CleanSlice

log = logging.getLogger(__name__)

RESERVED_VAL_ID = "sdl_000321_03_01_011"
"""SynDeepLesion 000321_03_01/011: validation only, never trained on."""

VAL_IDS = (RESERVED_VAL_ID, "cleanct_000374_06_01_278")
"""Validation slices: the reserved one plus one more clean slice training never sees."""

VAL_SIZES_PX = (2061, 890, 881, 451, 254, 124, 118, 112, 53, 35)
"""Metal sizes of the validation masks: the published SynDeepLesion test sizes, which cover
every reporting size group (``mar_rt.ct.metrics.SIZE_GROUPS``) twice."""

TRAIN_SIZE_BINS = ((30, 77), (77, 121), (121, 339), (339, 886), (886, 2500))
"""Training mask sizes (px at 416²): pair k of a slice draws log-uniformly inside one bin,
cycling through the bins (one bin per reporting size group)."""

MATERIALS = (("Ti", 0.7), ("Fe", 0.2), ("Cu", 0.05), ("Au", 0.05))
"""Implant metals of training pairs and their probabilities (validation is all titanium)."""

INDEX = "pairs.json"
"""Per-folder index of the pairs written by this module (metadata and prompt facts)."""

_GEOMETRY = FanBeamGeometry.syndeeplesion()


# --- split --------------------------------------------------------------------------------
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


# --- pair metadata ----------------------------------------------------------------------------
def pair_seed(seed: int, slice_id: str, k: int) -> int:
    """A 63-bit seed from (seed, slice_id, k), stable across machines and Python versions."""
    digest = hashlib.sha256(f"{int(seed)}|{slice_id}|{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class PairMeta:
    """What is known about one pair: where it lives, how it was drawn and its prompt facts."""

    slice_id: str
    k: int
    seed: int
    material: str
    metal_px: int
    kind: str
    severity: str
    anatomy: str
    metal: dict[str, Any] = field(default_factory=dict)

    @property
    def case(self) -> str:
        return f"{self.slice_id}/{self.k}"

    def facts(self) -> prompts.PromptFacts:
        m = dict(self.metal)
        m["component_px"] = tuple(m.get("component_px", ()))
        return prompts.PromptFacts(prompts.MetalFacts(**m), self.severity, self.anatomy)

    def content_texts(self) -> list[str]:
        """Every phrasing of the content text (template seeds 0..n−1)."""
        f = self.facts()
        return sorted({prompts.content_text(f, seed=s) for s in range(3)})

    def artifact_texts(self) -> list[str]:
        """Every phrasing of the artifact text (template × severity wording)."""
        f = self.facts()
        return sorted({prompts.artifact_text(f, seed=s) for s in range(6)})

    def zero_shot_target(self) -> int:
        return prompts.zero_shot_target(self.facts())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairMeta:
        return cls(**d)


def describe_pair(
    slice_id: str, k: int, seed: int, material: str, kind: str,
    image: np.ndarray, ma_ct: np.ndarray, mask: np.ndarray,
) -> PairMeta:  # fmt: skip
    """Prompt facts of a simulated pair (``mar_rt.models.prompts``): metal facts from the mask,
    severity from ``ma_CT`` against ``image``, anatomy from the clean image."""
    body = body_outline(image)
    metal = prompts.describe_metal(mask, material=material, body_mask=body if body.any() else None)
    severity = prompts.severity_from_error(ma_ct, image, mask)
    anatomy = prompts.anatomy_from_image(image, metal_mask=mask)
    return PairMeta(
        slice_id=slice_id, k=int(k), seed=int(seed), material=material,
        metal_px=int(mask.sum()), kind=kind, severity=severity, anatomy=anatomy,
        metal=json.loads(json.dumps(metal.to_dict())),  # the form pairs.json gives back
    )  # fmt: skip


# --- simulation -------------------------------------------------------------------------------
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


def simulate_pair(
    image_mu: np.ndarray, mask: np.ndarray, *, material: str, seed: int, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """``simulate_metal_artifact`` on ``device`` → the official fields as tensors there."""
    x = torch.from_numpy(np.ascontiguousarray(image_mu, dtype=np.float32)).to(device)
    m = torch.from_numpy(np.ascontiguousarray(mask)).to(device)
    return simulate_metal_artifact(x, m, geometry=_GEOMETRY, material=material, seed=seed)


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
        mask = (case["ma_CT"] > 0.672).astype(np.float32)
    out = {
        "image": gt["image"], "poly_sinogram": gt["poly_sinogram"],
        "ma_CT": case["ma_CT"], "LI_CT": case["LI_CT"],
        "ma_sinogram": case["ma_sinogram"], "LI_sinogram": case["LI_sinogram"],
    }  # fmt: skip
    t = {n: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for n, v in out.items()}
    t["mask"] = torch.from_numpy(mask > 0.5)
    t["metal_trace"] = torch.from_numpy(case["metal_trace"] > 0.5)
    return t


def _read_index(folder: Path) -> dict[str, PairMeta]:
    path = folder / INDEX
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
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
    when given, is pair k's titanium implant (validation).
    """
    store = torch.device(store_device or device)
    folder = Path(cache_dir) if cache_dir is not None else None
    index = _read_index(folder) if folder is not None else {}
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
            fields = simulate_pair(sl.image_mu, mask, material=material, seed=pseed, device=device)
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
                _write_index(folder, index, {"seed": int(seed)})
                # the slice's cached gt (its first pair's poly_sinogram) is every pair's target
                fields = _read_pair(sub, k, gt_cache[sl.slice_id])
            items.append((meta, {n_: fields[n_].to(store) for n_ in _PAIR_FIELDS}))
        if progress is not None:
            progress(n + 1, len(jobs))
    return PairSet.stack(items, store)


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


@dataclass
class ClipSet:
    """DuDoCLIP's pairs at tower size: ``inputs[domain]`` (N, 1, S, S) is :func:`clip_inputs`
    resized to S² as DuDoCLIP resizes (``resize_to_tower``), one PairMeta each."""

    metas: list[PairMeta]
    inputs: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.metas)


def clip_set(
    slices: Sequence[CleanSlice],
    jobs: Sequence[tuple[int, int, int | None]],
    *,
    seed: int,
    size: int,
    device: str | torch.device = "cpu",
    cache_file: str | os.PathLike[str] | None = None,
    chunk: int = 32,
    progress: Callable[[int, int], None] | None = None,
    clean: bool = False,
    deadline: float | None = None,
) -> ClipSet:
    """Simulate the pairs ``jobs`` of ``slices`` exactly as :func:`generate_pairs` does (same
    seeds: a case here equals the U-Net set's case of the same name) and keep only both
    domains' CLIP inputs at ``size``², ``chunk`` pairs in memory at a time.

    ``clean``: add one metal-free scan per slice (case ``<slice_id>/-1``, no metal, zero-shot
    label "no metal"): the simulator's ``poly_CT`` / ``poly_sinogram`` of the slice's first
    pair, the same noisy polychromatic scan without the implant. Anatomy alone then points
    to "no metal", so the controller has to look at the metal and its streaks.

    ``cache_file``: one torch file holding the set and its key (seed, size, the cases, the
    prompt templates' digest); read when the key matches, else rewritten (temporary name,
    then rename).

    ``deadline`` (``time.monotonic()`` value): stop between chunks once it has passed, after
    at least one chunk, with the pairs made so far (``jobs`` interleave the slices, see
    :func:`training_jobs`, so every slice is still covered); the cache then holds that set.
    """

    def cache_key(todo: Sequence[tuple[int, int, int | None]]) -> str:
        return json.dumps(
            {
                "seed": int(seed),
                "size": int(size),
                "cases": [f"{slices[i].slice_id}/{k}/{s}" for i, k, s in todo],
                "prompts": prompts.template_digest(),
                "clean": bool(clean),
            }
        )

    path = Path(cache_file) if cache_file is not None else None
    if path is not None and path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == cache_key(jobs):
            metas = [PairMeta.from_dict(d) for d in json.loads(stored["metas"])]
            return ClipSet(metas, {d: stored[d] for d in ("image", "sinogram")})
        log.info("%s: made for other pairs; simulating again", path)
    metas: list[PairMeta] = []
    parts: dict[str, list[torch.Tensor]] = {"image": [], "sinogram": []}
    for i in range(0, len(jobs), chunk):
        if deadline is not None and metas and time.monotonic() > deadline:
            log.info("clip_set: time budget spent after %d of %d pairs", i, len(jobs))
            jobs = jobs[:i]
            break
        pairs = generate_pairs(slices, jobs[i : i + chunk], seed=seed, device=device)
        if clean:
            pairs = _with_clean_scans(pairs, slices, {m.slice_id for m in metas})
        for domain, out in parts.items():
            out.append(resize_to_tower(clip_inputs(pairs, domain), size).cpu())
        metas += pairs.metas
        if progress is not None:
            progress(min(i + chunk, len(jobs)), len(jobs))
    if not metas:
        raise BadInputError("clip_set: no pairs to simulate")
    inputs = {d: torch.cat(v) for d, v in parts.items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        metas_json = json.dumps([m.to_dict() for m in metas])
        torch.save({"key": cache_key(jobs), "metas": metas_json, **inputs}, tmp)
        os.replace(tmp, path)
    return ClipSet(metas, inputs)


def _with_clean_scans(pairs: PairSet, slices: Sequence[CleanSlice], done: set[str]) -> PairSet:
    """``pairs`` plus the metal-free scan (``poly_CT`` = FBP of ``poly_sinogram``, as the
    simulator reconstructs it) of every slice met here for the first time (not in ``done``).
    Only the fields :func:`clip_inputs` reads are kept."""
    images = {s.slice_id: s.image_mu for s in slices}
    proj = get_projector(_GEOMETRY, device=pairs.device, dtype=torch.float32)
    metas = list(pairs.metas)
    ma_ct, ma_sino = [pairs.fields["ma_CT"]], [pairs.fields["ma_sinogram"]]
    seen = set(done)
    for j, meta in enumerate(pairs.metas):
        if meta.slice_id in seen:
            continue
        seen.add(meta.slice_id)
        poly_sino = pairs.fields["poly_sinogram"][j]
        poly_ct = fbp_with(proj, poly_sino, "ram-lak")
        image = images[meta.slice_id]
        metas.append(
            describe_pair(
                meta.slice_id, -1, meta.seed, meta.material, "none", image,
                poly_ct.cpu().numpy(), np.zeros(image.shape, bool),
            )
        )  # fmt: skip
        ma_ct.append(poly_ct[None])
        ma_sino.append(poly_sino[None])
    return PairSet(metas, {"ma_CT": torch.cat(ma_ct), "ma_sinogram": torch.cat(ma_sino)})


def validation_jobs(
    slices: Sequence[CleanSlice], sizes: Sequence[int] = VAL_SIZES_PX
) -> list[tuple[int, int, int]]:
    """Every validation slice × every size in ``sizes`` (k = size rank)."""
    return [(i, k, s) for i in range(len(slices)) for k, s in enumerate(sizes)]


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
        store_device=store_device, fixed_masks=masks,
    )  # fmt: skip
    stack = np.stack([m for m, _ in masks], axis=-1).astype(np.uint8)
    tmp = out / ".testmask.npy.tmp.npy"
    np.save(tmp, stack)
    os.replace(tmp, out / "testmask.npy")
    return pairs


def read_pair_folder(
    folder: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> PairSet:
    """Every ``<case>/<k>.h5`` of a SynDeepLesion-layout folder (ours or official; masks of
    official files are recovered as ``ma_CT > 0.672``), with prompt facts from ``pairs.json``
    or computed (titanium assumed)."""
    folder = Path(folder)
    index = _read_index(folder)
    items = []
    for gt_path in sorted(folder.rglob("gt.h5")):
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


# --- augmentation and patch batches ---------------------------------------------------------------
def rot_flip(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate the last two dims by k·90° (counter-clockwise), then mirror columns if ``flip``."""
    x = torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x
    return torch.flip(x, dims=(-1,)) if flip else x


def sino_roll_mirror(y: torch.Tensor, shift: int, mirror: bool) -> torch.Tensor:
    """The sinogram of the object rotated by 2π·shift/V (views rolled) and then mirrored in x
    (view k → (V/2 − k) mod V with the detector reversed; DESIGN §4 orientation)."""
    n_views = y.shape[-2]
    y = torch.roll(y, shifts=int(shift), dims=-2) if shift % n_views else y
    if mirror:
        idx = (n_views // 2 - torch.arange(n_views, device=y.device)) % n_views
        y = torch.flip(y.index_select(-2, idx), dims=(-1,))
    return y


def _randint(hi: int, gen: torch.Generator) -> int:
    return int(torch.randint(hi, (1,), generator=gen).item())


def _uniform(gen: torch.Generator) -> float:
    return float(torch.rand((1,), generator=gen).item())


def focus_points(focus: torch.Tensor, max_points: int = 4096) -> list[torch.Tensor]:
    """Per item of bool (N, H, W): up to ``max_points`` (row, col) of its True pixels (CPU
    int32, evenly strided), where focused crops are centred."""
    out = []
    for f in focus.cpu():
        pts = f.nonzero().to(torch.int32)
        if len(pts) > max_points:
            pts = pts[torch.linspace(0, len(pts) - 1, max_points).long()]
        out.append(pts)
    return out


def crop_origin(
    shape: tuple[int, int], patch: int, points: torch.Tensor | None, p_focus: float,
    gen: torch.Generator, *, wrap_rows: bool = False,
) -> tuple[int, int]:  # fmt: skip
    """Top-left (row, col) of a ``patch``² crop: with probability ``p_focus`` centred on one of
    ``points`` (clamped inside), otherwise uniform. ``wrap_rows``: rows are periodic (views)."""
    h, w = shape
    ph, pw = min(patch, h), min(patch, w)
    if points is not None and len(points) and _uniform(gen) < p_focus:
        r, c = (int(v) for v in points[_randint(len(points), gen)].tolist())
        row = (r - ph // 2) % h if wrap_rows else min(max(r - ph // 2, 0), h - ph)
        return row, min(max(c - pw // 2, 0), w - pw)
    return _randint(h if wrap_rows else h - ph + 1, gen), _randint(w - pw + 1, gen)


@dataclass(eq=False)
class DomainData:
    """One domain's training arrays, network scale, all (N, 1, H, W) on one device.

    ``x0`` target, ``mu`` the state the SDE reverts to, ``weight`` per-pixel loss weight,
    ``points`` per item the (row, col) where focused crops are centred (metal neighbourhood or
    trace; CPU), ``content``/``artifact`` the frozen DuDoCLIP embeddings (N, D). ``kind``:
    "image"/"residual" (rotations and flips) or "sinogram" (view rolls and mirrors).
    """

    kind: str
    x0: torch.Tensor
    mu: torch.Tensor
    weight: torch.Tensor
    points: list[torch.Tensor]
    content: torch.Tensor
    artifact: torch.Tensor

    def __len__(self) -> int:
        return int(self.x0.shape[0])


def sample_batch(
    data: DomainData, batch: int, patch: int | None, gen: torch.Generator, *,
    jitter: float = 0.0, p_focus: float = 0.7, augment: bool = True,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A random batch of augmented patches: ``x0``, ``mu``, ``weight`` (B, 1, P, P) and the
    embeddings (B, D), on the data's device.

    Every random choice comes from ``gen``, a CPU generator, so batches do not depend on the
    device. Image and residual patches are cropped, then rotated by k·90° and mirrored;
    sinogram patches are cropped with periodic views (= a rotation of the object) and
    mirrored by reversing views and detector (= the object mirrored, DESIGN §4 orientation).
    ``jitter`` scales target and μ together by 1 ± jitter.
    """
    n = len(data)
    idx = torch.randint(n, (batch,), generator=gen).tolist()
    xs, mus, ws = [], [], []
    sino = data.kind == "sinogram"
    for i in idx:
        x0, mu, w = data.x0[i], data.mu[i], data.weight[i]
        h, wd = x0.shape[-2:]
        if patch is not None:
            r, c = crop_origin((h, wd), patch, data.points[i], p_focus, gen, wrap_rows=sino)
            p = min(patch, h), min(patch, wd)
            if sino:
                rows = (torch.arange(p[0], device=x0.device) + r) % h
                x0, mu, w = (a.index_select(-2, rows)[..., c : c + p[1]] for a in (x0, mu, w))
            else:
                x0, mu, w = (a[..., r : r + p[0], c : c + p[1]] for a in (x0, mu, w))
        if augment:
            if sino and patch is None:
                shift, mirror = _randint(h, gen), _uniform(gen) < 0.5
                x0, mu, w = (sino_roll_mirror(a, shift, mirror) for a in (x0, mu, w))
            elif sino:
                if _uniform(gen) < 0.5:
                    x0, mu, w = (torch.flip(a, dims=(-2, -1)) for a in (x0, mu, w))
            else:
                k, flip = _randint(4, gen), _uniform(gen) < 0.5
                x0, mu, w = (rot_flip(a, k, flip) for a in (x0, mu, w))
            if jitter > 0:
                s = 1.0 + jitter * (2.0 * _uniform(gen) - 1.0)
                x0, mu = x0 * s, mu * s
                if data.kind != "residual":
                    x0, mu = x0.clamp(0.0, 1.0), mu.clamp(0.0, 1.0)
        xs.append(x0)
        mus.append(mu)
        ws.append(w)
    sel = torch.as_tensor(idx, device=data.content.device)
    return {
        "x0": torch.stack(xs),
        "mu": torch.stack(mus),
        "weight": torch.stack(ws),
        "content": data.content[sel],
        "artifact": data.artifact[sel],
    }


def dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Binary dilation of bool (N, H, W) by a (2px+1)² square (max pooling)."""
    if px <= 0:
        return mask
    f = F.max_pool2d(mask[:, None].float(), 2 * px + 1, stride=1, padding=px)
    return f[:, 0] > 0.5


_MU_FIELDS = {
    "image": {"li": "LI_CT", "nmar": "NMAR_CT", "ma": "ma_CT"},
    "sinogram": {"li": "LI_sinogram", "nmar": "NMAR_sinogram", "ma": "ma_sinogram"},
}


def with_nmar(pairs: PairSet, *, batch: int = 8) -> PairSet:
    """``pairs`` plus ``NMAR_CT`` and ``NMAR_sinogram`` (DESIGN §6 on each pair's measured
    ``ma_sinogram``, its LI result and mask), for ``mu_source="nmar"``."""
    from mar_rt.ct.mar import nmar_from_li

    f = pairs.fields
    proj = get_projector(_GEOMETRY, device=pairs.device, dtype=torch.float32)
    xs, ys = [], []
    for i in range(0, len(pairs), batch):
        sl = slice(i, i + batch)
        y, x, _ = nmar_from_li(
            f["ma_sinogram"][sl], f["LI_CT"][sl], f["mask"][sl], f["metal_trace"][sl], proj
        )
        xs.append(x)
        ys.append(y)
    return PairSet(pairs.metas, {**f, "NMAR_CT": torch.cat(xs), "NMAR_sinogram": torch.cat(ys)})


def _mu_field(pairs: PairSet, domain: str, mu_source: str) -> torch.Tensor:
    name = _MU_FIELDS[domain].get(mu_source)
    if name is None:
        raise ValueError(
            f"mu_source must be one of {sorted(_MU_FIELDS[domain])}, got {mu_source!r}"
        )
    if name not in pairs.fields:
        raise ValueError(f"mu_source {mu_source!r} needs the pairs' {name} (see with_nmar)")
    return pairs.fields[name]


def image_domain(
    pairs: PairSet, content: torch.Tensor, artifact: torch.Tensor, *, mu_source: str = "li"
) -> DomainData:
    """Image domain: μ = x(X_LI) (or x(X_NMAR), x(X_ma)), target x(X), metal pixels
    weighted 0."""
    f = pairs.fields
    mu = _mu_field(pairs, "image", mu_source)
    mask = f["mask"]
    return DomainData(
        kind="image",
        x0=units.image_to_net(f["image"])[:, None],
        mu=units.image_to_net(mu)[:, None],
        weight=(~mask).float()[:, None],
        points=focus_points(dilate(mask, 24)),
        content=content,
        artifact=artifact,
    )


def sinogram_domain(
    pairs: PairSet, content: torch.Tensor, artifact: torch.Tensor, *,
    mu_source: str = "li", trace_dilate: int = 3, outside_weight: float = 0.05,
) -> DomainData:  # fmt: skip
    """Sinogram domain: μ = y(Y_LI) (or y(Y_NMAR), y(Y_ma)), target y(Y); the loss weight is
    1 on the trace dilated by ``trace_dilate`` bins and ``outside_weight`` elsewhere, since
    only the trace survives OSRO's fidelity step (DESIGN §9 calibration)."""
    f = pairs.fields
    mu = _mu_field(pairs, "sinogram", mu_source)
    near = dilate(f["metal_trace"], trace_dilate)
    weight = torch.where(near, 1.0, outside_weight).float()
    return DomainData(
        kind="sinogram",
        x0=units.sino_to_net(f["poly_sinogram"])[:, None],
        mu=units.sino_to_net(mu)[:, None],
        weight=weight[:, None],
        points=focus_points(f["metal_trace"]),
        content=content,
        artifact=artifact,
    )


def residual_domain(
    image: torch.Tensor, x_p_prime: torch.Tensor, residual: torch.Tensor, mask: torch.Tensor,
    content: torch.Tensor, artifact: torch.Tensor, *, scale: float,
) -> DomainData:  # fmt: skip
    """Residual domain (DESIGN §8 step 3): μ = clip(R/scale, −1, 1) with R = X̃_p − X'_p,
    target clip((X − X'_p)/scale, −1, 1); metal pixels weighted 0. Inputs (N, H, W) μ."""
    return DomainData(
        kind="residual",
        x0=torch.clamp((image - x_p_prime) / scale, -1.0, 1.0)[:, None],
        mu=torch.clamp(residual / scale, -1.0, 1.0)[:, None],
        weight=(~mask).float()[:, None],
        points=focus_points(dilate(mask, 24)),
        content=content,
        artifact=artifact,
    )


def clip_inputs(pairs: PairSet, domain: str) -> torch.Tensor:
    """What DuDoCLIP sees (the pipeline's ``embed``): x(X_ma) or y(Y_ma), (N, 1, H, W)."""
    if domain == "image":
        return units.image_to_net(pairs.fields["ma_CT"])[:, None]
    return units.sino_to_net(pairs.fields["ma_sinogram"])[:, None]
