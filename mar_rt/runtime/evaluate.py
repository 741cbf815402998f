"""``mar-rt eval``: PSNR / SSIM of input, LI, NMAR and DuDoCROP on a SynDeepLesion-layout folder
(DESIGN.md §9), per case and per metal-size group, as a table and as JSON.

Layout: ``<case>/gt.h5`` + ``<case>/<k>.h5``, found recursively (through symbolic links to
folders too). Metal masks: ``DIR/testmask.npy`` (512 × 512 × K, mask k for ``<k>.h5``,
bilinear-resized to the grid and thresholded at 0.5) when present, else the case file's own
``mask`` (cases written by ``mar_rt.ct.syndeeplesion.write_case`` carry it), else segmented
from ``ma_CT`` (μ > ``mar_rt.ct.mar.METAL_THRESHOLD_MU``). Scores always use that mask.

Routes (DESIGN §8, "Image-only input"):

    sinogram     the methods see the file's measured ``ma_sinogram`` (and ``LI_sinogram``) and
                 the mask above
    image_only   the methods see ``ma_CT`` alone, as on a workstation: Y_ma = FP(ma_CT)
                 (synthetic) and the mask segmented from ``ma_CT``; ``li_official`` stays the
                 file's LI_CT, a fixed reference in both routes

Methods:

    input        ma_CT as given
    li           FBP(LI_sinogram) with our reconstructor (the one the pipeline uses); on the
                 image-only route LI of FP(ma_CT) across FP(mask) > 0, same FBP
    li_official  the file's LI_CT (another reconstructor: compare gains against ``li``)
    nmar         NMAR (mar_rt.ct.mar) from ma_sinogram (image-only: FP(ma_CT)) and the mask
    dudocrop     the full pipeline of the bundle
    sde_only     ablation: IR-SDE without DuDoCLIP (zero embeddings)
    dapg_only    ablation: DAPG priors without OSRO (output X_p)
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.mar import METAL_THRESHOLD_MU, segment_metal
from mar_rt.ct.syndeeplesion import find_gt_files
from mar_rt.errors import BadInputError, MarRtError

log = logging.getLogger(__name__)

CLASSIC_METHODS = ("input", "li", "li_official", "nmar")
NETWORK_METHODS = ("dudocrop", "sde_only", "dapg_only")
METHODS = CLASSIC_METHODS + NETWORK_METHODS
DEFAULT_METHODS = ("input", "li", "li_official", "nmar", "dudocrop")
ABLATION_OF = {"dudocrop": "full", "sde_only": "sde_only", "dapg_only": "dapg_only"}
ROUTES = ("sinogram", "image_only")


@dataclass(frozen=True)
class EvalCase:
    """One ``<k>.h5`` with its ``gt.h5``; ``name`` is the path relative to the root, no suffix."""

    name: str
    k: int
    case_path: Path
    gt_path: Path


def find_cases(root: str | Path) -> list[EvalCase]:
    """Every ``<k>.h5`` below ``root`` whose folder has a ``gt.h5``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(f"{root}: not a folder")
    cases = []
    for gt in find_gt_files(root):
        for f in sorted(gt.parent.glob("*.h5")):
            if re.fullmatch(r"\d+", f.stem):
                rel = f.relative_to(root).with_suffix("").as_posix()
                cases.append(EvalCase(rel, int(f.stem), f, gt))
    return cases


def group_key(metal_px: float) -> str:
    """The size group of ``metal_px`` as a pixel range, e.g. ``"339-885"`` or ``"886+"``."""
    from mar_rt.ct.metrics import SIZE_GROUPS, size_group

    label = size_group(metal_px)
    g = next(g for g in SIZE_GROUPS if g.label == label)
    return f"{int(g.lo)}+" if math.isinf(g.hi) else f"{int(g.lo)}-{int(math.ceil(g.hi)) - 1}"


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 0/1 mask resized bilinearly (as the official test code does) and thresholded at 0.5."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    if tuple(m.shape[-2:]) != tuple(shape):
        m = F.interpolate(m, size=shape, mode="bilinear", align_corners=False)
    return (m[0, 0] >= 0.5).numpy()


def load_test_masks(root: Path) -> np.ndarray | None:
    """``root/testmask.npy`` (H, W, K) as bool, or None when absent."""
    path = root / "testmask.npy"
    if not path.is_file():
        return None
    masks = np.load(path, allow_pickle=False)
    if masks.ndim != 3:
        raise BadInputError(f"{path}: expected (H, W, K) masks, got shape {masks.shape}")
    return masks


