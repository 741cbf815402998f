"""One domain's training arrays (:class:`DomainData`) made from pairs: image, sinogram and
residual views at network scale, with loss weights and focus points.

Notation (DESIGN.md §3): x = clip(μ, 0, 0.5)/0.5 and y = clip(p, 0, 4)/4 are the network
scales (``mar_rt.ct.units``); the pair fields are named in ``pairs``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import mar_rt.ct as ct_package
from mar_rt.atomic import atomic_file
from mar_rt.ct import units
from mar_rt.ct.projector import get_projector
from mar_rt.train.pairs import GEOMETRY, PairSet

log = logging.getLogger(__name__)


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


def concat_domains(parts: list[DomainData]) -> DomainData:
    """One domain's arrays from several views of it (e.g. the same pairs as both routes make
    μ), items in order; the parts must share ``kind`` and device."""
    if not parts:
        raise ValueError("no domain data to concatenate")
    kinds = {p.kind for p in parts}
    if len(kinds) != 1:
        raise ValueError(f"cannot concatenate domains of kinds {sorted(kinds)}")
    if len(parts) == 1:
        return parts[0]
    return DomainData(
        kind=parts[0].kind,
        **{n: torch.cat([getattr(p, n) for p in parts]) for n in _ARRAYS},
        points=[pt for p in parts for pt in p.points],
    )


_ARRAYS = ("x0", "mu", "weight", "content", "artifact")


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


def with_nmar(
    pairs: PairSet, *, batch: int = 8, cache_dir: str | os.PathLike[str] | None = None
) -> PairSet:
    """``pairs`` plus ``NMAR_CT`` and ``NMAR_sinogram`` (DESIGN §6 on each pair's measured
    ``ma_sinogram``, its LI result and mask), for ``mu_source="nmar"``.

    ``cache_dir``: the two fields are kept there in one torch file named by a digest of the
    inputs (``ma_sinogram``, ``LI_CT``, ``mask``, ``metal_trace``) and of ``mar_rt.ct``'s source,
    and read back instead of computed when the same inputs come again under the same code
    (written under a temporary name, then renamed).
    """
    digest = _digest(pairs, ("ma_sinogram", "LI_CT", "mask", "metal_trace"))
    return _cached_fields(pairs, cache_dir, f"nmar-{digest}", lambda: _nmar_fields(pairs, batch))


def _nmar_fields(pairs: PairSet, batch: int) -> dict[str, torch.Tensor]:
    from mar_rt.ct.mar import nmar_from_li

    f = pairs.fields
    proj = get_projector(GEOMETRY, device=pairs.device, dtype=torch.float32)
    xs, ys = [], []
    for i in range(0, len(pairs), batch):
        sl = slice(i, i + batch)
        y, x, _ = nmar_from_li(
            f["ma_sinogram"][sl], f["LI_CT"][sl], f["mask"][sl], f["metal_trace"][sl], proj
        )
        xs.append(x)
        ys.append(y)
    return {"NMAR_CT": torch.cat(xs), "NMAR_sinogram": torch.cat(ys)}


def _digest(pairs: PairSet, names: tuple[str, ...], header: str = "") -> str:
    """Hex digest of ``header``, the fields ``names`` of ``pairs`` and the source of
    ``mar_rt.ct`` (the simulator, projector, FBP and NMAR that compute cached fields)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(header.encode())
    for name in names:
        t = pairs.fields[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy())
    for src in sorted(Path(ct_package.__file__).parent.glob("*.py")):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()


def _cached_fields(
    pairs: PairSet,
    cache_dir: str | os.PathLike[str] | None,
    key: str,
    compute: Callable[[], dict[str, torch.Tensor]],
) -> PairSet:
    """``pairs`` plus ``compute()``'s fields, kept in ``<cache_dir>/<key>.pt`` (written under a
    temporary name, then renamed) and read back from there when present."""
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.pt"
    if path is not None and path.is_file():
        stored = torch.load(path, map_location=pairs.device, weights_only=True)
        log.info("%s: %d pairs read from %s", key, len(pairs), path)
        return PairSet(pairs.metas, {**pairs.fields, **stored})
    t0 = time.monotonic()
    out = compute()
    if path is not None:
        with atomic_file(path) as tmp:
            torch.save({k: v.cpu() for k, v in out.items()}, tmp)
    log.info("%s: %d pairs computed in %.0f s", key, len(pairs), time.monotonic() - t0)
    return PairSet(pairs.metas, {**pairs.fields, **out})


def with_scanner_targets(
    pairs: PairSet, *, sim_ranges: str, filter: str = "ram-lak",
    cache_dir: str | os.PathLike[str] | None = None,
) -> PairSet:  # fmt: skip
    """``pairs`` plus the metal-free image each pair's own scanner would make, for
    ``DataConfig.image_target="scanner"`` (the target is the metal artifact, not the
    simulator's calibration or resolution):

        scanner_CT      FBP(E[Y]) with ``filter``: the measured route reconstructs the
                        scanner's sinogram with the pipeline's kernel
        scanner_CT_own  FBP(E[Y]) with the pair's own kernel: the image-only route starts from
                        the scanner's image

    E[Y] is the pair's metal-free polychromatic sinogram under its own simulator settings
    (``pairs.pair_settings``: spectrum, resolution, beam-hardening correction, scatter), with
    expected counts instead of Poisson draws. (N, H, W) μ in cm⁻¹, on the pairs' device.
    ``cache_dir``: kept and read back as :func:`with_nmar` does, named by a digest of the
    images, masks, seeds, metals, ``sim_ranges``, ``filter`` and ``mar_rt.ct``'s source.
    """
    seeds = "|".join(f"{m.seed}:{m.material}" for m in pairs.metas)
    digest = _digest(pairs, ("image", "mask"), f"{sim_ranges}|{filter}|{seeds}")
    return _cached_fields(
        pairs, cache_dir, f"scanner-{digest}", lambda: _scanner_fields(pairs, sim_ranges, filter)
    )


def _scanner_fields(pairs: PairSet, sim_ranges: str, filter: str) -> dict[str, torch.Tensor]:
    from mar_rt.ct.simulate import metal_free_scan
    from mar_rt.train.pairs import pair_settings

    f = pairs.fields
    proj = get_projector(GEOMETRY, device=pairs.device, dtype=torch.float32)
    own, ours = [], []
    for i, meta in enumerate(pairs.metas):
        settings = pair_settings(sim_ranges, meta.seed, meta.material)
        scan = metal_free_scan(
            f["image"][i], f["mask"][i], settings=settings, geometry=GEOMETRY, projector=proj,
            filter=filter,
        )  # fmt: skip
        own.append(scan["poly_CT"].to(pairs.device))
        ours.append(scan["image"].to(pairs.device))
    return {"scanner_CT": torch.stack(ours), "scanner_CT_own": torch.stack(own)}


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
    pairs: PairSet, content: torch.Tensor, artifact: torch.Tensor, *,
    mu_source: str = "li", target: str = "image",
) -> DomainData:  # fmt: skip
    """Image domain: μ = x(X_LI) (or x(X_NMAR), x(X_ma)), target x(X) (or the field
    ``target``, e.g. ``scanner_CT`` of :func:`with_scanner_targets`), metal pixels weighted 0."""
    f = pairs.fields
    if target not in f:
        raise ValueError(f"image target {target!r} is not among the pairs' fields")
    mu = _mu_field(pairs, "image", mu_source)
    mask = f["mask"]
    return DomainData(
        kind="image",
        x0=units.image_to_net(f[target])[:, None],
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
