"""Prompt facts and templates: known answers on synthetic masks, real slices, determinism."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mar_rt.errors import BadInputError
from mar_rt.models import prompts
from mar_rt.models.prompts import (
    ANATOMIES,
    POSITIONS,
    SEVERITIES,
    SIZE_CLASSES,
    MetalFacts,
    PromptFacts,
    anatomy_from_image,
    artifact_rmse_hu,
    artifact_text,
    content_text,
    describe_metal,
    severity_from_error,
    severity_from_rmse,
    zero_shot_labels,
    zero_shot_target,
)

N = 416
MU_WATER = 0.192


def _grid(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:n, :n]
    return yy.astype(float), xx.astype(float)


def disc(r: float, cy: float = N / 2, cx: float = N / 2, n: int = N) -> np.ndarray:
    yy, xx = _grid(n)
    return np.hypot(yy - cy, xx - cx) <= r


def _rotated(angle_deg: float, cy: float, cx: float) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid()
    a = np.deg2rad(angle_deg)
    u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
    v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    return u, v


def rod(length: float, width: float, angle: float, cy: float = N / 2, cx: float = N / 2):
    u, v = _rotated(angle, cy, cx)
    return (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)


def screw(length: float, angle: float, cy: float = N / 2, cx: float = N / 2, pitch: int = 3):
    """A core 5 px wide with teeth reaching 5 px out on both sides, every other pitch."""
    u, v = _rotated(angle, cy, cx)
    teeth = (np.abs(v) <= 5) & (np.floor(u / pitch) % 2 == 0)
    return (np.abs(u) <= length / 2) & ((np.abs(v) <= 2.5) | teeth)


def facts(mask, **kw) -> MetalFacts:
    return describe_metal(mask, **kw)


# ---- count, size, shape, position ------------------------------------------------------------


def test_count_uses_8_connectivity():
    three = disc(5, 100, 100) | disc(5, 200, 300) | disc(5, 300, 150)
    f = facts(three)
    assert f.count == 3 and len(f.component_px) == 3
    assert f.total_px == three.sum() == sum(f.component_px)
    diagonal = np.zeros((N, N), bool)
    diagonal[100, 100] = diagonal[101, 101] = True
    assert facts(diagonal).count == 1
    empty = facts(np.zeros((N, N), bool))
    assert (empty.count, empty.size_class, empty.shape, empty.position) == (
        0,
        "none",
        "none",
        "none",
    )


@pytest.mark.parametrize(
    ("radius", "expected"),
    [
        (3, "tiny"),
        (4.5, "tiny"),
        (6, "small"),
        (9, "medium"),
        (12, "medium"),
        (17, "large"),
        (26, "very large"),
    ],
)
def test_size_class_at_416(radius, expected):
    # SynDeepLesion groups: 35, 53 px tiny; 112-124 small; 254, 451 medium; 881-890 large; 2061
    mask = disc(radius)
    assert facts(mask).size_class == expected, mask.sum()


def test_size_thresholds_scale_with_image_area():
    small_image = disc(3.6, 104, 104, n=208)  # 41 px: tiny at 416², small at 208² (limit 20)
    assert 30 < small_image.sum() < 80
    assert facts(small_image).size_class == "small"


@pytest.mark.parametrize("angle", [0, 20, 30, 45, 60, 90])
def test_shapes(angle):
    assert facts(disc(10)).shape == "round"
    assert facts(rod(40, 6, angle)).shape == "elongated"
    assert facts(rod(60, 10, angle)).shape == "elongated"
    assert facts(screw(40, angle)).shape == "threaded"
    u, v = _rotated(angle, N / 2, N / 2)
    ell = ((np.abs(u) <= 15) & (np.abs(v) <= 3)) | ((np.abs(v + 12) <= 15) & (np.abs(u - 12) <= 3))
    assert facts(ell).shape == "irregular"
    ring = disc(15) & ~disc(10)
    assert facts(ring).shape == "irregular"


def test_shape_is_the_largest_components():
    mask = rod(60, 8, 30, 150, 150) | disc(4, 300, 300)
    assert facts(mask).shape == "elongated"


def test_positions_against_image():
    r = N / 2
    c = (N - 1) / 2
    assert facts(disc(6, c + 0.1 * r, c - 0.1 * r)).position == "central"
    assert facts(disc(6, c - 0.5 * r, c - 0.3 * r)).position == "upper left"
    assert facts(disc(6, c + 0.5 * r, c + 0.4 * r)).position == "lower right"
    assert facts(disc(6, c - 0.1 * r, c + 0.8 * r)).position == "peripheral upper right"
    hips = disc(15, c + 0.3 * r, c - 0.5 * r) | disc(15, c + 0.3 * r, c + 0.5 * r)
    assert facts(hips).position == "bilateral"
    assert set(POSITIONS) >= {
        facts(disc(6, c + dy, c + dx)).position for dy in (-150, 0, 150) for dx in (-150, 0, 150)
    }


def test_position_against_body_outline():
    body = disc(100, 150, 260)
    metal = disc(5, 150, 260)
    assert facts(metal).position != "central"
    assert facts(metal, body_mask=body).position == "central"
    assert facts(disc(5, 120, 190), body_mask=body).position == "peripheral upper left"


def test_material_aliases_and_refusals():
    assert facts(disc(5), material="Ti").material == "titanium"
    assert facts(disc(5), material="Fe").material == "iron"
    with pytest.raises(BadInputError, match="material"):
        facts(disc(5), material="plutonium")
    with pytest.raises(BadInputError, match="mask"):
        describe_metal(np.zeros((2, 3, 4)))
    with pytest.raises(BadInputError, match="mask"):
        describe_metal(np.full((8, 8), 0.5))


# ---- severity ---------------------------------------------------------------------------------


def test_rmse_closed_form_ignores_dilated_metal():
    target = np.full((64, 64), 0.2)
    metal = np.zeros((64, 64), bool)
    metal[30:33, 30:33] = True
    noisy = target + 0.0192  # +100 HU everywhere
    noisy[27:36, 27:36] = 5.0  # inside the metal dilated by 3 px: ignored
    assert artifact_rmse_hu(noisy, target, metal, dilate_px=3) == pytest.approx(100.0, rel=1e-9)
    with pytest.raises(BadInputError, match="shape"):
        artifact_rmse_hu(noisy, target[:10], metal)


def test_severity_thresholds():
    lows = (0.0, *prompts.SEVERITY_LIMITS_HU)
    for name, low in zip(SEVERITIES, lows, strict=True):
        assert severity_from_rmse(low) == name
        assert severity_from_rmse(low + 1.0) == name
    assert severity_from_rmse(1e4) == "severe"
    with pytest.raises(BadInputError):
        severity_from_rmse(float("nan"))


def test_severity_orders_official_reconstructions(sdl_case_129, sdl_case_195):
    for case, k in ((sdl_case_129, "80"), (sdl_case_195, "0")):
        with h5py.File(case / "gt.h5") as gt, h5py.File(case / f"{k}.h5") as ma:
            image, poly = gt["image"][()], gt["poly_CT"][()]
            ma_ct, li_ct = ma["ma_CT"][()], ma["LI_CT"][()]
        metal = ma_ct > 0.672
        err = {
            name: artifact_rmse_hu(x, image, metal)
            for name, x in (("ma", ma_ct), ("li", li_ct), ("poly", poly))
        }
        assert err["ma"] > 1.5 * err["li"] and err["li"] > err["poly"]
        order = [SEVERITIES.index(severity_from_error(x, image, metal)) for x in (ma_ct, poly)]
        assert order[0] > order[1]


# ---- anatomy ----------------------------------------------------------------------------------


def _hu_to_mu(hu):
    return (np.asarray(hu, dtype=np.float64) / 1000 + 1) * MU_WATER


def test_anatomy_on_real_slices(shared_data, sdl_case_129, sdl_case_195):
    # 129/115: upper abdomen (liver), 195/202: abdomen (kidneys), 321/011: upper chest (lungs),
    # deeplesion_000001_01_01_103: chest (lungs) — read off the images
    for case in (sdl_case_129, sdl_case_195):
        with h5py.File(case / "gt.h5") as gt:
            assert anatomy_from_image(gt["image"][()]) == "abdomen"
    with h5py.File(shared_data / "syndeeplesion/train/000321_03_01/011/gt.h5") as gt:
        assert anatomy_from_image(gt["image"][()]) == "chest"
    from PIL import Image

    png = np.asarray(Image.open(shared_data / "clean-ct/deeplesion_000001_01_01_103.png"))
    assert anatomy_from_image(_hu_to_mu(png.astype(np.float64) - 32768)) == "chest"


def test_anatomy_synthetic_head_and_pelvis():
    hu = np.full((N, N), -1000.0)
    head = disc(120)
    hu[head] = 1200.0  # skull
    hu[disc(100)] = 40.0  # brain
    assert anatomy_from_image(_hu_to_mu(hu)) == "head"
    hu = np.full((N, N), -1000.0)
    hu[disc(190)] = 40.0
    hu[disc(45, 208, 100) | disc(45, 208, 316)] = 700.0  # iliac bones / femoral heads
    assert anatomy_from_image(_hu_to_mu(hu)) == "pelvis"
    hu[disc(45, 208, 100) | disc(45, 208, 316)] = 40.0
    assert anatomy_from_image(_hu_to_mu(hu)) == "abdomen"


# ---- texts ------------------------------------------------------------------------------------


def _pair(mask, severity="severe", anatomy="pelvis") -> PromptFacts:
    return PromptFacts(describe_metal(mask), severity, anatomy)


def test_texts_are_deterministic_and_seeded():
    mask = screw(40, 30) | screw(40, 30, 300, 300)
    a = [artifact_text(_pair(mask), seed=s) for s in range(12)]
    b = [artifact_text(_pair(mask.copy()), seed=s) for s in range(12)]
    assert a == b
    assert len(set(a)) >= 4
    assert all("two" in t and "screws" in t and "between them" in t for t in a)
    assert content_text(_pair(mask), seed=5) == content_text(_pair(mask), seed=5)


def test_texts_differ_across_morphologies_and_sizes():
    masks = {
        "disc": disc(10),
        "rod": rod(40, 6, 30),
        "screws": screw(30, 0, 120, 120) | screw(30, 45, 300, 120) | screw(30, 90, 200, 300),
        "small": disc(6),
        "large": disc(20),
    }
    texts = {k: artifact_text(_pair(m), seed=0) for k, m in masks.items()}
    assert len(set(texts.values())) == len(texts)
    assert "rod" in texts["rod"] and "round" in texts["disc"]
    assert "three" in texts["screws"] and "threaded" in texts["screws"]
    assert "small" in texts["small"] and "large" in texts["large"]
    example = artifact_text(
        _pair(disc(20, 250, 120) | disc(20, 250, 296), "severe", "pelvis"), seed=0
    )
    assert example == (
        "CT slice of the pelvis with two very large round titanium implants on both sides, "
        "severe dark streaks between them"
    )


def test_content_text_describes_anatomy_only():
    texts = {a: content_text(PromptFacts(describe_metal(disc(5)), "mild", a)) for a in ANATOMIES}
    assert all(a in t for a, t in texts.items())
    assert len(set(texts.values())) == len(ANATOMIES)
    other_metal = PromptFacts(describe_metal(disc(20)), "severe", "chest")
    assert content_text(other_metal) == texts["chest"]


def test_zero_shot_round_trip():
    labels = zero_shot_labels()
    assert len(labels) == 1 + len(SIZE_CLASSES) * len(SEVERITIES) == len(set(labels))
    radii = {"tiny": 3, "small": 6, "medium": 10, "large": 17, "very large": 26}
    seen = set()
    for size, r in radii.items():
        for severity in SEVERITIES:
            pair = _pair(disc(r), severity)
            assert pair.metal.size_class == size
            i = zero_shot_target(pair)
            assert prompts.zero_shot_class(i) == (size, severity)
            seen.add(i)
            label = labels[i]
            words = prompts._SIZE_WORDS[size]
            assert f"with {words} metal" in label
            assert prompts._severity_phrase(severity, 0, 0) in label
            # the same severity phrase opens the artifact text's severity clause
            assert prompts._severity_phrase(severity, 0, 0) in artifact_text(pair, seed=0)
    assert seen == set(range(1, len(labels)))
    assert zero_shot_target(_pair(np.zeros((N, N), bool), "none")) == 0
    assert prompts.zero_shot_class(0) == (prompts.NO_METAL, "none")
    assert "without metal" in labels[0]


def test_prompt_facts_validation_and_digest():
    with pytest.raises(BadInputError, match="severity"):
        PromptFacts(describe_metal(disc(5)), "awful", "pelvis")
    with pytest.raises(BadInputError, match="anatomy"):
        PromptFacts(describe_metal(disc(5)), "mild", "knee")
    digest = prompts.template_digest()
    assert digest == prompts.template_digest() and len(digest) == 64
    assert prompts.PROMPT_VERSION == "1"
