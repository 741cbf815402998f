"""A study, end to end: read → find metal → bundle grid → pipeline → source grid → write.

`mar-rt run`, the MAR node and `mar-rt batch` all go through :func:`run_study`, so a series
is corrected the same way whichever door it came in by.

Notation (DESIGN §3, §8):

    X_src        the study's slices on their own grid, HU as stored (unclipped), (N, H, W)
    M_src        metal masks on that grid (``mar_rt.ct.detect``: "do no harm")
    R(·)         ``mar_rt.ct.resample.resample_images``: same field of view, another grid
    X_g, X_out   R(μ(X_src)) on the bundle grid and the pipeline's output there
    Δ            R(X_out − X_g) back on the source grid: the change the pipeline made
                 (``map_back="change"`` only)

The recipe of :func:`correct_study`:

    1. metal masks: given with the study (SynDeepLesion files), else detected per slice
    2. slices without metal are kept: their stored values are written bit for bit
    3. slices with metal go to the bundle grid (X_g, masks resampled), in batches, each
       batch seeded by ``slice_seed(seed, index of its first slice in the study)``
    4. back on the source grid: R(X_out).  ``map_back="change"`` gives X_src + Δ instead,
       which keeps the original's fine detail, but also its fine streak texture: on three
       real 512² slices with a simulated screw it scored 0.54 dB PSNR and 0.047 SSIM below
       R(X_out), +0.2 dB only far (> 25 px) from the metal (benchmarks/bench_map_back.py)
    5. metal reinserted (the original metal pixels) unless ``reinsert_metal=False``
    6. the QA record: route, per slice metal found / rejected candidates / pipeline QA
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mar_rt.ct.detect import MetalCriteria, SliceDetection, detect_metal
from mar_rt.ct.resample import resample_images, resample_masks
from mar_rt.ct.units import hu_to_mu, mu_to_hu
from mar_rt.errors import (
    BackendUnavailableError,
    BadInputError,
    BundleError,
    EngineMismatchError,
    MarRtError,
    OutputWriteError,
)
from mar_rt.runtime.io import Study, read_study, write_study
from mar_rt.runtime.io.dispatch import stored_hu
from mar_rt.runtime.pipeline import DuDoCROPPipeline, slice_seed
from mar_rt.runtime.qa import QARecord
from mar_rt.runtime.sampler import ProgressFn

log = logging.getLogger(__name__)

MapBack = Literal["change", "resample"]
Route = Literal["sinogram", "image_only"]


# --- loading a pipeline ---------------------------------------------------------------------
def open_pipeline(
    bundle: str | Path | None = None,
    *,
    backend: str = "auto",
    device: str | None = None,
    notify: Callable[[str], None] | None = None,
) -> DuDoCROPPipeline:
    """The pipeline of ``bundle`` (default: the shipped demo bundle) on the best backend.

    ``backend`` is ``auto``, ``tensorrt``, ``onnxruntime`` or ``torch``; one that cannot run
    this bundle here (library missing, no exported ONNX, engines for another GPU) falls back
    to torch, with a warning that says why.  ``notify(line)`` also receives the choice and
    any fallback (the CLI prints them).  Use it as a context manager.
    """
    from mar_rt.runtime.backends import resolve_backend
    from mar_rt.runtime.bundle_access import DEMO_BUNDLE

    path = Path(bundle) if bundle is not None else DEMO_BUNDLE
    if not path.exists():
        raise BundleError(f"bundle folder {path} does not exist (pass --bundle PATH)")

    def say(line: str) -> None:
        if notify is not None:
            notify(line)
        else:
            log.info("%s", line)

    choice = resolve_backend(backend, device=device, bundle=path)
    say(f"backend: {choice.backend} on {choice.device} ({choice.reason})")
    try:
        return DuDoCROPPipeline.from_bundle(path, backend=choice.backend, device=choice.device)
    except (BackendUnavailableError, BundleError, EngineMismatchError) as exc:
        if choice.backend == "torch":
            raise
        say(f"backend {choice.backend} failed ({exc}); falling back to torch on {choice.device}")
        return DuDoCROPPipeline.from_bundle(path, backend="torch", device=choice.device)


# --- correcting -----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CorrectedStudy:
    """What :func:`correct_study` made of a study.

    Attributes:
        study: the study as read.
        images_mu: μ (cm⁻¹) at the source size, (N, H, W) float64; rows where ``keep`` is
            True are the input (the writer copies the stored values instead).
        keep: bool (N,): slices passed through (no metal).
        metal_masks: bool (N, H, W) on the source grid (what was corrected / reinserted).
        route: ``sinogram`` (a measured sinogram was given) or ``image_only``.
        qa: the QA record (JSON-able).
        timings_s: seconds per pipeline stage plus ``correct`` (all of this call).
    """

    study: Study
    images_mu: np.ndarray
    keep: np.ndarray
    metal_masks: np.ndarray
    route: Route
    qa: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def n_metal_slices(self) -> int:
        return int((~self.keep).sum())


def _pixel_area_mm2(study: Study, grid: tuple[int, int], grid_pixel_mm: float) -> float:
    """The area of one source pixel; without a spacing, the bundle's field of view is assumed."""
    if study.pixel_spacing_mm is not None:
        return float(study.pixel_spacing_mm[0] * study.pixel_spacing_mm[1])
    h, w = study.image_shape
    return (grid_pixel_mm * grid[0] / h) * (grid_pixel_mm * grid[1] / w)


