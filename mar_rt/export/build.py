"""``mar-rt build-engines``: export what is missing, verify, build, write the manifests.

Where: the bundle's artefact folder in the per-user cache (``mar_rt.export.cache``:
``$MAR_RT_CACHE`` or ``$XDG_CACHE_HOME/mar-rt``, ``bundles/<name>-<sha16>/{onnx,engines}``),
or ``out``.  Nothing is written into the bundle folder, which may be read-only (an installed
package); the runtime finds the artefacts again with :func:`find_artifacts`.

Steps for one bundle, backend, precision and batch profile:

1. ONNX: ``export_bundle`` re-exports only graphs whose file is missing or changed, whose
   weights changed, or whose export settings changed; each new export is verified.  A cache
   folder without an export starts from the bundle's own ``onnx/`` when it ships one.
2. fp16: the fp16 variants are (re)converted when the build parses them (ONNX Runtime fp16;
   TensorRT 11.x fp16; TensorRT 10.x fp16 with ``strongly_typed``).
3. Key: ``EngineKey`` of this machine + the ONNX hashes → ``engines/<key>/``.  If that folder
   exists and its manifest, key and every engine hash check out, it is a cache hit and nothing
   is built (sha256s, not mtimes, decide).
4. Build into a temporary folder beside it, reusing (after a hash check) the engine of any
   graph whose per-graph inputs did not change from another set of the same machine and
   settings (in this folder or, for the cache, another bundle's: a retrained network rebuilds
   only its own graphs); write ``manifest.json``; rename the folder into place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mar_rt.errors import EngineMismatchError
from mar_rt.export.cache import (
    BUILD_LOG,
    EngineKey,
    EngineSet,
    artifacts_dir,
    read_engine_set,
    read_verified,
    sha256_file,
    write_engine_manifest,
)
from mar_rt.export.onnx_export import (
    ONNX_DIR,
    ONNX_MANIFEST,
    ExportOptions,
    export_bundle,
    read_onnx_manifest,
)

__all__ = ["BACKENDS", "BuildSummary", "ENGINES_DIR", "build_engines", "find_artifacts"]

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt")
ENGINES_DIR = "engines"
TIMING_DIR = "timing"

ProgressFn = Callable[[str, str], None]


@dataclass(frozen=True)
class BuildSummary:
    """What ``build_engines`` did."""

    engine_dir: Path
    key: EngineKey
    cache_hit: bool
    exported: tuple[str, ...] = ()
    built: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()
    reports: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def find_artifacts(bundle_folder: str | os.PathLike) -> Path | None:
    """The folder whose ``onnx/`` and ``engines/`` the runtime reads for a bundle: its cache
    folder (``cache.artifacts_dir``) when that holds an ONNX export, else the bundle folder
    when it holds one itself, else None (nothing exported: only torch can run the bundle)."""
    bundle_folder = Path(bundle_folder)
    candidates = [bundle_folder]
    if (bundle_folder / "bundle.json").is_file():
        candidates.insert(0, artifacts_dir(bundle_folder))
    for folder in candidates:
        if (folder / ONNX_DIR / ONNX_MANIFEST).is_file():
            return folder
    return None


def _seed_onnx(bundle_folder: Path, root: Path) -> None:
    """Start an artefact folder without an export from the bundle's own ``onnx/`` (copied
    whole, then renamed into place); ``export_bundle`` then re-checks every file's hash."""
    source = bundle_folder / ONNX_DIR
    target = root / ONNX_DIR
    if (target / ONNX_MANIFEST).is_file() or not (source / ONNX_MANIFEST).is_file():
        return
    if source.resolve() == target.resolve():
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{ONNX_DIR}.seed-"))
    try:
        shutil.copytree(source, tmp / ONNX_DIR)
        if target.exists():  # an export without a manifest: unusable, replaced
            shutil.rmtree(target)
        os.replace(tmp / ONNX_DIR, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("ONNX export of %s copied from the bundle to %s", bundle_folder, target)


def _onnx_map(onnx_dir: Path, precision: str) -> dict[str, str]:
    manifest = read_onnx_manifest(onnx_dir)
    return {
        g: e["sha256"] for g, e in manifest["graphs" if precision == "fp32" else "fp16"].items()
    }


def _check_hit(folder: Path, key: EngineKey) -> EngineSet | None:
    """The set at ``folder`` if it is complete and intact for ``key``, else None (logged)."""
    if not folder.is_dir():
        return None
    try:
        found = read_engine_set(folder, key)
        for graph in key.onnx_sha256:
            found.read_engine(graph)
        for rel, digest in found.extra_files.items():
            read_verified(folder / rel, digest, what="engine-set file")
    except EngineMismatchError as exc:
        log.warning("engine set %s is not usable, rebuilding it: %s", folder, exc)
        return None
    missing = set(key.onnx_sha256) - set(found.graphs)
    if missing:
        log.warning("engine set %s lacks graphs %s, rebuilding it", folder, sorted(missing))
        return None
    return found


def _reusable(roots: list[Path], key: EngineKey) -> dict[str, tuple[Path, str]]:
    """graph → (engine file, sha256) from other sets under ``roots`` whose key equals ``key``
    except for other graphs' ONNX hashes (same machine, versions, precision, batch, options,
    same ONNX)."""
    out: dict[str, tuple[Path, str]] = {}
    folders = [f for root in roots if root.is_dir() for f in sorted(root.iterdir())]
    for folder in folders:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            other = read_engine_set(folder)
        except EngineMismatchError:
            continue
        if other.key.differences(key, ignore=("onnx_sha256",)):
            continue
        for graph, sha in key.onnx_sha256.items():
            entry = other.graphs.get(graph)
            if graph not in out and entry and other.key.onnx_sha256.get(graph) == sha:
                out[graph] = (folder / entry["file"], entry["sha256"])
    return out


def _replace_folder(tmp: Path, final: Path) -> None:
    if final.exists():
        trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        os.replace(final, trash / "set")
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def build_engines(
    bundle_path: str | os.PathLike,
    *,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    batch: int = 1,
    max_batch: int | None = None,
    out: str | os.PathLike | None = None,
    force: bool = False,
    device: str | None = None,
    tensorrt_ep: bool = False,
    trt_options: Mapping[str, Any] | None = None,
    export_options: ExportOptions | None = None,
    real_inputs: Any = None,
    progress: ProgressFn | None = None,
) -> BuildSummary:
    """Export, verify and build one engine set (see the module docstring).

    Args:
        bundle_path: the bundle folder.
        backend: ``onnxruntime`` or ``tensorrt``.
        precision: ``fp32`` or ``fp16``.
        batch: the batch size engines are tuned for (TensorRT profile opt).
        max_batch: the largest batch accepted (default: max(batch, 2) for TensorRT, the ONNX
            files' limit for ONNX Runtime).
        out: folder receiving ``onnx/`` and ``engines/`` (default: the bundle's folder in the
            per-user cache, ``cache.artifacts_dir``; never the bundle folder itself).
        force: re-export and rebuild even when current.
        device: ONNX Runtime device ``cpu`` / ``cuda`` (default: cuda when the CUDA provider
            is installed). TensorRT always builds for CUDA device 0.
        tensorrt_ep: ONNX Runtime with its TensorRT execution provider first.
        trt_options: extra ``TrtBuildOptions`` fields (workspace_gib, strongly_typed,
            version_compatible, refit, tf32, opt_level).
        real_inputs: (image01, sino01) for the export verification (default: the demo slice).
        progress: ``progress(graph, message)``.
    """
    from mar_rt.export.graphs import bundle_graph_names, bundle_graph_specs
    from mar_rt.models.bundle import load_bundle

    started = time.perf_counter()
    say = progress or (lambda g, m: log.info("%s: %s", g, m))
    if backend not in BACKENDS:
        raise EngineMismatchError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in ("fp32", "fp16"):
        raise EngineMismatchError(f"precision must be fp32 or fp16, got {precision!r}")
    bundle = load_bundle(bundle_path)
    root = Path(out) if out is not None else artifacts_dir(bundle_path)
    _seed_onnx(Path(bundle_path), root)
    onnx_dir = root / ONNX_DIR
    engines_root = root / ENGINES_DIR
    graphs = list(bundle_graph_names(bundle))
    specs = bundle_graph_specs(bundle)
    options = export_options or ExportOptions()

    # 1. ONNX
    exported = export_bundle(
        bundle, root, options=options, force=force, real_inputs=real_inputs, progress=say
    )

    # 2.-3. key (and the fp16 variants the build parses)
    if backend == "onnxruntime":
        from mar_rt.export.ort import (
            import_onnxruntime,
            ort_device_identity,
            ort_engine_key,
            ort_providers,
        )

        ort = import_onnxruntime()
        if device is None:
            device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        providers = ort_providers(device, tensorrt_ep=tensorrt_ep)
        onnx_precision = precision
        if onnx_precision == "fp16":
            from mar_rt.export.fp16 import export_fp16

            export_fp16(onnx_dir, graphs, force=force, progress=say)
        hi = max_batch or options.max_batch
        if not 1 <= batch <= hi <= options.max_batch:
            raise EngineMismatchError(
                f"batch {batch} / max_batch {hi} outside the ONNX files' batch range "
                f"1..{options.max_batch}"
            )
        key = ort_engine_key(
            ort_version=ort.__version__,
            provider=providers[0],
            device_identity=ort_device_identity(providers[0]),
            precision=precision,
            onnx_sha256=_onnx_map(onnx_dir, onnx_precision),
            batch=(1, batch, hi),
        )
    else:
        from mar_rt.export.tensorrt import (
            TrtBuildOptions,
            build_plan,
            cuda_device_identity,
            import_tensorrt,
            trt_engine_key,
        )

        trt = import_tensorrt()
        hi = max_batch or max(batch, 2)
        if hi > options.max_batch:
            raise EngineMismatchError(
                f"max_batch {hi} exceeds the ONNX files' limit {options.max_batch}"
            )
        topts = TrtBuildOptions(
            precision=precision, batch=(1, batch, hi), **dict(trt_options or {})
        )
        plan = build_plan(str(trt.__version__), topts)
        onnx_precision = plan.onnx_precision
        if onnx_precision == "fp16":
            from mar_rt.export.fp16 import export_fp16

            export_fp16(onnx_dir, graphs, force=force, progress=say)
        key = trt_engine_key(
            trt_version=str(trt.__version__),
            gpu=cuda_device_identity(0),
            options=topts,
            onnx_sha256=_onnx_map(onnx_dir, onnx_precision),
        )
    missing = [g for g in graphs if g not in key.onnx_sha256]
    if missing:
        raise EngineMismatchError(f"{onnx_dir}: no {onnx_precision} ONNX for graphs {missing}")
    key = dataclasses.replace(key, onnx_sha256={g: key.onnx_sha256[g] for g in graphs})
    final = engines_root / key.dirname()

    if not force and (hit := _check_hit(final, key)) is not None:
        say("engines", f"cache hit: {hit.folder}")
        return BuildSummary(
            final,
            key,
            True,
            exported.exported,
            (),
            tuple(graphs),
            exported.reports,
            time.perf_counter() - started,
        )

    # 4. build
    engines_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=engines_root, prefix=f".{final.name}.build-"))
    roots = [engines_root]
    if out is None:  # the cache: other bundles' sets too (a retrained network's siblings)
        roots += [p / ENGINES_DIR for p in sorted(root.parent.iterdir()) if p != root]
    reuse = {} if force else _reusable(roots, key)
    manifest = read_onnx_manifest(onnx_dir)
    section = manifest["graphs" if onnx_precision == "fp32" else "fp16"]
    entries: dict[str, dict[str, Any]] = {}
    built, reused = [], []
    build_log: list[str] = []
    try:
        for graph in graphs:
            suffix = ".plan" if backend == "tensorrt" else ".ort.onnx"
            target = tmp / f"{graph}{suffix}"
            copied = False
            if graph in reuse:
                src, digest = reuse[graph]
                try:
                    target.write_bytes(read_verified(src, digest, what=f"engine of {graph}"))
                    copied = True
                    reused.append(graph)
                    say(graph, f"engine reused from {src.parent.name}")
                except EngineMismatchError as exc:
                    log.warning("not reusing it: %s", exc)
            if not copied:
                onnx_path = onnx_dir / section[graph]["file"]
                onnx_bytes = read_verified(
                    onnx_path, section[graph]["sha256"], what=f"ONNX of {graph}"
                )
                say(graph, f"building {backend} {precision} engine")
                t0 = time.perf_counter()
                if backend == "tensorrt":
                    from mar_rt.export.tensorrt import build_engine

                    timing = (
                        engines_root
                        / TIMING_DIR
                        / (f"{key.dirname().rsplit('-', 5)[0]}.timing-cache")
                    )
                    result = build_engine(
                        onnx_bytes, onnx_path, target, specs[graph], topts, timing_cache=timing
                    )
                    build_log += [f"== {graph}", *result["log"]]
                else:
                    from mar_rt.export.ort import create_session

                    data = section[graph].get("data_file")
                    model: bytes | str = onnx_bytes if not data else str(onnx_path)
                    create_session(
                        model,
                        providers,
                        precision=precision,
                        optimized_out=None if data else target,
                        trt_cache_dir=tmp / "trt_ep" if tensorrt_ep else None,
                    )
                    if data:  # optimised models of > 2 GB graphs are not cached
                        target.write_bytes(onnx_bytes)
                built.append(graph)
                say(graph, f"built in {time.perf_counter() - t0:.1f} s")
            entries[graph] = {
                "file": target.name,
                "sha256": sha256_file(target),
                "onnx_sha256": key.onnx_sha256[graph],
                "onnx_precision": onnx_precision,
                "batch": list(key.batch),
            }
        extra = {}
        if (tmp / "trt_ep").is_dir():
            for p in sorted((tmp / "trt_ep").rglob("*")):
                if p.is_file():
                    extra[p.relative_to(tmp).as_posix()] = sha256_file(p)
        if build_log:
            (tmp / BUILD_LOG).write_text("\n".join(build_log) + "\n", encoding="utf-8")
        write_engine_manifest(tmp, key, entries, extra_files=extra)
        os.chmod(tmp, 0o755)
        _replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say("engines", f"wrote {final}")
    return BuildSummary(
        final,
        key,
        False,
        exported.exported,
        tuple(built),
        tuple(reused),
        exported.reports,
        time.perf_counter() - started,
    )
