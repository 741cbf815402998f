"""Engine cache: keys, engine-set folders and their manifests (DESIGN §10, §13).

An *engine set* is one folder ``engines/<key>/`` holding one engine file per graph, built for
one machine and one configuration, plus ``manifest.json``::

    format        ENGINE_FORMAT
    key           EngineKey.to_dict(): everything the engines depend on (below)
    key_sha256    sha256 of the key's canonical JSON (the folder name ends in its first 12 hex)
    created       UTC ISO-8601 time
    graphs        {graph: {file, sha256, onnx_sha256, shapes: {input: [min, opt, max]}}}
    extra_files   {relative path: sha256} (e.g. the ONNX Runtime TensorRT EP's own cache)

What a key holds (``EngineKey``): the backend (``tensorrt`` or ``onnxruntime``), its version,
the device (GPU name, compute capability; the CPU model for ONNX Runtime on CPU), the ONNX
Runtime execution provider, the precision, the batch profile (min, opt, max; H and W are fixed
by the ONNX files), the sha256 of every graph's ONNX file, and builder options that change the
engine.  Any difference is a different folder, so a stale engine is never picked by name.

Loading is refused (``EngineMismatchError``, naming what differs) when the manifest's key is not
the expected one — a folder copied from another GPU or renamed — and before any engine file
is read its sha256 is checked against the manifest; a folder holding files its manifest does
not list is refused as a whole (TensorRT plans can carry plugins, i.e. code).

Where the per-machine artefacts live.  An *artefact folder* holds ``onnx/`` and ``engines/``.
``mar-rt build-engines`` writes one per bundle into the per-user cache, never into the bundle
(which may sit read-only in site-packages)::

    cache_root()                   $MAR_RT_CACHE, else $XDG_CACHE_HOME/mar-rt, else ~/.cache/mar-rt
      bundles/<name>-<sha16>/      artifacts_dir(bundle); sha16: the first 16 hex of the sha256
        onnx/  engines/<key>/      of the bundle's bundle.json (which pins every weight's sha256)

``--out DIR`` (``build_engines(out=DIR)``) writes ``DIR/onnx`` and ``DIR/engines`` instead.  The
runtime (``mar_rt.export.build.find_artifacts``) reads the cache folder when it holds an ONNX
export, else the bundle folder itself (a bundle that carries its own ``onnx/``, or one built
with ``--out`` pointing at it).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mar_rt.errors import EngineMismatchError
from mar_rt.models.bundle import sha256_file

__all__ = [
    "ENGINE_FORMAT",
    "ENGINE_MANIFEST",
    "CACHE_ENV",
    "EngineKey",
    "EngineSet",
    "artifacts_dir",
    "bundle_sha256",
    "cache_root",
    "find_engine_set",
    "read_engine_set",
    "read_verified",
    "sha256_bytes",
    "sha256_file",
    "write_engine_manifest",
    "write_json_atomic",
]

log = logging.getLogger(__name__)

ENGINE_FORMAT = 1
ENGINE_MANIFEST = "manifest.json"
CACHE_ENV = "MAR_RT_CACHE"
"""Environment variable naming the per-user artefact cache (overrides XDG_CACHE_HOME)."""
BUNDLES_DIR = "bundles"
BUILD_LOG = "build.log"
# Files an engine folder may hold besides the ones its manifest lists.
_UNLISTED_OK = frozenset({ENGINE_MANIFEST, BUILD_LOG})
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_SAFE_REL = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


# --------------------------------------------------------------------------- hashing, files
def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_verified(path: str | os.PathLike, expected_sha256: str, *, what: str) -> bytes:
    """The bytes of ``path`` after checking their sha256 against ``expected_sha256``.

    The caller deserialises exactly these bytes, so the file cannot change between the check
    and the load.  Raises EngineMismatchError naming the file (``what`` says what it is).
    """
    path = Path(path)
    if not path.is_file():
        raise EngineMismatchError(f"{what} {path} is missing")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != expected_sha256:
        raise EngineMismatchError(
            f"{what} {path}: sha256 {digest[:16]}… does not match its manifest "
            f"({expected_sha256[:16]}…); the file was changed or replaced — refusing to load it"
        )
    return data


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to a temporary sibling, fsync, rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, *, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; EngineMismatchError naming it when unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineMismatchError(f"{what} {path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise EngineMismatchError(f"{what} {path} is not a JSON object")
    return data


# --------------------------------------------------------------------------- where artefacts live
def cache_root() -> Path:
    """The per-user artefact cache: ``$MAR_RT_CACHE``, else ``$XDG_CACHE_HOME/mar-rt``, else
    ``~/.cache/mar-rt`` (the XDG base-directory default).  Not created here."""
    explicit = os.environ.get(CACHE_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "mar-rt"


def bundle_sha256(bundle_folder: str | os.PathLike) -> str:
    """sha256 of ``bundle_folder/bundle.json``: it lists every weight file's sha256, so equal
    digests mean the same networks, configs and pipeline section."""
    path = Path(bundle_folder) / "bundle.json"
    if not path.is_file():
        raise EngineMismatchError(f"{bundle_folder} is not a bundle folder (no bundle.json)")
    return sha256_file(path)


def artifacts_dir(
    bundle_folder: str | os.PathLike, *, root: str | os.PathLike | None = None
) -> Path:
    """The cache's artefact folder of a bundle: ``<root>/bundles/<name>-<sha16>`` (``root``
    default: :func:`cache_root`).  The name is the bundle folder's, for people reading the
    cache; the sha256 of ``bundle.json`` is what keys it."""
    folder = Path(bundle_folder).resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.name).strip("._")[:40] or "bundle"
    base = Path(root) if root is not None else cache_root()
    return base / BUNDLES_DIR / f"{name}-{bundle_sha256(folder)[:16]}"


# --------------------------------------------------------------------------- the key
def _short(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", text.replace("NVIDIA", "")).lower()[:16] or "dev"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine set depends on; equal keys ⇔ interchangeable engines.

    Attributes:
        backend: ``tensorrt`` or ``onnxruntime``.
        runtime_version: TensorRT or ONNX Runtime version string.
        device: GPU name (or CPU model for ONNX Runtime's CPU provider).
        compute_capability: ``"9.0"`` for a GPU, ``""`` on CPU.
        provider: ONNX Runtime execution provider (``""`` for TensorRT).
        precision: ``fp32`` or ``fp16``.
        batch: (min, opt, max) batch sizes the engines accept / are tuned for.
        onnx_sha256: graph → sha256 of the ONNX file the engine was built from.
        options: builder options that change the engine (flags, optimisation level).
    """

    backend: str
    runtime_version: str
    device: str
    compute_capability: str
    provider: str
    precision: str
    batch: tuple[int, int, int]
    onnx_sha256: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        batch = tuple(int(b) for b in self.batch)
        if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
            raise ValueError(
                f"EngineKey: batch must be (min, opt, max) with 1 ≤ min ≤ opt ≤ max, "
                f"got {self.batch}"
            )
        object.__setattr__(self, "batch", batch)
        object.__setattr__(
            self, "onnx_sha256", MappingProxyType(dict(sorted(self.onnx_sha256.items())))
        )
        object.__setattr__(self, "options", MappingProxyType(dict(sorted(self.options.items()))))

    def __hash__(self) -> int:
        return hash(self.canonical())

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["batch"] = list(self.batch)
        d["onnx_sha256"] = dict(self.onnx_sha256)
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineKey:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise ValueError(f"EngineKey: keys {sorted(d)} differ from {sorted(names)}")
        return cls(**{**d, "batch": tuple(d["batch"])})

    def canonical(self) -> str:
        """Canonical JSON (sorted keys, no spaces): what the digest hashes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return sha256_bytes(self.canonical().encode())

    def dirname(self) -> str:
        """Readable prefix + short hash, e.g. ``trt10.8-h100-sm90-fp16-b1-1-4-3fa2c1d09e7b``."""
        where = (
            f"sm{self.compute_capability.replace('.', '')}" if self.compute_capability else "cpu"
        )
        runtime = {"tensorrt": "trt", "onnxruntime": "ort"}.get(self.backend, _short(self.backend))
        ep = ""
        if self.provider and self.provider != "CPUExecutionProvider":
            ep = "-" + self.provider.replace("ExecutionProvider", "").lower()
        lo, opt, hi = self.batch
        return (
            f"{runtime}{self.runtime_version}{ep}-{_short(self.device)}-{where}-{self.precision}"
            f"-b{lo}-{opt}-{hi}-{self.digest()[:12]}"
        )

    def differences(self, other: EngineKey, *, ignore: Iterable[str] = ()) -> list[str]:
        """Human-readable ``field: built X, here Y`` lines for every field that differs."""
        skip = set(ignore)
        out = []
        for f in dataclasses.fields(self):
            if f.name in skip:
                continue
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "onnx_sha256":
                changed = sorted(g for g in set(mine) | set(theirs) if mine.get(g) != theirs.get(g))
                if changed:
                    out.append(f"ONNX files differ for graphs {changed}")
            elif mine != theirs:
                mine = dict(mine) if isinstance(mine, Mapping) else mine
                theirs = dict(theirs) if isinstance(theirs, Mapping) else theirs
                out.append(f"{f.name}: built {mine!r}, expected {theirs!r}")
        return out

    def covers_batch(self, batch: int) -> bool:
        return self.batch[0] <= batch <= self.batch[2]


# --------------------------------------------------------------------------- engine sets
@dataclass(frozen=True)
class EngineSet:
    """A verified engine folder: its key and, per graph, the engine file and its sha256."""

    folder: Path
    key: EngineKey
    graphs: Mapping[str, Mapping[str, Any]]
    extra_files: Mapping[str, str] = field(default_factory=dict)

    def engine_path(self, graph: str) -> Path:
        if graph not in self.graphs:
            raise EngineMismatchError(
                f"engine set {self.folder} has no engine for graph {graph!r} "
                f"(it has {sorted(self.graphs)}); rebuild with mar-rt build-engines"
            )
        return self.folder / self.graphs[graph]["file"]

    def read_engine(self, graph: str) -> bytes:
        """The engine bytes of ``graph`` after the sha256 check (see :func:`read_verified`)."""
        return read_verified(
            self.engine_path(graph), self.graphs[graph]["sha256"], what=f"engine of {graph}"
        )


def write_engine_manifest(
    folder: Path,
    key: EngineKey,
    graphs: Mapping[str, Mapping[str, Any]],
    *,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``folder/manifest.json`` for ``key``; each graph entry needs ``file`` (a plain
    name inside ``folder``) and ``sha256``; other fields (``onnx_sha256``, ``shapes``) are kept.
    """
    for graph, entry in graphs.items():
        if not _SAFE_REL.match(str(entry.get("file", ""))) or "/" in entry["file"]:
            raise EngineMismatchError(f"{folder}: engine file of {graph!r} must be a plain name")
        if not _SHA_RE.match(str(entry.get("sha256", ""))):
            raise EngineMismatchError(f"{folder}: engine of {graph!r} has no valid sha256")
    manifest = {
        "format": ENGINE_FORMAT,
        "key": key.to_dict(),
        "key_sha256": key.digest(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "graphs": {g: dict(e) for g, e in sorted(graphs.items())},
        "extra_files": dict(sorted((extra_files or {}).items())),
    }
    path = folder / ENGINE_MANIFEST
    write_json_atomic(path, manifest)
    return path


def _listed_files(folder: Path) -> set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def read_engine_set(folder: str | os.PathLike, expected: EngineKey | None = None) -> EngineSet:
    """Read and check ``folder/manifest.json``.

    Checks: the format; the key's digest; (with ``expected``) that the key equals it, else
    EngineMismatchError listing every difference; that the folder holds no file the manifest
    does not list.  Engine hashes are checked when each engine is read (``read_engine``).
    """
    folder = Path(folder)
    path = folder / ENGINE_MANIFEST
    if not path.is_file():
        raise EngineMismatchError(
            f"engine folder {folder} has no {ENGINE_MANIFEST}; unlisted engines are never loaded "
            f"(rebuild with mar-rt build-engines)"
        )
    manifest = read_json(path, what="engine manifest")
    if manifest.get("format") != ENGINE_FORMAT:
        raise EngineMismatchError(
            f"{path}: engine manifest format {manifest.get('format')!r}, this mar-rt reads "
            f"{ENGINE_FORMAT}; rebuild with mar-rt build-engines"
        )
    try:
        key = EngineKey.from_dict(manifest["key"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineMismatchError(f"{path}: malformed engine key: {exc}") from exc
    if manifest.get("key_sha256") != key.digest():
        raise EngineMismatchError(f"{path}: key_sha256 does not match the key it stores")
    if expected is not None and key != expected:
        diffs = key.differences(expected)
        raise EngineMismatchError(
            f"engine set {folder} was built for another configuration and is refused: "
            + "; ".join(diffs)
            + ". Rebuild with mar-rt build-engines"
        )
    graphs = manifest.get("graphs")
    extra = manifest.get("extra_files", {})
    if not isinstance(graphs, dict) or not isinstance(extra, dict):
        raise EngineMismatchError(f"{path}: 'graphs' and 'extra_files' must be objects")
    listed = set(_UNLISTED_OK)
    for graph, entry in graphs.items():
        if not isinstance(entry, dict) or not _SHA_RE.match(str(entry.get("sha256", ""))):
            raise EngineMismatchError(f"{path}: entry of graph {graph!r} has no valid sha256")
        name = str(entry.get("file", ""))
        if not _SAFE_REL.match(name) or "/" in name:
            raise EngineMismatchError(
                f"{path}: engine file {name!r} of {graph!r} is not a plain name"
            )
        listed.add(name)
    for rel, digest in extra.items():
        if not _SAFE_REL.match(rel) or ".." in rel.split("/") or not _SHA_RE.match(str(digest)):
            raise EngineMismatchError(f"{path}: extra file entry {rel!r} is malformed")
        listed.add(rel)
    unlisted = sorted(_listed_files(folder) - listed)
    if unlisted:
        raise EngineMismatchError(
            f"engine set {folder} holds files its manifest does not list: {unlisted}; "
            f"refusing the whole set (engines can carry plugins). Remove them or rebuild"
        )
    return EngineSet(folder, key, MappingProxyType(graphs), MappingProxyType(extra))


def find_engine_set(
    root: str | os.PathLike,
    wanted: EngineKey,
    *,
    batch: int | None = None,
    onnx_sha256_for: Callable[[Mapping[str, Any]], Mapping[str, str]] | None = None,
    bundle: str | os.PathLike | None = None,
) -> EngineSet:
    """The engine set under ``root`` that fits ``wanted`` and covers ``batch``.

    A set fits when its key equals ``wanted`` in every field but the batch profile (whose
    min..max must cover ``batch``, default ``wanted``'s opt) — and, with ``onnx_sha256_for``,
    but the builder options: then its ONNX hashes are compared with
    ``onnx_sha256_for(its options)`` (the ONNX variant a build parsed depends on its options).
    Among several fits, the one whose opt batch is nearest ``batch`` wins.

    Raises EngineMismatchError saying, for every set found, what differs — or that none exists
    (with the build command for ``bundle``, default: the folder above ``root``).
    """
    root = Path(root)
    need = wanted.batch[1] if batch is None else int(batch)
    hint = (
        f"build them with: mar-rt build-engines --bundle {bundle or root.parent} "
        f"--backend {wanted.backend} --precision {wanted.precision}"
    )
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        raise EngineMismatchError(f"no {wanted.backend} engines in {root}; {hint}")
    reasons = []
    matches: list[EngineSet] = []
    for folder in folders:
        try:
            found = read_engine_set(folder)
        except EngineMismatchError as exc:
            reasons.append(f"{folder.name}: {exc}")
            continue
        target = wanted
        ignore = ["batch"]
        if onnx_sha256_for is not None:
            target = dataclasses.replace(wanted, onnx_sha256=onnx_sha256_for(found.key.options))
            ignore.append("options")
        diffs = found.key.differences(target, ignore=ignore)
        if not found.key.covers_batch(need):
            diffs.append(f"batch {need} outside its profile {found.key.batch}")
        if diffs:
            reasons.append(f"{folder.name}: " + "; ".join(diffs))
        else:
            matches.append(found)
    if not matches:
        raise EngineMismatchError(
            f"no usable {wanted.backend} engine set in {root} for this machine and bundle — "
            + " | ".join(reasons)
            + f". {hint}"
        )
    best = min(matches, key=lambda s: (abs(s.key.batch[1] - need), s.folder.name))
    # Re-read against the exact key it claims, so the folder is checked as a whole once more.
    return read_engine_set(best.folder, best.key)
