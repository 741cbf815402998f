"""Model bundles: ``bundle.json`` + one ``*.safetensors`` per network (DESIGN §10, §13).

Layout of a bundle folder::

    bundle.json               the manifest (below)
    <network>.safetensors     weights, one file per network
    onnx/, engines/           added later by ``mar_rt.export`` (listed in extra sections)

``bundle.json``::

    format_version  int, BUNDLE_FORMAT_VERSION
    created         UTC ISO-8601 time of writing
    prompt_version  str, the prompt template version the text embeddings were made with
    sde             SDEConfig.to_dict()
    geometry        plain dict (FanBeamGeometry fields)
    normalisation   plain dict (network scaling, DESIGN §3)
    pipeline        plain dict (pipeline switches, μ choice, α, ...)
    networks        {name: {kind: "unet" | "dudoclip", config: {...}, weights: file, sha256: hex}}

Any further top-level section (``onnx``, ``engines``) is kept as it is and can be written with
:func:`update_bundle`.  Every file is written under a temporary name and renamed into place.
Loading parses JSON and safetensors only — nothing is ever unpickled — and checks each weights
file's sha256 against the manifest before its tensors are read.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mar_rt.errors import BundleError
from mar_rt.models.sde import SDEConfig

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST_NAME",
    "NETWORK_KINDS",
    "Bundle",
    "save_bundle",
    "load_bundle",
    "update_bundle",
    "sha256_file",
]

log = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "bundle.json"

# kind → (module, network class, config class); imported lazily, so a bundle with only U-Nets
# loads even where the DuDoCLIP module (open_clip) is not importable.
NETWORK_KINDS: dict[str, tuple[str, str, str]] = {
    "unet": ("mar_rt.models.unet", "ConditionalUNet", "UNetConfig"),
    "dudoclip": ("mar_rt.models.dudoclip", "DuDoCLIP", "DuDoCLIPConfig"),
}
_PLAIN_SECTIONS = ("geometry", "normalisation", "pipeline")
_CORE_KEYS = ("format_version", "created", "prompt_version", "sde", "networks", *_PLAIN_SECTIONS)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- helpers


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _kind_classes(kind: str, *, context: str) -> tuple[type, type]:
    if kind not in NETWORK_KINDS:
        raise BundleError(
            f"{context}: unknown network kind {kind!r}; known: {sorted(NETWORK_KINDS)}"
        )
    module_name, cls_name, cfg_name = NETWORK_KINDS[kind]
    try:
        module = importlib.import_module(module_name)
        return getattr(module, cls_name), getattr(module, cfg_name)
    except (ImportError, AttributeError) as exc:
        raise BundleError(
            f"{context}: network kind {kind!r} needs {module_name}.{cls_name}, "
            f"which cannot be imported: {exc}"
        ) from exc


def _kind_of(module: nn.Module, name: str) -> str:
    for kind in NETWORK_KINDS:
        try:
            cls, _ = _kind_classes(kind, context=f"network {name!r}")
        except BundleError:
            continue
        if isinstance(module, cls):
            return kind
    raise BundleError(
        f"network {name!r}: {type(module).__name__} is not a bundle network kind "
        f"({', '.join(f'{k}: {v[1]}' for k, v in NETWORK_KINDS.items())})"
    )


def _config_dict(module: nn.Module, name: str) -> dict[str, Any]:
    cfg = getattr(module, "cfg", None)
    if cfg is None:
        cfg = getattr(module, "config", None)
    if cfg is None:
        raise BundleError(f"network {name!r}: the module has no .cfg config object")
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    raise BundleError(f"network {name!r}: its config {type(cfg).__name__} has no to_dict()")


def _plain(value: Any, key: str) -> Any:
    """A JSON-ready copy of a config section (dataclasses become dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise BundleError(f"bundle config section {key!r} is not plain JSON data: {exc}") from exc


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- saving


def save_bundle(
    folder: str | os.PathLike,
    config: Mapping[str, Any],
    modules: Mapping[str, nn.Module],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a bundle folder atomically: everything goes to a temporary sibling folder, which is
    renamed to ``folder`` at the end.

    Args:
        folder: the bundle folder to create.
        config: ``sde`` (SDEConfig or its dict), ``geometry``, ``normalisation``, ``pipeline``
            (plain dicts or dataclasses) and ``prompt_version`` (str).  Other keys are refused.
        modules: {name: network}; each is a registered kind (``NETWORK_KINDS``) with a ``.cfg``
            that has ``to_dict()``.  Names become file names, so they must match
            ``[A-Za-z0-9][A-Za-z0-9_.-]*``.
        overwrite: replace an existing folder (its onnx/ and engines/ go with it).

    Returns:
        The bundle folder.
    """
    folder = Path(folder)
    unknown = set(config) - {"sde", "prompt_version", *_PLAIN_SECTIONS}
    if unknown:
        raise BundleError(f"save_bundle {folder}: unknown config sections {sorted(unknown)}")
    missing = [k for k in ("sde", "prompt_version", *_PLAIN_SECTIONS) if k not in config]
    if missing:
        raise BundleError(f"save_bundle {folder}: config lacks sections {missing}")
    if not modules:
        raise BundleError(f"save_bundle {folder}: no networks given")
    if folder.exists() and not overwrite:
        raise BundleError(f"save_bundle: {folder} exists (pass overwrite=True to replace it)")

    sde = config["sde"]
    sde = sde if isinstance(sde, SDEConfig) else SDEConfig.from_dict(dict(sde))
    manifest: dict[str, Any] = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "prompt_version": str(config["prompt_version"]),
        "sde": sde.to_dict(),
        **{key: _plain(config[key], key) for key in _PLAIN_SECTIONS},
        "networks": {},
    }

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        from safetensors.torch import save_file

        for name, module in modules.items():
            if not _NAME_RE.match(name):
                raise BundleError(
                    f"save_bundle {folder}: network name {name!r} is not a safe file name"
                )
            kind = _kind_of(module, name)
            net_cfg = _plain(_config_dict(module, name), f"networks.{name}.config")
            weights = f"{name}.safetensors"
            # clone: contiguous, CPU, and no shared storage (safetensors refuses aliases)
            tensors = {
                k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()
            }
            # one metadata key: safetensors orders the keys of its header metadata by a
            # randomly seeded hash, so with two the same tensors could give other bytes
            save_file(tensors, str(tmp / weights), metadata={"format": "pt"})
            manifest["networks"][name] = {
                "kind": kind,
                "config": net_cfg,
                "weights": weights,
                "sha256": sha256_file(tmp / weights),
            }
        _write_json_atomic(tmp / MANIFEST_NAME, manifest)
        os.chmod(tmp, 0o755)
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
            os.replace(folder, old / "bundle")
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote bundle %s with networks %s", folder, sorted(modules))
    return folder


def update_bundle(folder: str | os.PathLike, **sections: Any) -> None:
    """Add or replace extra top-level manifest sections (``onnx``, ``engines``, ...) atomically.

    The core sections (weights, configs, SDE, versions) cannot be changed this way.
    """
    path = Path(folder) / MANIFEST_NAME
    core = sorted(set(sections) & set(_CORE_KEYS))
    if core:
        raise BundleError(f"{path}: update_bundle may not change core sections {core}")
    manifest = _read_manifest(path)
    for key, value in sections.items():
        manifest[key] = _plain(value, key)
    _write_json_atomic(path, manifest)


# --------------------------------------------------------------------------- loading


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(f"{path}: bundle manifest not found")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable bundle manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: bundle manifest is not a JSON object")
    return manifest


@dataclass(frozen=True, eq=False)
class Bundle:
    """A loaded, validated bundle.  ``config`` returns a copy of the manifest."""

    folder: Path
    _manifest: dict[str, Any]

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST_NAME

    @property
    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self._manifest)

    @property
    def sde(self) -> SDEConfig:
        return SDEConfig.from_dict(self._manifest["sde"])

    @property
    def prompt_version(self) -> str:
        return self._manifest["prompt_version"]

    @property
    def network_names(self) -> list[str]:
        return list(self._manifest["networks"])

    def _entry(self, name: str) -> dict[str, Any]:
        nets = self._manifest["networks"]
        if name not in nets:
            raise BundleError(f"{self.manifest_path}: no network {name!r}; it has {sorted(nets)}")
        return nets[name]

    def kind(self, name: str) -> str:
        return self._entry(name)["kind"]

    def network_config(self, name: str):
        """The network's config object (e.g. ``UNetConfig``), rebuilt from the manifest."""
        entry = self._entry(name)
        _, cfg_cls = _kind_classes(entry["kind"], context=f"{self.manifest_path} network {name!r}")
        try:
            if hasattr(cfg_cls, "from_dict"):
                return cfg_cls.from_dict(entry["config"])
            return cfg_cls(**entry["config"])
        except (TypeError, ValueError) as exc:
            raise BundleError(
                f"{self.manifest_path}: bad config for network {name!r}: {exc}"
            ) from exc

    def weights_path(self, name: str) -> Path:
        path = self.folder / self._entry(name)["weights"]
        if not path.is_file():
            raise BundleError(f"{path}: weights of network {name!r} are missing")
        return path

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The network's tensors, read from safetensors after the sha256 check."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = self.weights_path(name)
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != self._entry(name)["sha256"]:
            raise BundleError(
                f"{path}: sha256 {digest} does not match the manifest "
                f"({self._entry(name)['sha256']}); the file was changed or replaced"
            )
        try:
            return load(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise BundleError(f"{path}: not a valid safetensors file: {exc}") from exc

    def build(self, name: str, *, device: str | torch.device = "cpu") -> nn.Module:
        """Construct network ``name`` from its config, load its weights, return it in eval mode."""
        entry = self._entry(name)
        cls, _ = _kind_classes(entry["kind"], context=f"{self.manifest_path} network {name!r}")
        module = cls(self.network_config(name))
        try:
            module.load_state_dict(self.state_dict(name), strict=True)
        except RuntimeError as exc:
            raise BundleError(
                f"{self.weights_path(name)}: weights do not fit network {name!r}: {exc}"
            ) from exc
        return module.to(device).eval()


def load_bundle(
    folder: str | os.PathLike,
    *,
    expected_prompt_version: str | None = None,
    verify: bool = False,
) -> Bundle:
    """Read and validate ``folder/bundle.json``.

    Refuses (``BundleError`` naming the file) an unknown format version, missing sections,
    unknown network kinds, unsafe or missing weights files, malformed hashes, and — when
    ``expected_prompt_version`` is given — a different prompt version.  With ``verify`` every
    weights file's sha256 is checked now; otherwise each is checked when it is read.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    manifest = _read_manifest(path)

    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{path}: unsupported bundle format_version {version!r}; "
            f"this mar-rt reads version {BUNDLE_FORMAT_VERSION}"
        )
    missing = [k for k in _CORE_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{path}: manifest lacks sections {missing}")
    if (
        expected_prompt_version is not None
        and manifest["prompt_version"] != expected_prompt_version
    ):
        raise BundleError(
            f"{path}: prompt_version {manifest['prompt_version']!r} does not match the "
            f"expected {expected_prompt_version!r}; text embeddings would not agree"
        )
    try:
        SDEConfig.from_dict(manifest["sde"])
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{path}: bad sde section: {exc}") from exc

    networks = manifest["networks"]
    if not isinstance(networks, dict) or not networks:
        raise BundleError(f"{path}: 'networks' must be a non-empty object")
    for name, entry in networks.items():
        where = f"{path}: network {name!r}"
        if not isinstance(entry, dict) or not {"kind", "config", "weights", "sha256"} <= set(entry):
            raise BundleError(f"{where} needs kind, config, weights and sha256")
        if entry["kind"] not in NETWORK_KINDS:
            raise BundleError(f"{where} has unknown kind {entry['kind']!r}")
        weights = entry["weights"]
        if (
            not isinstance(weights, str)
            or not _NAME_RE.match(weights)
            or not weights.endswith(".safetensors")
        ):
            raise BundleError(
                f"{where}: weights {weights!r} must be a plain *.safetensors file name"
            )
        if not isinstance(entry["sha256"], str) or not _SHA_RE.match(entry["sha256"]):
            raise BundleError(f"{where}: sha256 {entry['sha256']!r} is not a hex digest")
        if not (folder / weights).is_file():
            raise BundleError(f"{folder / weights}: weights of network {name!r} are missing")

    bundle = Bundle(folder, manifest)
    if verify:
        for name in networks:
            digest = sha256_file(bundle.weights_path(name))
            if digest != networks[name]["sha256"]:
                raise BundleError(
                    f"{bundle.weights_path(name)}: sha256 {digest} does not match the manifest"
                )
    return bundle
