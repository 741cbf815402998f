"""Bundle save/load: round trip, hashes, refusals, no unpickling (DESIGN §10, §13)."""

from __future__ import annotations

import json
import pathlib
import pickle

import numpy as np
import pytest
import torch

from mar_rt.errors import BundleError
from mar_rt.models.bundle import (
    BUNDLE_FORMAT_VERSION,
    MANIFEST_NAME,
    load_bundle,
    save_bundle,
    update_bundle,
)
from mar_rt.models.sde import SDEConfig, make_schedule, posterior_coefficients
from mar_rt.models.unet import ConditionalUNet, UNetConfig

SMALL = UNetConfig(
    nf=8,
    ch_mult=(1, 2),
    context_dim=16,
    time_sin_dim=8,
    time_dim=16,
    prompt_len=16,
    attn_head_dim=8,
    linear_attn_heads=1,
    linear_attn_head_dim=8,
    transformer_levels=(1,),
    norm_groups=4,
)


def _config():
    return {
        "sde": SDEConfig(T=100, max_sigma=50, eps=0.005),
        "geometry": {"n_rows": 416, "n_cols": 416, "pixel_size": 512 / 416 * 0.03},
        "normalisation": {"image": {"clip": [0.0, 0.5]}, "sinogram": {"clip": [0.0, 4.0]}},
        "pipeline": {"mu": "li", "alpha": 0.5, "steps": 100},
        "prompt_version": "v1",
    }


@pytest.fixture()
def bundle_dir(tmp_path):
    torch.manual_seed(0)
    nets = {"unet_img": ConditionalUNet(SMALL), "unet_sino": ConditionalUNet(SMALL)}
    folder = save_bundle(tmp_path / "bundle", _config(), nets)
    return folder, nets


def test_round_trip(bundle_dir):
    folder, nets = bundle_dir
    b = load_bundle(folder, expected_prompt_version="v1", verify=True)
    manifest = b.config
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION
    assert set(manifest) >= {"created", "geometry", "normalisation", "pipeline", "networks"}
    assert b.network_names == ["unet_img", "unet_sino"]
    assert b.kind("unet_img") == "unet"
    assert b.network_config("unet_img") == SMALL
    for name, net in nets.items():
        loaded = b.state_dict(name)
        ref = net.state_dict()
        assert loaded.keys() == ref.keys()
        for key in ref:
            assert torch.equal(loaded[key], ref[key]), key
        built = b.build(name)
        assert isinstance(built, ConditionalUNet) and not built.training
        x = torch.rand(1, 1, 12, 10)
        c = torch.randn(1, 16)
        with torch.no_grad():
            torch.testing.assert_close(
                built.predict(x, x, torch.tensor([4.0]), c, c),
                net.eval().predict(x, x, torch.tensor([4.0]), c, c),
                rtol=0,
                atol=0,
            )
    # the SDE steps after a JSON round trip are bit-identical
    before = posterior_coefficients(make_schedule(_config()["sde"]), 25)
    after = posterior_coefficients(make_schedule(b.sde), 25)
    for field in ("a", "b", "c", "t_in"):
        assert np.array_equal(getattr(before, field), getattr(after, field))
    # no temporary folders are left beside the bundle
    assert sorted(p.name for p in folder.parent.iterdir()) == ["bundle"]


def test_same_weights_give_the_same_bytes(bundle_dir, tmp_path):
    """Saving the same networks again writes the same weight files (same sha256): a bundle's
    checksums identify its tensors, not the run that wrote them."""
    folder, nets = bundle_dir
    first = load_bundle(folder).config["networks"]
    for i in range(12):
        again = save_bundle(tmp_path / f"again{i}", _config(), nets)
        networks = load_bundle(again).config["networks"]
        assert {n: e["sha256"] for n, e in networks.items()} == {
            n: e["sha256"] for n, e in first.items()
        }