def scoring_mask(
    case: EvalCase,
    data: dict[str, np.ndarray],
    test_masks: np.ndarray | None,
    grid: tuple[int, int],
    root: str | Path,
) -> torch.Tensor:
    """The mask a case is scored with (the module docstring): ``testmask.npy``'s mask k resized
    to ``grid``, else the case file's own ``mask``, else segmented from ``ma_CT``.

    BadInputError: ``testmask.npy`` has no mask k."""
    if test_masks is not None:
        if case.k >= test_masks.shape[-1]:
            raise BadInputError(
                f"{Path(root) / 'testmask.npy'} has {test_masks.shape[-1]} masks; "
                f"{case.case_path} needs mask {case.k}"
            )
        return torch.from_numpy(resize_mask(test_masks[..., case.k], grid))
    if "mask" in data:  # our simulated cases carry their true mask
        return torch.from_numpy(np.asarray(data["mask"]) > 0.5)
    return segment_metal(torch.from_numpy(data["ma_CT"]), METAL_THRESHOLD_MU)


def seen_mask(ma_ct: torch.Tensor, mask: torch.Tensor, image_only: bool) -> torch.Tensor:
    """The mask the methods see on a route: the true ``mask`` with a measured sinogram, the one
    segmented from ``ma_CT`` (μ > ``METAL_THRESHOLD_MU``) on the image-only route."""
    return segment_metal(ma_ct, METAL_THRESHOLD_MU) if image_only else mask


def method_output(
    method: str,
    data: dict[str, np.ndarray],
    mask: torch.Tensor,
    *,
    image_only: bool,
    projector: Any,
    filter: str,
    pipeline: Any = None,
    steps: int | None = None,
    seed: int = 0,
    where: str | Path = "",
) -> torch.Tensor:
    """One method's image (μ, cm⁻¹, (H, W), on the CPU) for one case on one route.

    ``data``: the case file (``read_case``: ``ma_CT``, ``ma_sinogram``, ``LI_sinogram``,
    ``LI_CT``); ``mask``: the metal mask the methods see on this route (:func:`seen_mask`).
    ``projector``: the CT-view operators of the pipeline (or of
    ``select_operators``); ``pipeline``: the bundle's pipeline for a network method.

    MarRtError: a pipeline whose QA record disagrees with the route (``where`` names the case).
    """
    from mar_rt.ct.mar import li_correct, nmar_correct

    ma_ct = torch.from_numpy(data["ma_CT"])
    if method == "input":
        return ma_ct
    if method == "li_official":
        return torch.from_numpy(data["LI_CT"])
    if method == "li" and not image_only:
        li_sino = torch.from_numpy(data["LI_sinogram"]).to(projector.device)
        return projector.fbp(li_sino, filter=filter).cpu()
    geometry = projector.geometry
    if method == "li":
        return li_correct(
            ma_ct.to(projector.device), mask.to(projector.device), geometry,
            projector=projector, filter=filter, allow_edge=True,
        )["li_image"].cpu()  # fmt: skip
    if method == "nmar":
        sino = None if image_only else torch.from_numpy(data["ma_sinogram"]).to(projector.device)
        return nmar_correct(
            ma_ct.to(projector.device), mask.to(projector.device), geometry, sinogram=sino,
            projector=projector, filter=filter, allow_edge=True,
        )["nmar_image"].cpu()  # fmt: skip
    out = pipeline(
        ma_ct,
        sinogram=None if image_only else torch.from_numpy(data["ma_sinogram"]),
        sinogram_is_measured=not image_only,
        mask=mask,
        steps=steps,
        seed=seed,
        return_intermediates=False,
    )
    synthetic = {s.sinogram_synthetic for s in out.qa.slices}
    if synthetic != {image_only}:
        raise MarRtError(
            f"{where}: the {method} QA record says sinogram_synthetic={sorted(synthetic)} on the "
            f"{_route(image_only)} route"
        )
    return out.output.cpu()


