"""The DuDoCROP pipeline configuration, stored in ``bundle.json`` under ``"pipeline"``.

Every step of DESIGN.md §8 that is not essential has one boolean switch here, so each
ablation of §9 is one flag (``PipelineConfig.ablation(name)`` names the published ones).

Notation (DESIGN.md §8):

    X_ma, Y_ma   metal-affected image (μ, cm⁻¹) and sinogram (line integrals)
    X_LI, Y_LI   linear-interpolation pair
    X_p, Y_p     DAPG priors (image / sinogram IR-SDE outputs)
    X'_p         FBP of the fidelity sinogram Y_f = (1 − Tr)⊙Y_ma + Tr⊙Y_p
    R, R̂         residual X̃_p − X'_p and its IR-SDE refinement
    α            fusion weight of step 6
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mar_rt.ct.mar import METAL_THRESHOLD_MU, MIN_METAL_PIXELS

MuSource = Literal["li", "nmar", "ma"]
SizePolicy = Literal["resample", "refuse"]
SamplerName = Literal["posterior", "euler"]
SAMPLERS = ("posterior", "euler")
"""Reverse-SDE samplers (DESIGN §7.3): the posterior sampler and Euler–Maruyama."""

ABLATIONS = ("full", "sde_only", "dapg_only")
"""Named ablations of DESIGN §9: IR-SDE alone (no DuDoCLIP), DAPG only (no OSRO), full."""

Route = Literal["sinogram", "image_only"]
FidelityPrior = Literal["sinogram", "image"]
FIDELITY_PRIORS = ("sinogram", "image")
"""What fills the metal trace in OSRO's fidelity step (``PipelineConfig.fidelity_prior``)."""

ROUTES = ("sinogram", "image_only")
"""The two routes of DESIGN §8: a measured sinogram was given, or Y_ma = FP(X_ma) (synthetic)."""

