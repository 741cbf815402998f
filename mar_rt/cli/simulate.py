"""`mar-rt simulate`: SynDeepLesion-style metal artifact data from clean CT slices (DESIGN §5).

Each input slice becomes ``OUT/<nnnn>_<name>/`` with ``gt.h5`` and one ``<k>.h5`` per
procedural metal mask, in the official layout (``mar_rt.ct.syndeeplesion``), plus
``OUT/simulate.json`` recording inputs, seeds, mask kinds and sizes. Inputs are read and
checked before anything is written.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

log = logging.getLogger(__name__)

INPUT_KINDS = (
    ".h5/.hdf5 (gt.h5 'image', μ), .npy (HU or μ, see --units), .png (DeepLesion 16-bit), .dcm"
)


@dataclass(frozen=True)
class Slice:
    """One clean input slice on the 416² grid."""

    source: Path
    name: str
    image_mu: np.ndarray


def _grid() -> tuple[int, int]:
    """The SynDeepLesion grid the simulated cases are made on (``mar_rt.ct.masks``)."""
    from mar_rt.ct.masks import REFERENCE_SHAPE

    return REFERENCE_SHAPE


def _case_name(path: Path) -> str:
    parts = [path.parent.parent.name, path.parent.name] if path.stem == "gt" else [path.stem]
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", "_".join(p for p in parts if p)).strip("_-")
    return name[:60] or "slice"


def _resample(image: np.ndarray, path: Path) -> np.ndarray:
    from mar_rt.ct.resample import resample_images

    if image.ndim != 2 or image.shape[0] != image.shape[1] or image.shape[0] < 64:
        raise ValueError(
            f"{path}: image of shape {image.shape} is not supported; give a square 2-D slice "
            f"(at least 64²), it is resampled to {_grid()[0]}×{_grid()[1]}"
        )
    return resample_images(image.astype(np.float32), _grid())


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    from mar_rt.ct.units import deeplesion_png_to_hu

    with Image.open(path) as im:
        if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise ValueError(f"{path}: PNG mode {im.mode!r} is not a 16-bit DeepLesion slice")
        values = np.asarray(im).astype(np.int32)
    return deeplesion_png_to_hu(values)


def _read_dicom(path: Path) -> np.ndarray:
    """HU of one CT DICOM file, read by the runtime's reader (``mar_rt.runtime.io``)."""
    from mar_rt.runtime.io import read_dicom
    from mar_rt.runtime.io.dispatch import stored_hu

    return stored_hu(read_dicom(path))[0]


def read_slice(path: Path, units: str) -> np.ndarray:
    """The clean μ image (cm⁻¹, float32 416²) of one input file; ValueError naming the file."""
    from mar_rt.ct.syndeeplesion import read_image
    from mar_rt.ct.units import hu_to_mu

    suffix = path.suffix.lower()
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if suffix in (".h5", ".hdf5"):
        mu = read_image(path)
    elif suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"{path}: not a readable .npy array ({err})") from err
        if values.ndim != 2 or not np.issubdtype(values.dtype, np.number):
            raise ValueError(
                f"{path}: expected a 2-D numeric array, got {values.dtype} {values.shape}"
            )
        values = values.astype(np.float64)
        mu = hu_to_mu(values) if units == "hu" else values
    elif suffix == ".png":
        mu = hu_to_mu(_read_png(path))
    elif suffix in (".dcm", ".dicom", ""):
        mu = hu_to_mu(_read_dicom(path))
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use {INPUT_KINDS}")
    mu = np.asarray(mu)
    if not np.isfinite(mu).all():
        raise ValueError(f"{path}: image contains NaN or inf pixels")
    if suffix == ".npy":
        if units == "mu" and float(np.median(mu)) < -10:
            raise ValueError(
                f"{path}: values look like HU (median {np.median(mu):.0f}); use --units hu"
            )
        if units == "hu" and float(np.abs(values).max()) < 5:
            raise ValueError(f"{path}: values look like μ (all |v| < 5); use --units mu")
    return _resample(mu, path)


def _size_range(label: str) -> tuple[float, float]:
    from mar_rt.ct.masks import SIZE_RANGE_PX
    from mar_rt.ct.metrics import SIZE_GROUPS

    for g in SIZE_GROUPS:
        if g.label == label:
            return max(g.lo, SIZE_RANGE_PX[0]), min(g.hi - 1, SIZE_RANGE_PX[1])
    labels = ", ".join(g.label for g in SIZE_GROUPS)
    raise typer.BadParameter(f"unknown size group {label!r}; choose from {labels}")


def _plan(n_masks: int, groups: list[str], kinds: list[str] | None, seed: int, index: int):
    """(k, mask seed, noise seed, size_px, kind) for each mask of slice ``index``."""
    from mar_rt.ct.masks import suitable_kinds

    plan = []
    for k in range(n_masks):
        ss = np.random.SeedSequence([seed, index, k])
        mask_seed, noise_seed = ss.spawn(2)
        rng = np.random.default_rng(ss)
        lo, hi = _size_range(groups[k % len(groups)])
        size = int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
        choices = kinds or suitable_kinds(size, _grid())
        kind = str(choices[int(rng.integers(len(choices)))])
        plan.append((k, mask_seed, noise_seed, size, kind))
    return plan


