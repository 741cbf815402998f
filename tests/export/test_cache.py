"""Engine cache keys and manifests: naming, refusal of foreign / tampered / unlisted engines,
and the choice among several sets (no TensorRT needed)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from mar_rt.errors import EngineMismatchError
from mar_rt.export.cache import (
    ENGINE_MANIFEST,
    EngineKey,
    find_engine_set,
    read_engine_set,
    read_verified,
    write_engine_manifest,
)

SHA_A = hashlib.sha256(b"onnx a").hexdigest()
SHA_B = hashlib.sha256(b"onnx b").hexdigest()


def _key(**changes) -> EngineKey:
    base = EngineKey(
        backend="tensorrt",
        runtime_version="10.8.0.43",
        device="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        provider="",
        precision="fp16",
        batch=(1, 1, 4),
        onnx_sha256={"unet_image_step": SHA_A, "clip_image": SHA_B},
        options={"onnx": "fp32", "refit": False},
    )
    return dataclasses.replace(base, **changes)


def _write_set(root, key: EngineKey, payloads: dict[str, bytes] | None = None):
    folder = root / key.dirname()
    folder.mkdir(parents=True)
    entries = {}
    for graph in key.onnx_sha256:
        data = (payloads or {}).get(graph, f"plan of {graph}".encode())
        (folder / f"{graph}.plan").write_bytes(data)
        entries[graph] = {"file": f"{graph}.plan", "sha256": hashlib.sha256(data).hexdigest()}
    write_engine_manifest(folder, key, entries)
    return folder


def test_key_name_is_readable_and_changes_with_every_field():
    key = _key()
    name = key.dirname()
    assert name.startswith("trt10.8.0.43-") and "-sm90-fp16-b1-1-4-" in name
    assert len(name.rsplit("-", 1)[1]) == 12
    variants = [
        _key(runtime_version="10.9.0.1"),
        _key(device="NVIDIA A100-SXM4-80GB", compute_capability="8.0"),
        _key(compute_capability="8.9"),
        _key(precision="fp32"),
        _key(batch=(1, 2, 4)),
        _key(onnx_sha256={"unet_image_step": SHA_B, "clip_image": SHA_B}),
        _key(options={"onnx": "fp16", "refit": False}),
    ]
    names = {v.dirname() for v in variants} | {name}
    assert len(names) == len(variants) + 1
    # the order of the ONNX map does not matter, its content does
    same = _key(onnx_sha256={"clip_image": SHA_B, "unet_image_step": SHA_A})
    assert same == key and same.dirname() == name
    assert EngineKey.from_dict(json.loads(json.dumps(key.to_dict()))) == key


def test_differences_name_each_field():
    diffs = _key().differences(_key(runtime_version="11.4.0", compute_capability="8.6"))
    assert any("runtime_version" in d and "11.4.0" in d for d in diffs)
    assert any("compute_capability" in d and "8.6" in d for d in diffs)
    diffs = _key().differences(_key(onnx_sha256={"unet_image_step": SHA_B, "clip_image": SHA_B}))
    assert diffs == ["ONNX files differ for graphs ['unet_image_step']"]


def test_round_trip_and_verified_read(tmp_path):
    key = _key()
    folder = _write_set(tmp_path, key)
    found = read_engine_set(folder, key)
    assert found.key == key
    assert found.read_engine("clip_image") == b"plan of clip_image"
    with pytest.raises(EngineMismatchError, match="no engine for graph 'unet_sinogram_step'"):
        found.read_engine("unet_sinogram_step")


def test_tampered_engine_is_refused(tmp_path):
    key = _key()
    folder = _write_set(tmp_path, key)
    (folder / "clip_image.plan").write_bytes(b"a plan with a plugin")
    found = read_engine_set(folder, key)
    with pytest.raises(EngineMismatchError, match=r"clip_image.plan: sha256 .* does not match"):
        found.read_engine("clip_image")
    with pytest.raises(EngineMismatchError, match="missing"):
        read_verified(folder / "nope.plan", "0" * 64, what="engine")


def test_unlisted_engine_refuses_the_set(tmp_path):
    key = _key()
    folder = _write_set(tmp_path, key)
    (folder / "extra.plan").write_bytes(b"unlisted")
    with pytest.raises(EngineMismatchError, match=r"does not list: \['extra.plan'\]"):
        read_engine_set(folder, key)


def test_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "unet_image_step.plan").write_bytes(b"x")
    with pytest.raises(EngineMismatchError, match="no manifest.json"):
        read_engine_set(tmp_path / "orphan")


def test_foreign_key_under_the_expected_name_is_refused(tmp_path):
    """An engine set from another GPU / TensorRT copied in under this machine's folder name."""
    here = _key()
    foreign = _key(
        device="NVIDIA A100-SXM4-80GB", compute_capability="8.0", runtime_version="10.3.0"
    )
    folder = _write_set(tmp_path, foreign)
    folder = folder.rename(tmp_path / here.dirname())
    with pytest.raises(EngineMismatchError) as err:
        read_engine_set(folder, here)
    message = str(err.value)
    assert "A100" in message and "H100" in message and "8.0" in message and "9.0" in message
    assert "10.3.0" in message and "build-engines" in message