ROUTE_SWITCHES = (
    "steps",
    "residual_steps",
    "sampler",
    "mu_source",
    "use_clip",
    "run_image_sde",
    "run_sinogram_sde",
    "run_osro",
    "osro_fidelity",
    "fidelity_prior",
    "norm1",
    "osro_residual",
    "norm2",
    "alpha",
)
"""Fields a route may override (``PipelineConfig.image_only``). The grid, the FBP filter, the
metal threshold, ``residual_scale`` (fixed by training) and batching are the same on both."""


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Switches and constants of the DuDoCROP pipeline (DESIGN.md §8).

    Attributes:
        steps: reverse-SDE steps of the image and sinogram loops (S ≤ T of the bundle's SDE).
        residual_steps: steps of the residual loop; ``None`` means the DAPG loops' count
            (``steps``, or the ``steps`` a call asks for).
        sampler: the reverse-SDE sampler of every loop: ``"posterior"`` (IR-SDE's posterior
            sampling, the last step returns x̂₀) or ``"euler"`` (Euler–Maruyama on the reverse
            SDE, the reference's ``reverse_sde``).
        mu_source: what the DAPG loops revert to: ``"li"`` (X_LI, Y_LI), ``"nmar"``
            (X_NMAR, Y_NMAR: NMAR's prior-normalised interpolation, DESIGN §6) or ``"ma"``
            (X_ma, Y_ma, as the paper does). CLIP always sees X_ma / Y_ma.
        use_clip: ``False`` feeds zero embeddings to the U-Nets (the "IR-SDE without
            DuDoCLIP" ablation) and skips the CLIP graphs.
        run_image_sde: ``False`` sets X_p to the loop's μ (X_LI when μ is the ma pair).
        run_sinogram_sde: ``False`` sets Y_p likewise (Y_LI when μ is the ma pair).
        run_osro: ``False`` skips OSRO entirely: X_out = X_p ("DAPG only").
        osro_fidelity: step 1 replaces Y_p outside the trace by Y_ma; ``False`` uses
            X'_p = FBP(Y_p).
        fidelity_prior: what fills the trace in step 1: ``"sinogram"`` (Y_p, the sinogram
            IR-SDE: the paper's Eq. 13) or ``"image"`` (Y_ma interpolated across the trace
            after normalising by FP(X_p), NMAR's step with the image IR-SDE's X_p as the prior:
            ``osro.prior_normalised_sinogram``). With ``"image"`` every measured bin outside
            the trace stays as measured and X_p only shapes the trace.
        norm1: step 2 matches X_p's mean/std to X'_p over non-metal pixels; ``False`` uses X_p.
        osro_residual: step 3 runs the residual IR-SDE; ``False`` sets R̂ = 0 (X̂_p = X'_p).
        norm2: step 5 matches X̂_p's mean/std to X_p over non-metal pixels.
        alpha: step 6 fusion weight, X_out = α·Norm²(X̂_p) + (1 − α)·X_p, in [0, 1].
        reinsert_metal: copy X_ma's metal pixels into the output (for display).
        residual_scale: the residual network sees clip(R / residual_scale, −1, 1) and its
            output is multiplied back by residual_scale (cm⁻¹). Trainers must use the same.
        image_size: the bundle's square image grid (pixels).
        on_size_mismatch: other input sizes are resampled (bilinear, same field of view) to
            ``image_size`` and the output back, or refused.
        fbp_filter: filter of every FBP the pipeline runs (LI, X'_p).
        metal_threshold: μ (cm⁻¹) above which a pixel is metal when no mask is given (2500 HU).
        min_metal_px: connected metal components smaller than this are ignored.
        batch_size: slices per network call.
        image_only: switch overrides (names in ``ROUTE_SWITCHES``) for the image-only route,
            where no sinogram was measured and Y_ma = FP(X_ma) (DESIGN §8 "Image-only input":
            there the fidelity step pulls the result back towards the streaks). ``None`` (old
            bundles): both routes run this config. Given as a dict, stored as sorted
            ``(name, value)`` pairs so the config stays hashable; ``for_route`` applies it.
    """

    steps: int = 20
    residual_steps: int | None = None
    sampler: SamplerName = "posterior"
    mu_source: MuSource = "li"
    use_clip: bool = True
    run_image_sde: bool = True
    run_sinogram_sde: bool = True
    run_osro: bool = True
    osro_fidelity: bool = True
    fidelity_prior: FidelityPrior = "sinogram"
    norm1: bool = True
    osro_residual: bool = True
    norm2: bool = True
    alpha: float = 0.5
    reinsert_metal: bool = False
    residual_scale: float = 0.5
    image_size: int = 416
    on_size_mismatch: SizePolicy = "resample"
    fbp_filter: str = "ram-lak"
    metal_threshold: float = METAL_THRESHOLD_MU
    min_metal_px: int = MIN_METAL_PIXELS
    batch_size: int = 1
    image_only: Mapping[str, Any] | tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        if self.image_only is not None:
            object.__setattr__(self, "image_only", _route_overrides(self.image_only))
        for name in ("steps", "image_size", "batch_size", "min_metal_px"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"PipelineConfig: {name} must be a positive integer, got {value!r}"
                )
        if self.residual_steps is not None and (
            not isinstance(self.residual_steps, int) or self.residual_steps < 1
        ):
            raise ValueError(
                f"PipelineConfig: residual_steps must be None or a positive integer, "
                f"got {self.residual_steps!r}"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"PipelineConfig: sampler must be one of {SAMPLERS}, got {self.sampler!r}"
            )
        if self.mu_source not in ("li", "nmar", "ma"):
            raise ValueError(
                f"PipelineConfig: mu_source must be 'li', 'nmar' or 'ma', got {self.mu_source!r}"
            )
        if self.fidelity_prior not in FIDELITY_PRIORS:
            raise ValueError(
                f"PipelineConfig: fidelity_prior must be one of {FIDELITY_PRIORS}, "
                f"got {self.fidelity_prior!r}"
            )
        if self.on_size_mismatch not in ("resample", "refuse"):
            raise ValueError(
                "PipelineConfig: on_size_mismatch must be 'resample' or 'refuse', "
                f"got {self.on_size_mismatch!r}"
            )
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"PipelineConfig: alpha must lie in [0, 1], got {self.alpha!r}")
        if not (math.isfinite(self.residual_scale) and self.residual_scale > 0):
            raise ValueError(
                f"PipelineConfig: residual_scale must be > 0, got {self.residual_scale!r}"
            )
        if not (math.isfinite(self.metal_threshold) and self.metal_threshold > 0):
            raise ValueError(
                f"PipelineConfig: metal_threshold must be > 0, got {self.metal_threshold!r}"
            )

    def route_overrides(self, route: Route) -> dict[str, Any]:
        """The switch overrides of ``route`` (empty for ``"sinogram"`` and for old configs)."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
        if route == "image_only" and self.image_only:
            return dict(self.image_only)
        return {}

    def for_route(self, route: Route) -> PipelineConfig:
        """The config that runs on ``route``: this one without overrides (the same object when
        ``route`` has none), else this one with the route's overrides applied and
        ``image_only`` cleared (what actually ran, as the QA record stores it)."""
        changes = self.route_overrides(route)
        if not changes:
            return self
        return self.replace(image_only=None, **changes)

    def residual_steps_for(self, steps: int) -> int:
        """Steps of the residual loop when the DAPG loops run ``steps`` (``residual_steps``,
        or ``steps`` when that is None)."""
        return steps if self.residual_steps is None else self.residual_steps

    def replace(self, **changes: Any) -> PipelineConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def ablation(self, name: str) -> PipelineConfig:
        """The config of a named ablation (``ABLATIONS``): ``full`` is this config,
        ``sde_only`` drops DuDoCLIP (zero embeddings), ``dapg_only`` drops OSRO."""
        if name == "full":
            return self
        if name == "sde_only":
            return self.replace(use_clip=False)
        if name == "dapg_only":
            return self.replace(run_osro=False)
        raise ValueError(f"unknown ablation {name!r}; expected one of {ABLATIONS}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``from_dict`` rebuilds it exactly. ``image_only`` is a dict,
        left out when None, so configs without overrides serialise as before."""
        d = dataclasses.asdict(self)
        if self.image_only is None:
            del d["image_only"]
        else:
            d["image_only"] = dict(self.image_only)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        """Rebuild from ``to_dict`` output; unknown keys are refused by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"PipelineConfig.from_dict: unknown keys {unknown}")
        return cls(**d)


def _route_overrides(overrides: Any) -> tuple[tuple[str, Any], ...]:
    """Validate image-only overrides (a mapping or ``(name, value)`` pairs) → sorted pairs.

    ValueError names unknown or non-switch keys and invalid values (each value is checked by
    building the overridden config)."""
    try:
        items = dict(overrides)
    except (TypeError, ValueError):
        raise ValueError(
            f"PipelineConfig: image_only must be a dict of switch overrides, got {overrides!r}"
        ) from None
    bad = sorted(k for k in items if k not in ROUTE_SWITCHES)
    if bad:
        raise ValueError(
            f"PipelineConfig: image_only may override only {', '.join(ROUTE_SWITCHES)}; got {bad}"
        )
    try:
        PipelineConfig(**items)  # every value valid on its own
    except (TypeError, ValueError) as err:
        raise ValueError(f"PipelineConfig: image_only override invalid: {err}") from None
    return tuple(sorted(items.items()))