def _split_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def register(app: typer.Typer) -> None:
    """Add `simulate` to the app."""

    @app.command()
    def simulate(
        inputs: Annotated[list[Path], typer.Argument(help=f"Clean slices: {INPUT_KINDS}.")],
        out: Annotated[Path, typer.Option("--out", help="Output folder (SynDeepLesion layout).")],
        masks: Annotated[int, typer.Option("--masks", min=1, help="Metal masks per slice.")] = 4,
        seed: Annotated[int, typer.Option("--seed", help="Seed for masks and noise.")] = 0,
        material: Annotated[
            str, typer.Option("--material", help="Implant metal: Ti, Fe, Cu or Au.")
        ] = "Ti",
        size_groups: Annotated[
            str,
            typer.Option(
                "--size-groups", help="Comma-separated size groups the masks cycle through."
            ),
        ] = "large,medium-large,medium,medium-small,small",
        kinds: Annotated[
            str,
            typer.Option("--kinds", help="Comma-separated mask kinds (default: suited to size)."),
        ] = "",
        units: Annotated[
            str, typer.Option("--units", help="Units of .npy inputs: hu or mu.")
        ] = "hu",
        device: Annotated[
            str, typer.Option("--device", help="torch device for projection.")
        ] = "cpu",
        skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip unusable inputs.")] = False,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Replace existing case folders.")
        ] = False,
    ) -> None:
        """Simulate metal artifacts (SynDeepLesion protocol) on clean CT slices."""
        from tqdm import tqdm

        from mar_rt.ct import physics
        from mar_rt.ct.geometry import FanBeamGeometry
        from mar_rt.ct.masks import KINDS, body_outline, generate_metal_mask
        from mar_rt.ct.projector import get_projector
        from mar_rt.ct.simulate import simulate_metal_artifact
        from mar_rt.ct.syndeeplesion import GT_FIELDS, write_case

        if units not in ("hu", "mu"):
            raise typer.BadParameter(f"--units must be hu or mu, got {units!r}")
        try:
            metal = physics.material_name(material)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
        if metal not in physics.METALS:
            raise typer.BadParameter(f"--material must be one of {', '.join(physics.METALS)}")
        groups = _split_list(size_groups)
        if not groups:
            raise typer.BadParameter("--size-groups is empty")
        for g in groups:
            _size_range(g)
        kind_list = _split_list(kinds)
        for k in kind_list:
            if k not in KINDS:
                raise typer.BadParameter(f"unknown mask kind {k!r}; choose from {', '.join(KINDS)}")

        slices: list[Slice] = []
        problems: list[str] = []
        for path in inputs:
            try:
                slices.append(Slice(path, _case_name(path), read_slice(path, units)))
            except ValueError as err:
                problems.append(str(err))
        for msg in problems:
            typer.echo(f"{'skipping' if skip_bad else 'error'}: {msg}", err=True)
        if problems and not skip_bad:
            typer.echo("nothing written (use --skip-bad to go on without these files)", err=True)
            raise typer.Exit(code=2)
        if not slices:
            typer.echo("error: no usable inputs", err=True)
            raise typer.Exit(code=2)
        folders = [out / f"{i:04d}_{s.name}" for i, s in enumerate(slices)]
        existing = [f for f in folders if f.exists() and any(f.iterdir())]
        if existing and not overwrite:
            typer.echo(f"error: {existing[0]} already exists (use --overwrite)", err=True)
            raise typer.Exit(code=2)

        geometry = FanBeamGeometry.syndeeplesion()
        projector = get_projector(geometry, device)
        records: list[dict[str, Any]] = []
        with tqdm(total=len(slices) * masks, desc="simulate", unit="scan") as bar:
            for i, (s, folder) in enumerate(zip(slices, folders, strict=True)):
                body = body_outline(s.image_mu)
                wrote_gt = False
                for k, mask_seed, noise_seed, size, kind in _plan(
                    masks, groups, kind_list, seed, i
                ):
                    try:
                        mask = generate_metal_mask(
                            _grid(), seed=mask_seed, body_mask=body, size_px=size, kind=kind
                        )
                    except ValueError as err:
                        typer.echo(f"warning: {s.source}: mask {k}: {err}; skipped", err=True)
                        bar.update(1)
                        continue
                    fields = simulate_metal_artifact(
                        s.image_mu, mask, material=metal, seed=noise_seed, projector=projector
                    )
                    fields = {n: v.cpu().numpy() for n, v in fields.items()}
                    if wrote_gt:
                        fields = {n: v for n, v in fields.items() if n not in GT_FIELDS}
                    write_case(folder, fields, k)
                    wrote_gt = True
                    records.append(
                        {
                            "case": folder.name,
                            "source": str(s.source),
                            "k": k,
                            "kind": kind,
                            "metal_px": int(mask.sum()),
                            "target_px": size,
                            "material": metal,
                        }
                    )
                    bar.update(1)
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"seed": seed, "masks": masks, "size_groups": groups, "records": records}
        tmp = out / ".simulate.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(out / "simulate.json")
        typer.echo(f"wrote {len(records)} simulations of {len(slices)} slice(s) to {out}")