def test_manifest_edited_by_hand_is_refused(tmp_path):
    key = _key()
    folder = _write_set(tmp_path, key)
    manifest = json.loads((folder / ENGINE_MANIFEST).read_text())
    manifest["key"]["compute_capability"] = "8.0"  # claims another GPU without re-keying
    (folder / ENGINE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match="key_sha256"):
        read_engine_set(folder)


def test_find_picks_the_fitting_set_and_explains_the_others(tmp_path):
    wanted = _key(batch=(1, 2, 2))
    _write_set(tmp_path, _key(compute_capability="8.6"))  # other GPU
    _write_set(tmp_path, _key(batch=(1, 1, 1)))  # batch 2 not covered
    good = _write_set(tmp_path, _key(batch=(1, 2, 8)))
    also = _write_set(tmp_path, _key(batch=(1, 4, 8)))
    found = find_engine_set(tmp_path, wanted, batch=2)
    assert found.folder == good  # opt nearest the batch
    assert find_engine_set(tmp_path, wanted, batch=5).folder == also
    with pytest.raises(EngineMismatchError) as err:
        find_engine_set(tmp_path, _key(precision="fp32"), batch=1)
    message = str(err.value)
    assert "precision: built 'fp16', expected 'fp32'" in message
    assert "mar-rt build-engines" in message


def test_find_compares_onnx_of_the_variant_a_build_parsed(tmp_path):
    """TensorRT 10 weak-typed fp16 parses the fp32 ONNX, 11.x the fp16 one: the set's own
    ``onnx`` option says which current hashes it must match."""
    fp32_onnx = {"unet_image_step": SHA_A, "clip_image": SHA_B}
    fp16_onnx = {"unet_image_step": SHA_B, "clip_image": SHA_A}
    _write_set(tmp_path, _key(onnx_sha256=fp16_onnx, options={"onnx": "fp16", "refit": False}))
    current = {"fp32": fp32_onnx, "fp16": fp16_onnx}
    found = find_engine_set(tmp_path, _key(), batch=1, onnx_sha256_for=lambda o: current[o["onnx"]])
    assert found.key.options["onnx"] == "fp16"
    current["fp16"] = {"unet_image_step": SHA_A, "clip_image": SHA_A}  # fp16 ONNX re-made
    with pytest.raises(EngineMismatchError, match="ONNX files differ"):
        find_engine_set(tmp_path, _key(), batch=1, onnx_sha256_for=lambda o: current[o["onnx"]])


def test_no_engines_at_all_says_what_to_run(tmp_path):
    with pytest.raises(EngineMismatchError, match="no tensorrt engines in .* build-engines"):
        find_engine_set(tmp_path / "engines", _key())


def test_key_validation():
    with pytest.raises(ValueError, match="batch"):
        _key(batch=(2, 1, 4))
