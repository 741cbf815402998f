"""What the runtime reads from a bundle: the SDE, the geometry and the pipeline config.

The bundle format itself (``bundle.json`` + safetensors, hashes) is
``mar_rt.models.bundle``'s; this module only turns its plain sections into runtime objects
and names the bundle in every error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.errors import BundleError
from mar_rt.models.sde import SDEConfig
from mar_rt.runtime.config import PipelineConfig

DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "assets" / "demo_bundle"
"""The small trained bundle shipped with the package (added by its own issue)."""


@dataclass(frozen=True, eq=False)
class BundleFacts:
    """A loaded bundle with its runtime sections parsed."""

    path: Path
    bundle: Any  # mar_rt.models.bundle.Bundle
    sde: SDEConfig
    geometry: FanBeamGeometry
    pipeline: PipelineConfig
    name: str = ""  # the bundle's name (its folder name): never a path
    sha256: str = ""  # of bundle.json, which lists every weight file's sha256


def open_bundle(path: str | Path) -> BundleFacts:
    """Load ``path`` (a bundle folder) and parse its ``sde``, ``geometry`` and ``pipeline``.

    Raises BundleError naming the folder when it is missing or a section is malformed.
    """
    from mar_rt.models.bundle import load_bundle

    path = Path(path)
    if not path.exists():
        hint = ""
        if path.resolve() == DEMO_BUNDLE:
            hint = (
                " (the demo bundle is not installed; train or copy one there, or pass "
                "--bundle PATH)"
            )
        raise BundleError(f"bundle folder {path} does not exist{hint}")
    bundle = load_bundle(path)
    manifest = bundle.config
    try:
        geometry = FanBeamGeometry(**manifest["geometry"])
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{path}: bad geometry section: {exc}") from exc
    try:
        pipeline = PipelineConfig.from_dict(manifest["pipeline"])
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{path}: bad pipeline section: {exc}") from exc
    if geometry.image_shape != (pipeline.image_size, pipeline.image_size):
        raise BundleError(
            f"{path}: pipeline image_size {pipeline.image_size} does not match the geometry's "
            f"image {geometry.image_shape}"
        )
    from mar_rt.models.bundle import sha256_file

    return BundleFacts(
        path=path,
        bundle=bundle,
        sde=bundle.sde,
        geometry=geometry,
        pipeline=pipeline,
        name=path.resolve().name,
        sha256=sha256_file(bundle.manifest_path),
    )