def evaluate(
    root: str | Path,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    bundle: str | Path | None = None,
    backend: str = "torch",
    device: str = "cpu",
    steps: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    image_only: bool = False,
) -> dict[str, Any]:
    """Score ``methods`` on every case below ``root``; returns the JSON-able result.

    Shape: ``{"methods": {m: {"psnr", "ssim", "groups": {range: {"psnr", "ssim", "n"}}}},
    "cases": [{"case", "metal_px", m: {"psnr", "ssim"}}], "bundle", "backend", "steps",
    "seconds", "route"}``. ``route`` is ``"image_only"`` when ``image_only`` (every method from
    ``ma_CT`` alone, see the module docstring), else ``"sinogram"``. Network methods need
    ``bundle``; the geometry is the bundle's (SynDeepLesion without one).

    BadInputError: no cases, unknown methods, shapes that do not fit the geometry.
    MarRtError: a pipeline whose QA record disagrees with the route.
    """
    from mar_rt.ct import metrics
    from mar_rt.ct.syndeeplesion import read_case, read_image
    from mar_rt.runtime.operators import select_operators

    t_start = time.perf_counter()
    root = Path(root)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BadInputError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    cases = find_cases(root)
    if not cases:
        raise BadInputError(f"{root}: no SynDeepLesion cases (<case>/gt.h5 + <case>/<k>.h5)")
    nets = [m for m in methods if m in NETWORK_METHODS]
    pipelines: dict[str, Any] = {}
    geometry = FanBeamGeometry.syndeeplesion()
    fbp_filter = "ram-lak"
    base = None
    if nets:
        if bundle is None:
            raise BadInputError(f"method(s) {nets} need a bundle (--bundle)")
        from mar_rt.runtime.pipeline import DuDoCROPPipeline

        base = DuDoCROPPipeline.from_bundle(bundle, backend=backend, device=device)
        geometry, fbp_filter = base.geometry, base.config.fbp_filter
        for m in nets:
            pipelines[m] = base.with_config(base.config.ablation(ABLATION_OF[m]))
    # LI and NMAR: the FP / FBP the pipeline uses (its operators), or the ones it would pick
    ops = base.operators if base is not None else select_operators(geometry, "cpu")
    proj = ops.ct_view()
    test_masks = load_test_masks(root)
    grid = geometry.image_shape

    rows: list[dict[str, Any]] = []
    try:
        for case in cases:
            if progress is not None:
                progress(case.name)
            data = read_case(case.case_path)
            target = torch.from_numpy(read_image(case.gt_path))
            ma_ct = torch.from_numpy(data["ma_CT"])
            ma_sino = torch.from_numpy(data["ma_sinogram"])
            for name, arr in (("ma_CT", ma_ct), ("gt image", target)):
                if tuple(arr.shape) != grid:
                    raise BadInputError(
                        f"{case.case_path}: {name} is {tuple(arr.shape)}; the geometry needs {grid}"
                    )
            geometry.check_sinogram(tuple(ma_sino.shape), f"{case.case_path}: ma_sinogram")
            mask = scoring_mask(case, data, test_masks, grid, root)
            seen = seen_mask(ma_ct, mask, image_only)
            outputs = {
                m: method_output(
                    m, data, seen, image_only=image_only, projector=proj, filter=fbp_filter,
                    pipeline=pipelines.get(m), steps=steps, seed=seed, where=case.case_path,
                )
                for m in methods
            }  # fmt: skip
            row: dict[str, Any] = {"case": case.name, "metal_px": int(mask.sum())}
            for m, img in outputs.items():
                row[m] = {
                    "psnr": float(metrics.psnr(img, target, mask)),
                    "ssim": float(metrics.ssim(img, target, mask)),
                }
            rows.append(row)
    finally:
        if base is not None:
            base.close()

    summary: dict[str, Any] = {}
    for m in methods:
        groups: dict[str, dict[str, float]] = {}
        for row in rows:
            g = groups.setdefault(group_key(row["metal_px"]), {"psnr": 0.0, "ssim": 0.0, "n": 0})
            g["psnr"] += row[m]["psnr"]
            g["ssim"] += row[m]["ssim"]
            g["n"] += 1
        for g in groups.values():
            g["psnr"] /= g["n"]
            g["ssim"] /= g["n"]
        ordered = dict(sorted(groups.items(), key=lambda kv: -_group_lo(kv[0])))
        summary[m] = {
            "psnr": float(np.mean([r[m]["psnr"] for r in rows])),
            "ssim": float(np.mean([r[m]["ssim"] for r in rows])),
            "groups": ordered,
        }
    return {
        "methods": summary,
        "cases": rows,
        "bundle": None if bundle is None else str(bundle),
        "backend": base.graphs.backend if base is not None else None,
        "steps": (steps if steps is not None else base.config.steps) if base is not None else None,
        "seconds": time.perf_counter() - t_start,
        "route": _route(image_only),
    }


def _route(image_only: bool) -> str:
    return ROUTES[1] if image_only else ROUTES[0]


def _group_lo(key: str) -> int:
    return int(key.rstrip("+").split("-")[0])


def format_table(result: dict[str, Any]) -> str:
    """Methods × (mean, size groups) as text: ``PSNR / SSIM`` per cell."""
    methods = list(result["methods"])
    groups: list[str] = []
    for m in methods:
        for g in result["methods"][m]["groups"]:
            if g not in groups:
                groups.append(g)
    groups.sort(key=lambda g: -_group_lo(g))
    head = ["method", *[f"{g} px" for g in groups], "mean"]
    lines = []
    for m in methods:
        s = result["methods"][m]
        cells = [m]
        for g in groups:
            v = s["groups"].get(g)
            cells.append("-" if v is None else f"{v['psnr']:.2f} / {v['ssim']:.4f}")
        cells.append(f"{s['psnr']:.2f} / {s['ssim']:.4f}")
        lines.append(cells)
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    n = len(result["cases"])
    counts = {g: 0 for g in groups}
    for row in result["cases"]:
        counts[group_key(row["metal_px"])] += 1
    note = ", ".join(f"{g} px: {c}" for g, c in counts.items())
    route = result.get("route", ROUTES[0]).replace("_", "-")
    return "\n".join(
        [
            fmt.format(*head),
            *(fmt.format(*r) for r in lines),
            f"PSNR dB / SSIM; {n} cases ({note}); {route} route",
        ]
    )
