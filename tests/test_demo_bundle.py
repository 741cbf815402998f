"""The shipped demo bundle (``mar_rt/assets/demo_bundle``): its files are the ones its manifest
names, byte for byte, and the demo (``mar-rt run`` without input) at the bundle's own steps
gives the figures the model card states: DuDoCROP ahead of LI and NMAR."""

from __future__ import annotations

import hashlib
import json

import pytest

from mar_rt.runtime.bundle_access import DEMO_BUNDLE

DOCUMENTATION = {"MODEL_CARD.md", "train_report.json", "panel_validation.png"}
"""Files beside the weights that no network reads (the model card, its training log and its
figure)."""

CARD_DEMO = {"input": 29.45, "li": 38.18, "nmar": 39.74, "dudocrop": 40.54}
"""PSNR (dB) of the demo in the model card's "Demo" table (torch, CPU, seed 0)."""


@pytest.fixture(scope="module")
def manifest() -> dict:
    path = DEMO_BUNDLE / "bundle.json"
    if not path.is_file():
        pytest.fail(f"the demo bundle is not installed at {DEMO_BUNDLE}")
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_file_matches_the_manifest(manifest):
    """sha256 of each weights file (hashlib, not the project's helper) equals bundle.json's,
    and the folder holds nothing else but the manifest and the documentation."""
    listed = {}
    for name, entry in manifest["networks"].items():
        path = DEMO_BUNDLE / entry["weights"]
        assert path.is_file(), f"{name}: {path} is missing"
        listed[entry["weights"]] = hashlib.sha256(path.read_bytes()).hexdigest()
        assert listed[entry["weights"]] == entry["sha256"], f"{name}: {path} was changed"
    assert sorted(manifest["networks"]) == [
        "clip_image",
        "clip_sinogram",
        "unet_image",
        "unet_residual",
        "unet_sinogram",
    ]
    present = {p.name for p in DEMO_BUNDLE.iterdir()}
    assert present == set(listed) | {"bundle.json"} | DOCUMENTATION, present


def test_shipped_config_is_the_one_the_readme_describes(manifest):
    """S = T = 1 (one x̂₀ prediction per loop), NMAR as μ, DuDoCLIP off, and the switches
    tuned on the tune split in round 6 (README, model card): on the measured route X_p shapes
    the trace (its sinogram and residual loops off, Norm² off, α = 1); the image-only route
    runs OSRO with the sinogram prior and the residual loop, Norm² off, α = 1."""
    pipeline = manifest["pipeline"]
    assert manifest["sde"]["T"] == 1 and pipeline["steps"] == 1
    assert (pipeline["mu_source"], pipeline["use_clip"]) == ("nmar", False)
    measured = ("fidelity_prior", "run_sinogram_sde", "osro_residual", "norm2", "alpha")
    assert tuple(pipeline[k] for k in measured) == ("image", False, False, False, 1.0)
    assert pipeline["image_only"] == {
        "fidelity_prior": "sinogram", "run_sinogram_sde": True, "osro_residual": True,
        "norm2": False, "alpha": 1.0,
    }  # fmt: skip


def test_demo_at_the_shipped_steps(tmp_path):
    """The demo slice with its seeded implant: every method within 0.05 dB of the model card's
    table, DuDoCROP ahead of LI and NMAR in PSNR and SSIM (about 20 s on one CPU thread). The
    protocol simulator makes this slice, and rounds 4 to 6 do not train on it; rounds 4 and 5
    were below NMAR here (model card, "Round 6")."""
    from mar_rt.runtime.demo import run_demo

    result = run_demo(tmp_path, backend="torch", device="cpu", seed=0)
    scores = result.metrics["methods"]
    assert result.metrics["steps"] == 1
    for method, card in CARD_DEMO.items():
        assert scores[method]["psnr"] == pytest.approx(card, abs=0.05), (method, scores)
    for other in ("li", "nmar"):
        assert scores["dudocrop"]["psnr"] > scores[other]["psnr"]
        assert scores["dudocrop"]["ssim"] > scores[other]["ssim"]
    assert result.png.is_file() and result.metrics_json.is_file()