def find_metal(
    study: Study,
    hu: np.ndarray,
    pixel_area_mm2: float,
    criteria: MetalCriteria | None = None,
) -> tuple[np.ndarray, list[SliceDetection | None]]:
    """Metal masks (bool (N, H, W)) of ``study``: its own masks when it has them, else
    :func:`mar_rt.ct.detect.detect_metal` on each slice of ``hu``."""
    if study.metal_masks is not None:
        return study.metal_masks.astype(bool), [None] * len(study)
    detections = [detect_metal(plane, pixel_area_mm2, criteria) for plane in hu]
    return np.stack([d.mask for d in detections]), list(detections)


def _grid_masks(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Masks on the bundle grid; a mask that vanishes at ≥ 0.5 keeps every touched pixel."""
    out = resample_masks(masks, grid)
    for i in np.flatnonzero(~out.reshape(len(out), -1).any(1)):
        out[i] = resample_images(masks[i].astype(np.float32), grid) > 0
    return out


def correct_study(
    study: Study,
    pipeline: DuDoCROPPipeline,
    *,
    steps: int | None = None,
    seed: int = 0,
    reinsert_metal: bool = True,
    criteria: MetalCriteria | None = None,
    map_back: MapBack = "resample",
    progress: ProgressFn | None = None,
) -> CorrectedStudy:
    """Correct the slices of ``study`` that hold metal; keep the others untouched.

    See the module docstring for the recipe.  Raises BadInputError for a study the bundle
    cannot run (a measured sinogram with an image that is not on the bundle grid).
    """
    t_start = time.perf_counter()
    geometry, cfg = pipeline.geometry, pipeline.config
    grid = geometry.image_shape
    src_shape = study.image_shape
    resampled = src_shape != grid
    if resampled and cfg.on_size_mismatch == "refuse":
        raise BadInputError(
            f"{study.source_paths[0]}: image size {src_shape[0]}×{src_shape[1]} is not supported "
            f"by the bundle (supported: {grid[0]}×{grid[1]})"
        )
    measured = study.sinograms is not None and study.sinogram_is_measured
    if study.sinograms is not None and resampled:
        raise BadInputError(
            f"{study.source_paths[0]}: a sinogram was given, but the images are "
            f"{src_shape[0]}×{src_shape[1]}, not the bundle grid {grid[0]}×{grid[1]}"
        )
    route: Route = "sinogram" if measured else "image_only"

    # 1-2. metal
    hu = stored_hu(study)
    area = _pixel_area_mm2(study, grid, geometry.pixel_size * 10.0)
    masks, detections = find_metal(study, hu, area, criteria)
    keep = ~masks.reshape(len(study), -1).any(1)
    metal_idx = [int(i) for i in np.flatnonzero(~keep)]
    source_mu = hu_to_mu(hu, clip=False)  # the input, unclipped: kept slices and metal
    images_mu = source_mu.copy()
    timings: dict[str, float] = {}
    slice_qa: dict[int, dict[str, Any]] = {}
    if resampled and metal_idx:
        log.info(
            "%s: %d slice(s) with metal go to the bundle grid %d×%d (source %d×%d)",
            study.source_paths[0],
            len(metal_idx),
            *grid,
            *src_shape,
        )

    # 3. the metal slices on the bundle grid, in batches
    records = []
    for start in range(0, len(metal_idx), cfg.batch_size):
        idx = metal_idx[start : start + cfg.batch_size]
        x_g = resample_images(study.images[idx], grid)
        m_g = _grid_masks(masks[idx], grid)
        res = pipeline(
            x_g,
            sinogram=None if study.sinograms is None else study.sinograms[idx],
            sinogram_is_measured=measured,
            mask=m_g,
            steps=steps,
            seed=slice_seed(seed, idx[0]),
            progress=progress,
            return_intermediates=False,
        )
        out_g = res.output.detach().cpu().numpy().reshape(len(idx), *grid).astype(np.float64)
        # 4. back on the source grid
        if map_back == "change":
            delta = resample_images((out_g - x_g).astype(np.float32), src_shape)
            images_mu[idx] = images_mu[idx] + delta
        elif map_back == "resample":
            images_mu[idx] = resample_images(out_g.astype(np.float32), src_shape)
        else:
            raise ValueError(f"map_back must be 'change' or 'resample', got {map_back!r}")
        records.append(res.qa)
        for s, i in zip(res.qa.slices, idx, strict=True):
            slice_qa[i] = s.to_dict()
        for k, v in res.timings.items():
            timings[k] = timings.get(k, 0.0) + v

    # 5. metal reinserted on the source grid
    if reinsert_metal and metal_idx:
        images_mu = np.where(masks, source_mu, images_mu)

    # 6. QA
    timings["correct"] = time.perf_counter() - t_start
    qa = _qa_record(
        study,
        pipeline,
        keep=keep,
        masks=masks,
        detections=detections,
        slice_qa=slice_qa,
        records=records,
        route=route,
        reinsert_metal=reinsert_metal,
        steps=steps or cfg.steps,
        seed=seed,
        map_back=map_back,
        timings=timings,
    )
    return CorrectedStudy(
        study=study,
        images_mu=images_mu,
        keep=keep,
        metal_masks=masks,
        route=route,
        qa=qa,
        timings_s=timings,
    )


def _qa_record(
    study: Study,
    pipeline: DuDoCROPPipeline,
    *,
    keep: np.ndarray,
    masks: np.ndarray,
    detections: Sequence[SliceDetection | None],
    slice_qa: dict[int, dict[str, Any]],
    records: list[QARecord],
    route: Route,
    reinsert_metal: bool,
    steps: int,
    seed: int,
    map_back: MapBack,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The study's QA record: run facts, then one entry per slice of the study."""
    import mar_rt

    slices = []
    for i in range(len(study)):
        entry: dict[str, Any] = {
            "index": i,
            "source": study.source_paths[i].name,
            "metal_px": int(masks[i].sum()),
            "passed_through": bool(keep[i]),
        }
        det = detections[i]
        if det is not None and det.components:
            entry["candidates"] = [c.to_dict() for c in det.components]
        if keep[i]:
            note = "no metal found: stored pixel values copied unchanged"
            if det is not None and det.rejected:
                note += f" ({len(det.rejected)} dense non-metal candidate(s) left alone)"
            entry["notes"] = [note]
        else:
            pipeline_entry = dict(slice_qa.get(i, {}))
            pipeline_entry.pop("index", None)
            entry["pipeline"] = pipeline_entry
        slices.append(entry)
    first = records[0] if records else None
    return {
        "mar_rt_version": mar_rt.__version__,
        "bundle": pipeline.bundle_name,
        "bundle_sha256": pipeline.bundle_sha256,
        "backend": pipeline.graphs.backend,
        "device": str(pipeline.device),
        "operators": first.operators if first else pipeline.operators.name,
        "config": pipeline.config.to_dict(),
        "route": route,
        "source_kind": study.source_kind,
        "source_shape": list(study.image_shape),
        "grid_shape": list(pipeline.geometry.image_shape),
        "pixel_spacing_mm": None
        if study.pixel_spacing_mm is None
        else list(study.pixel_spacing_mm),
        "steps": int(steps),
        "seed": int(seed),
        "reinsert_metal": bool(reinsert_metal),
        "map_back": map_back,
        "slices_in": len(study),
        "slices_corrected": int((~keep).sum()),
        "slices_passed_through": int(keep.sum()),
        "skipped_files": [[str(p), why] for p, why in study.skipped],
        "timings_s": dict(timings),
        "slices": slices,
    }


# --- one series, read to written --------------------------------------------------------------
@dataclass(frozen=True)
class StudyRun:
    """What :func:`run_study` wrote."""

    folder: Path
    files: tuple[Path, ...]
    source_kind: str
    n_slices: int
    n_metal_slices: int
    series_uid: str | None
    timings_s: dict[str, float]
    qa: dict[str, Any]

    @property
    def has_metal(self) -> bool:
        return self.n_metal_slices > 0


_NAME_RE = re.compile(r"[^A-Za-z0-9_-]+")


def output_name(study: Study, source: Any) -> str:
    """A folder name a person can find: the series description (DICOM) or the file stem,
    reduced to ``[A-Za-z0-9_-]`` (at most 48 characters), plus a short unique suffix."""
    text = ""
    handle = study.handle
    datasets = getattr(handle, "datasets", None)
    if datasets:
        text = str(datasets[0].get("SeriesDescription", "") or "")
    if not text:
        first = Path(source[0] if isinstance(source, (list, tuple)) else source)
        text = first.name if first.is_dir() else first.name.split(".")[0]
    text = _NAME_RE.sub("_", text).strip("_-")[:48] or "series"
    return f"{text}_{uuid.uuid4().hex[:8]}"


def _load_sinograms(path: Path, study: Study) -> Study:
    try:
        sino = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable .npy sinogram ({exc})") from exc
    if sino.ndim == 2:
        sino = sino[None]
    if sino.ndim != 3 or sino.shape[0] != len(study):
        raise BadInputError(
            f"{path}: expected {len(study)} sinogram(s) (N, views, bins), got {sino.shape}"
        )
    if not np.isfinite(sino).all():
        raise BadInputError(f"{path}: the sinogram holds NaN or inf")
    return dataclasses.replace(study, sinograms=sino.astype(np.float32), sinogram_is_measured=True)


def _keep_volume(corrected: CorrectedStudy, out_dir: Path, name: str) -> Path | None:
    """Save the computed volume (HU, float32) where the user can get it; None if nowhere."""
    import tempfile

    volume = mu_to_hu(corrected.images_mu).astype(np.float32)
    for folder in (out_dir, Path.cwd(), Path(tempfile.gettempdir())):
        path = folder / f"{name}_computed_hu.npy"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            np.save(path, volume, allow_pickle=False)
            return path
        except OSError:
            continue
    return None


def write_corrected(
    corrected: CorrectedStudy,
    out_dir: str | Path,
    pipeline: DuDoCROPPipeline,
    *,
    name: str,
    preview: bool = True,
) -> Path:
    """Write ``corrected`` into the new folder ``out_dir/name`` (atomically), with ``qa.json``
    and ``preview.png``.  On failure: OutputWriteError, nothing under ``out_dir/name``, and
    the computed volume kept as ``.npy`` (its path in ``exc.kept``)."""
    from mar_rt.runtime.preview import write_preview

    out_dir = Path(out_dir)

    def extras(folder: Path) -> None:
        if preview:
            write_preview(folder / "preview.png", corrected)

    try:
        return write_study(
            corrected.study,
            corrected.images_mu,
            out_dir,
            bundle_name=pipeline.bundle_name,
            bundle_sha256=pipeline.bundle_sha256,
            qa=corrected.qa,
            keep=corrected.keep,
            folder_name=name,
            extras=extras,
        )
    except Exception as exc:
        kept = _keep_volume(corrected, out_dir, name)
        hint = (
            f"the computed volume (HU) was kept in {kept}"
            if kept is not None
            else "the computed volume could not be saved anywhere"
        )
        raise OutputWriteError(
            f"writing {out_dir / name} failed ({type(exc).__name__}: {exc}); nothing was "
            f"written there; {hint}",
            kept=kept,
        ) from exc


def run_study(
    source: str | Path | Sequence[str | Path],
    pipeline: DuDoCROPPipeline,
    out_dir: str | Path,
    *,
    units: str | None = None,
    skip_bad: bool = False,
    steps: int | None = None,
    seed: int = 0,
    reinsert_metal: bool = True,
    sinogram: str | Path | None = None,
    preview: bool = True,
    criteria: MetalCriteria | None = None,
    progress: ProgressFn | None = None,
) -> StudyRun:
    """Read ``source`` (a file, a folder, or a list of DICOM files of one series), correct
    it with ``pipeline`` and write one new folder inside ``out_dir``.

    ``units`` ('hu' | 'mu') is needed for ``.npy`` / NIfTI; ``sinogram`` is a measured
    ``.npy`` sinogram stack for the study.  Raises BadInputError (input), MarRtError (the
    pipeline), OutputWriteError (writing; nothing half-written).
    """
    t0 = time.perf_counter()
    src = source if isinstance(source, (str, Path)) else [Path(p) for p in source]
    study = read_study(
        src,  # type: ignore[arg-type]
        units=units,  # type: ignore[arg-type]
        skip_bad=skip_bad,
        geometry=None,
    )
    for bad, why in study.skipped:
        log.warning("skipped %s: %s", bad, why)
    if sinogram is not None:
        study = _load_sinograms(Path(sinogram), study)
    t_read = time.perf_counter() - t0
    corrected = correct_study(
        study,
        pipeline,
        steps=steps,
        seed=seed,
        reinsert_metal=reinsert_metal,
        criteria=criteria,
        progress=progress,
    )
    t1 = time.perf_counter()
    name = output_name(study, src)
    folder = write_corrected(corrected, out_dir, pipeline, name=name, preview=preview)
    t_write = time.perf_counter() - t1
    timings = {
        **corrected.timings_s,
        "read": t_read,
        "write": t_write,
        "total": time.perf_counter() - t0,
    }
    files = tuple(sorted(p for p in folder.iterdir() if p.name not in ("qa.json", "preview.png")))
    series_uid = None
    if study.source_kind == "dicom":
        import json

        series_uid = json.loads((folder / "qa.json").read_text())["series_instance_uid"]
    log.debug(
        "%s: %d slice(s), %d with metal → %s", src, len(study), corrected.n_metal_slices, folder
    )
    return StudyRun(
        folder=folder,
        files=files,
        source_kind=study.source_kind,
        n_slices=len(study),
        n_metal_slices=corrected.n_metal_slices,
        series_uid=series_uid,
        timings_s=timings,
        qa=corrected.qa,
    )


__all__ = [
    "CorrectedStudy",
    "MarRtError",
    "StudyRun",
    "correct_study",
    "find_metal",
    "open_pipeline",
    "output_name",
    "run_study",
    "write_corrected",
]
