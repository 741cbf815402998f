"""Prompt facts and templates for DuDoCLIP ("Qualifier + Instruction", DESIGN.md §7.1).

Texts are generated from facts measured on each training pair, never written per image.
All vocabulary, thresholds and templates live in this module; change any of them and bump
``PROMPT_VERSION`` (``template_digest()`` changes by itself), so that bundles, engines and
precomputed text embeddings can tell which set they were made with.

Facts (name → meaning):

    count       connected components of the metal mask (8-connectivity)
    size_class  total metal pixels against ``SIZE_LIMITS_PX`` scaled by H·W / 416²
                (at 416²: tiny < 80 ≤ small < 200 ≤ medium < 600 ≤ large < 1500 ≤ very large;
                SynDeepLesion's groups 35, 53 | 112–124 | 254, 451 | 881–890 | 2061 px)
    shape       of the largest component, from three measures:
                  e  elongation √(λ_max/λ_min) of the pixel-coordinate covariance (+1/12 per axis)
                  s  solidity: pixels / area of the pixel-centre convex hull grown by ½ px
                  g  notch fill: relative pixel gain of a binary closing with a radius-2 disk
                threaded if e ≥ 1.6 and g ≥ 0.03; elongated if e ≥ 1.6 and s ≥ 0.65;
                round if e < 1.6 and s ≥ 0.8; irregular otherwise
    position    metal centroid against the body outline (centroid, radius √(area/π)), or the
                image (centre, half the shorter side) when no outline is given; offset r in radii:
                bilateral if ≥ 2 components lie beyond ¼ radius on both the left and the right;
                central if r < 0.3; else the image quadrant ("upper left", ...: image rows/cols,
                not patient sides), prefixed "peripheral" if r > 0.7
    material    given: titanium (default), iron, copper, gold
    severity    RMSE in HU between input and target, both μ clipped to [0, 0.5] cm⁻¹, outside
                the metal dilated by 6 px (DESIGN §5's artifact strength): none < 35 ≤ mild
                < 80 ≤ moderate < 160 ≤ severe.  Anchors: a metal-free reconstruction
                (``poly_CT``) scores 23–24 HU on the shared SynDeepLesion cases, their
                ``ma_CT`` (124 and 282 metal px) 67 HU, their ``LI_CT`` 26–34 HU.
                The upper two thresholds are provisional (no large-metal case to calibrate on).
    anatomy     head / chest / abdomen / pelvis, crude rules on the body outline (μ above
                μ(−500 HU), largest component, holes filled), in this order:
                head if body < 35 % of the image and bone (> 300 HU) > 15 % of the body;
                chest if air (< −400 HU) inside the body > 10 %; pelvis if bone > 8 %;
                else abdomen.  Or given.

Zero-shot task (DESIGN §9, PI_s): 21 labels: "no metal" plus size class × severity
(5 × 4), each label text built from the same size and severity phrases as ``artifact_text``.
A phrasing ``seed`` picks among template variants: template = seed mod n_templates, severity
wording = (seed div n_templates) mod n_variants.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from mar_rt.ct.units import MU_WATER, hu_to_mu
from mar_rt.errors import BadInputError

__all__ = [
    "PROMPT_VERSION",
    "ANATOMIES",
    "SIZE_CLASSES",
    "SHAPES",
    "POSITIONS",
    "MATERIALS",
    "SEVERITIES",
    "SIZE_LIMITS_PX",
    "SEVERITY_LIMITS_HU",
    "MetalFacts",
    "PromptFacts",
    "describe_metal",
    "artifact_rmse_hu",
    "severity_from_rmse",
    "severity_from_error",
    "anatomy_from_image",
    "content_text",
    "artifact_text",
    "zero_shot_class",
    "zero_shot_labels",
    "zero_shot_target",
    "template_digest",
]

PROMPT_VERSION = "1"

# ---- vocabulary -------------------------------------------------------------------------------

ANATOMIES = ("head", "chest", "abdomen", "pelvis")
SIZE_CLASSES = ("tiny", "small", "medium", "large", "very large")
SIZE_LIMITS_PX = (80, 200, 600, 1500)  # upper bounds of tiny..large at 416² (scaled by area)
SHAPES = ("round", "elongated", "threaded", "irregular")
_QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
POSITIONS = ("central", *_QUADRANTS, *(f"peripheral {q}" for q in _QUADRANTS), "bilateral")
MATERIALS = ("titanium", "iron", "copper", "gold")
_MATERIAL_ALIASES = {
    "ti": "titanium",
    "titanium": "titanium",
    "fe": "iron",
    "iron": "iron",
    "steel": "iron",
    "cu": "copper",
    "copper": "copper",
    "au": "gold",
    "gold": "gold",
}
SEVERITIES = ("none", "mild", "moderate", "severe")
SEVERITY_LIMITS_HU = (35.0, 80.0, 160.0)  # upper bounds of none, mild, moderate
NO_METAL = "none"  # size_class / shape / position of an empty mask

_REF_AREA_PX = 416 * 416
_MU_CLIP = (0.0, 0.5)  # network / metric range of μ (DESIGN §3)
_SEVERITY_DILATE_PX = 6

# shape rules
_ELONGATED = 1.6
_NOTCH_FILL = 0.03
_NOTCH_RADIUS = 2
_SOLID_ROUND = 0.8
_SOLID_ELONGATED = 0.65
# position rules (in body radii)
_CENTRAL_R = 0.3
_PERIPHERAL_R = 0.7
_BILATERAL_DX = 0.25
# anatomy rules
_BODY_HU = -500.0
_AIR_HU = -400.0
_BONE_HU = 300.0
_HEAD_MAX_BODY_FRACTION = 0.35
_HEAD_MIN_BONE = 0.15
_CHEST_MIN_AIR = 0.10
_PELVIS_MIN_BONE = 0.08

# ---- templates --------------------------------------------------------------------------------

_CONTENT_TEMPLATES = (
    "CT slice of the {anatomy}, soft tissue and bone",
    "axial CT image of the {anatomy} showing soft tissue and bone",
    "clean CT scan of the {anatomy}",
)
_ARTIFACT_TEMPLATES = (
    "CT slice of the {anatomy} with {metal}, {artifact}",
    "axial CT image of the {anatomy} containing {metal}; {artifact}",
    "CT scan of the {anatomy} showing {metal} and {artifact}",
)
_NO_METAL_TEMPLATES = (
    "CT slice of the {anatomy} without metal, {artifact}",
    "axial CT image of the {anatomy} with no metal implant; {artifact}",
    "CT scan of the {anatomy} without metal and with {artifact}",
)
_ZERO_SHOT_TEMPLATE = "CT slice with {size} metal and {artifact}"
_ZERO_SHOT_NO_METAL = "CT slice without metal and with {artifact}"
_COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
_COUNT_MANY = "several"
_SIZE_WORDS = {
    "tiny": "tiny",
    "small": "small",
    "medium": "medium-sized",
    "large": "large",
    "very large": "very large",
}
# shape → (adjective, singular noun, plural noun)
_SHAPE_WORDS = {
    "round": ("round", "implant", "implants"),
    "elongated": ("", "rod", "rods"),
    "threaded": ("threaded", "screw", "screws"),
    "irregular": ("irregularly shaped", "implant", "implants"),
}
_POSITION_WORDS = {
    "central": "at the centre",
    "bilateral": "on both sides",
    **{q: f"in the {q} region" for q in _QUADRANTS},
    **{f"peripheral {q}": f"near the {q} edge" for q in _QUADRANTS},
}
# severity → wording variants; {where} is "around it", "between them" or "" (zero-shot labels)
_SEVERITY_WORDS = {
    "none": ("no visible streaks", "no metal artifacts"),
    "mild": ("mild streaks{where}", "faint streak artifacts{where}"),
    "moderate": ("moderate dark and bright streaks{where}", "noticeable streak artifacts{where}"),
    "severe": ("severe dark streaks{where}", "strong streak artifacts and shading{where}"),
}


# ---- facts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetalFacts:
    """What a metal mask shows (see the module docstring for every rule).

    count: components; total_px: metal pixels; component_px: pixels per component, largest
    first; size_class ∈ SIZE_CLASSES; shape ∈ SHAPES; position ∈ POSITIONS; material ∈
    MATERIALS.  An empty mask has count 0 and ``"none"`` for size_class, shape and position.
    elongation / solidity / notch_fill: the largest component's measures (diagnostics).
    """

    count: int
    total_px: int
    component_px: tuple[int, ...]
    size_class: str
    shape: str
    position: str
    material: str = "titanium"
    elongation: float = 0.0
    solidity: float = 0.0
    notch_fill: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PromptFacts:
    """Everything one training pair's texts are made from: metal facts, severity, anatomy."""

    metal: MetalFacts
    severity: str
    anatomy: str

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise BadInputError(f"PromptFacts: severity {self.severity!r} not in {SEVERITIES}")
        if self.anatomy not in ANATOMIES:
            raise BadInputError(f"PromptFacts: anatomy {self.anatomy!r} not in {ANATOMIES}")