def test_refuses_missing_weights(bundle_dir):
    folder, _ = bundle_dir
    (folder / "unet_sino.safetensors").unlink()
    with pytest.raises(BundleError, match="unet_sino.safetensors"):
        load_bundle(folder)


def test_refuses_changed_weights(bundle_dir):
    folder, _ = bundle_dir
    path = folder / "unet_img.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    b = load_bundle(folder)  # hashes are checked when read ...
    with pytest.raises(BundleError, match="unet_img.safetensors.*sha256"):
        b.state_dict("unet_img")
    with pytest.raises(BundleError, match="sha256"):  # ... or all at once with verify
        load_bundle(folder, verify=True)
    b.state_dict("unet_sino")  # the other network is intact


def _edit_manifest(folder, **changes):
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))
    return manifest


def test_refuses_unknown_format_version(bundle_dir):
    folder, _ = bundle_dir
    _edit_manifest(folder, format_version=BUNDLE_FORMAT_VERSION + 1)
    with pytest.raises(BundleError, match=r"bundle\.json.*format_version"):
        load_bundle(folder)


def test_refuses_prompt_version_mismatch(bundle_dir):
    folder, _ = bundle_dir
    load_bundle(folder)  # no expectation: fine
    with pytest.raises(BundleError, match=r"bundle\.json.*prompt_version 'v1'.*'v2'"):
        load_bundle(folder, expected_prompt_version="v2")


def test_refuses_missing_manifest_and_unsafe_names(bundle_dir, tmp_path):
    folder, _ = bundle_dir
    with pytest.raises(BundleError, match="manifest not found"):
        load_bundle(tmp_path / "nowhere")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["networks"]["unet_img"]["weights"] = "../unet_img.safetensors"
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="plain"):
        load_bundle(folder)
    with pytest.raises(BundleError, match="safe file name"):
        save_bundle(tmp_path / "b2", _config(), {"../x": ConditionalUNet(SMALL)})


def test_refuses_existing_folder_unless_overwrite(bundle_dir):
    folder, nets = bundle_dir
    with pytest.raises(BundleError, match="exists"):
        save_bundle(folder, _config(), nets)
    cfg = {**_config(), "prompt_version": "v2"}
    save_bundle(folder, cfg, {"unet_img": nets["unet_img"]}, overwrite=True)
    b = load_bundle(folder)
    assert b.prompt_version == "v2" and b.network_names == ["unet_img"]
    assert not (folder / "unet_sino.safetensors").exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["bundle"]


def test_refuses_non_network_modules_and_bad_config(tmp_path):
    with pytest.raises(BundleError, match="not a bundle network kind"):
        save_bundle(tmp_path / "b", _config(), {"lin": torch.nn.Linear(2, 2)})
    with pytest.raises(BundleError, match="unknown config sections"):
        save_bundle(tmp_path / "b", {**_config(), "extra": 1}, {"u": ConditionalUNet(SMALL)})
    assert not (tmp_path / "b").exists()


class _Trap:
    """Unpickling this object creates a file; a loader that unpickles would trip it."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def test_loading_never_unpickles(bundle_dir, tmp_path):
    folder, _ = bundle_dir
    tripwire = tmp_path / "unpickled"
    payload = pickle.dumps({"weight": _Trap(tripwire)})
    path = folder / "unet_img.safetensors"
    path.write_bytes(payload)
    import hashlib

    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["networks"]["unet_img"]["sha256"] = hashlib.sha256(payload).hexdigest()
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    b = load_bundle(folder, verify=True)
    with pytest.raises(BundleError, match="not a valid safetensors"):
        b.build("unet_img")
    assert not tripwire.exists()


def test_update_bundle_adds_sections_only(bundle_dir):
    folder, _ = bundle_dir
    update_bundle(folder, onnx={"unet_img": {"file": "onnx/unet_img.onnx", "sha256": "0" * 64}})
    assert load_bundle(folder).config["onnx"]["unet_img"]["file"] == "onnx/unet_img.onnx"
    with pytest.raises(BundleError, match="core sections"):
        update_bundle(folder, networks={})
