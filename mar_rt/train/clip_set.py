"""DuDoCLIP's pairs at tower size (:class:`ClipSet`): what DuDoCLIP sees of simulated pairs
(:func:`clip_inputs`), optionally with each slice's metal-free scan, cached in one file."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mar_rt.ct import units
from mar_rt.ct.mar import fbp_with
from mar_rt.ct.projector import get_projector
from mar_rt.errors import BadInputError
from mar_rt.models import prompts
from mar_rt.models.dudoclip import resize_to_tower
from mar_rt.train.pair_meta import PairMeta, describe_pair
from mar_rt.train.pairs import GEOMETRY, PairSet, generate_pairs
from mar_rt.train.sources import CleanSlice

log = logging.getLogger(__name__)


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
    proj = get_projector(GEOMETRY, device=pairs.device, dtype=torch.float32)
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


def clip_inputs(pairs: PairSet, domain: str) -> torch.Tensor:
    """What DuDoCLIP sees (the pipeline's ``embed``): x(X_ma) or y(Y_ma), (N, 1, H, W)."""
    if domain == "image":
        return units.image_to_net(pairs.fields["ma_CT"])[:, None]
    return units.sino_to_net(pairs.fields["ma_sinogram"])[:, None]