def _as_mask(mask: Any, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise BadInputError(f"{name}: expected a 2-D mask, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise BadInputError(f"{name}: expected a boolean (0/1) mask, got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def _material(material: str) -> str:
    key = str(material).strip().lower()
    if key not in _MATERIAL_ALIASES:
        raise BadInputError(f"material {material!r} is not one of {MATERIALS} (or Ti/Fe/Cu/Au)")
    return _MATERIAL_ALIASES[key]


def _size_class(total_px: int, shape: tuple[int, int]) -> str:
    scale = shape[0] * shape[1] / _REF_AREA_PX
    for name, limit in zip(SIZE_CLASSES, SIZE_LIMITS_PX, strict=False):
        if total_px < limit * scale:
            return name
    return SIZE_CLASSES[-1]


def _shape_measures(component: np.ndarray) -> tuple[float, float, float]:
    """(elongation, solidity, notch fill) of one component given as a bool array."""
    from scipy.spatial import ConvexHull, QhullError

    rows, cols = np.nonzero(component)
    n = rows.size
    cov = np.cov(np.stack([rows, cols]).astype(np.float64), bias=True) + np.eye(2) / 12.0
    lam = np.linalg.eigvalsh(cov)
    elongation = float(math.sqrt(lam[1] / lam[0]))
    try:
        hull = ConvexHull(np.stack([rows, cols], axis=1).astype(np.float64))
        hull_area = hull.volume + 0.5 * hull.area + math.pi / 4  # grown by ½ px (Steiner)
        solidity = float(min(n / hull_area, 1.0))
    except QhullError:  # fewer than 3 distinct or collinear centres: a digital segment
        solidity = 1.0
    r = _NOTCH_RADIUS
    crop = np.pad(component[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1], r + 1)
    disk = np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) <= r + 1e-9
    notch_fill = float((ndi.binary_closing(crop, disk).sum() - n) / n)
    return elongation, solidity, notch_fill


def _shape_class(elongation: float, solidity: float, notch_fill: float) -> str:
    if elongation >= _ELONGATED:
        if notch_fill >= _NOTCH_FILL:
            return "threaded"
        return "elongated" if solidity >= _SOLID_ELONGATED else "irregular"
    return "round" if solidity >= _SOLID_ROUND else "irregular"


def _position(labels: np.ndarray, count: int, body_mask: np.ndarray | None) -> str:
    h, w = labels.shape
    if body_mask is not None and body_mask.any():
        br, bc = np.nonzero(body_mask)
        ref_r, ref_c = br.mean(), bc.mean()
        radius = math.sqrt(br.size / math.pi)
    else:
        ref_r, ref_c = (h - 1) / 2, (w - 1) / 2
        radius = min(h, w) / 2
    metal_r, metal_c = np.nonzero(labels)
    dy = (metal_r.mean() - ref_r) / radius
    dx = (metal_c.mean() - ref_c) / radius
    if count >= 2:
        centres = ndi.center_of_mass(labels > 0, labels, range(1, count + 1))
        dxs = [(c - ref_c) / radius for _, c in centres]
        if min(dxs) < -_BILATERAL_DX and max(dxs) > _BILATERAL_DX:
            return "bilateral"
    r = math.hypot(dx, dy)
    if r < _CENTRAL_R:
        return "central"
    quadrant = f"{'upper' if dy < 0 else 'lower'} {'left' if dx < 0 else 'right'}"
    return f"peripheral {quadrant}" if r > _PERIPHERAL_R else quadrant


def describe_metal(
    mask: Any, *, material: str = "titanium", body_mask: Any | None = None
) -> MetalFacts:
    """Facts of a metal mask (numpy bool (H, W), 416² or any size) → :class:`MetalFacts`.

    ``body_mask`` (bool (H, W)), when given, is the reference for the position; otherwise
    the image is.  Pure and deterministic.
    """
    metal = _as_mask(mask, "mask")
    body = None if body_mask is None else _as_mask(body_mask, "body_mask")
    if body is not None and body.shape != metal.shape:
        raise BadInputError(f"body_mask: shape {body.shape} differs from mask {metal.shape}")
    material = _material(material)
    labels, count = ndi.label(metal, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return MetalFacts(0, 0, (), NO_METAL, NO_METAL, NO_METAL, material)
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")
    elongation, solidity, notch_fill = _shape_measures(labels == order[0] + 1)
    return MetalFacts(
        count=int(count),
        total_px=int(sizes.sum()),
        component_px=tuple(int(sizes[i]) for i in order),
        size_class=_size_class(int(sizes.sum()), metal.shape),
        shape=_shape_class(elongation, solidity, notch_fill),
        position=_position(labels, int(count), body),
        material=material,
        elongation=round(elongation, 4),
        solidity=round(solidity, 4),
        notch_fill=round(notch_fill, 4),
    )


def _as_image(image: Any, name: str) -> np.ndarray:
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 2:
        raise BadInputError(f"{name}: expected a 2-D image, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise BadInputError(f"{name}: contains NaN or inf")
    return arr


def artifact_rmse_hu(
    input_mu: Any, target_mu: Any, metal_mask: Any, *, dilate_px: int = _SEVERITY_DILATE_PX
) -> float:
    """RMSE in HU of ``input_mu`` against ``target_mu`` (μ in cm⁻¹, (H, W)), both clipped to
    [0, 0.5], over the pixels outside ``metal_mask`` dilated by ``dilate_px`` (3×3 steps)."""
    x = _as_image(input_mu, "input_mu")
    y = _as_image(target_mu, "target_mu")
    metal = _as_mask(metal_mask, "metal_mask")
    if x.shape != y.shape or x.shape != metal.shape:
        raise BadInputError(
            f"input_mu {x.shape}, target_mu {y.shape} and metal_mask {metal.shape} differ in shape"
        )
    if dilate_px > 0 and metal.any():
        metal = ndi.binary_dilation(metal, np.ones((3, 3), dtype=bool), iterations=dilate_px)
    keep = ~metal
    if not keep.any():
        raise BadInputError("metal_mask: no pixel left outside the dilated metal")
    diff_hu = (np.clip(x, *_MU_CLIP) - np.clip(y, *_MU_CLIP)) / MU_WATER * 1000.0
    return float(np.sqrt(np.mean(diff_hu[keep] ** 2)))


def severity_from_rmse(rmse_hu: float) -> str:
    """Severity word for an artifact RMSE in HU (``SEVERITY_LIMITS_HU``)."""
    if not math.isfinite(rmse_hu) or rmse_hu < 0:
        raise BadInputError(f"artifact RMSE must be a finite non-negative HU value, got {rmse_hu}")
    for name, limit in zip(SEVERITIES, SEVERITY_LIMITS_HU, strict=False):
        if rmse_hu < limit:
            return name
    return SEVERITIES[-1]


def severity_from_error(
    input_mu: Any, target_mu: Any, metal_mask: Any, *, dilate_px: int = _SEVERITY_DILATE_PX
) -> str:
    """Severity of the artifacts in ``input_mu`` against its clean ``target_mu`` (μ, cm⁻¹)."""
    return severity_from_rmse(
        artifact_rmse_hu(input_mu, target_mu, metal_mask, dilate_px=dilate_px)
    )


def _hu_to_mu(hu: float) -> float:
    return float(hu_to_mu(hu, clip=False))


def _body_outline(image_mu: np.ndarray) -> np.ndarray:
    body = image_mu > _hu_to_mu(_BODY_HU)
    labels, n = ndi.label(body)
    if n == 0:
        return body
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return ndi.binary_fill_holes(labels == largest)


def anatomy_from_image(
    image_mu: Any, *, body_mask: Any | None = None, metal_mask: Any | None = None
) -> str:
    """Crude, deterministic anatomy of a clean-ish slice (μ in cm⁻¹, (H, W)) → ANATOMIES.

    Rules in the module docstring.  Metal pixels (if given) are left out of the fractions.
    Prefer the target image to the metal-affected one: streaks move the fractions.
    """
    mu = _as_image(image_mu, "image_mu")
    body = _body_outline(mu) if body_mask is None else _as_mask(body_mask, "body_mask")
    if body.shape != mu.shape:
        raise BadInputError(f"body_mask: shape {body.shape} differs from image {mu.shape}")
    inside = body.copy()
    if metal_mask is not None:
        inside &= ~_as_mask(metal_mask, "metal_mask")
    n = inside.sum()
    if n == 0:
        raise BadInputError("image_mu: no body found (nothing above -500 HU)")
    bone = np.count_nonzero(inside & (mu > _hu_to_mu(_BONE_HU))) / n
    air = np.count_nonzero(inside & (mu < _hu_to_mu(_AIR_HU))) / n
    if body.mean() < _HEAD_MAX_BODY_FRACTION and bone > _HEAD_MIN_BONE:
        return "head"
    if air > _CHEST_MIN_AIR:
        return "chest"
    if bone > _PELVIS_MIN_BONE:
        return "pelvis"
    return "abdomen"


# ---- texts ------------------------------------------------------------------------------------


def _pick(options: tuple[str, ...], index: int) -> str:
    return options[index % len(options)]


def _severity_phrase(severity: str, count: int, variant: int) -> str:
    where = "" if count == 0 else (" around it" if count == 1 else " between them")
    return _pick(_SEVERITY_WORDS[severity], variant).format(where=where)


def _metal_phrase(m: MetalFacts) -> str:
    adjective, singular, plural = _SHAPE_WORDS[m.shape]
    words = [
        _COUNT_WORDS.get(m.count, _COUNT_MANY),
        _SIZE_WORDS[m.size_class],
        adjective,
        m.material,
        singular if m.count == 1 else plural,
        _POSITION_WORDS[m.position],
    ]
    return " ".join(w for w in words if w)


def content_text(facts: PromptFacts, *, seed: int = 0) -> str:
    """Clean-anatomy description (what content_emb is trained against)."""
    return _pick(_CONTENT_TEMPLATES, seed).format(anatomy=facts.anatomy)


def artifact_text(facts: PromptFacts, *, seed: int = 0) -> str:
    """Metal and artifact description (what artifact_emb is trained against), e.g.
    "CT slice of the pelvis with two large round titanium implants on both sides, severe dark
    streaks between them"."""
    m = facts.metal
    variant = seed // len(_ARTIFACT_TEMPLATES)
    artifact = _severity_phrase(facts.severity, m.count, variant)
    if m.count == 0:
        return _pick(_NO_METAL_TEMPLATES, seed).format(anatomy=facts.anatomy, artifact=artifact)
    return _pick(_ARTIFACT_TEMPLATES, seed).format(
        anatomy=facts.anatomy, metal=_metal_phrase(m), artifact=artifact
    )


def zero_shot_labels() -> list[str]:
    """The zero-shot class texts: index 0 "no metal", then 1 + 4·size_index + severity_index."""
    labels = [_ZERO_SHOT_NO_METAL.format(artifact=_severity_phrase("none", 0, 0))]
    for size in SIZE_CLASSES:
        for severity in SEVERITIES:
            labels.append(
                _ZERO_SHOT_TEMPLATE.format(
                    size=_SIZE_WORDS[size], artifact=_severity_phrase(severity, 0, 0)
                )
            )
    return labels


def zero_shot_target(facts: PromptFacts) -> int:
    """Index into :func:`zero_shot_labels` of a pair's size class and severity (0: no metal)."""
    if facts.metal.count == 0:
        return 0
    size = SIZE_CLASSES.index(facts.metal.size_class)
    return 1 + size * len(SEVERITIES) + SEVERITIES.index(facts.severity)


def zero_shot_class(index: int) -> tuple[str, str]:
    """(size class, severity) of zero-shot label ``index``; ``(NO_METAL, "none")`` for 0."""
    if index == 0:
        return NO_METAL, "none"
    size, severity = divmod(index - 1, len(SEVERITIES))
    return SIZE_CLASSES[size], SEVERITIES[severity]


def template_digest() -> str:
    """sha256 over the version, vocabulary, thresholds and templates (for bundle manifests)."""
    table = {
        "version": PROMPT_VERSION,
        "anatomies": ANATOMIES,
        "sizes": [SIZE_CLASSES, SIZE_LIMITS_PX, _SIZE_WORDS],
        "shapes": [SHAPES, _SHAPE_WORDS, _ELONGATED, _NOTCH_FILL, _NOTCH_RADIUS],
        "solidity": [_SOLID_ROUND, _SOLID_ELONGATED],
        "positions": [POSITIONS, _POSITION_WORDS, _CENTRAL_R, _PERIPHERAL_R, _BILATERAL_DX],
        "materials": [MATERIALS, _MATERIAL_ALIASES],
        "severity": [SEVERITIES, SEVERITY_LIMITS_HU, _SEVERITY_WORDS, _SEVERITY_DILATE_PX],
        "anatomy_rules": [
            _BODY_HU,
            _AIR_HU,
            _BONE_HU,
            _HEAD_MAX_BODY_FRACTION,
            _HEAD_MIN_BONE,
            _CHEST_MIN_AIR,
            _PELVIS_MIN_BONE,
        ],
        "templates": [
            _CONTENT_TEMPLATES,
            _ARTIFACT_TEMPLATES,
            _NO_METAL_TEMPLATES,
            _ZERO_SHOT_TEMPLATE,
            _ZERO_SHOT_NO_METAL,
            _COUNT_WORDS,
            _COUNT_MANY,
        ],
    }
    blob = json.dumps(table, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
