"""TensorRT engine builder for TensorRT 10.x and 11.x (DESIGN §10).

Version dispatch is a pure function of the version string (:func:`build_plan`), so it is
tested without TensorRT:

=============  ==========================================================================
TensorRT 10.x  fp32: fp32 ONNX, TF32 cleared.  fp16: fp32 ONNX + ``BuilderFlag.FP16`` and
               ``OBEY_PRECISION_CONSTRAINTS``, normalisation/softmax layers pinned to fp32
               (weak typing); or, with ``strongly_typed=True``, the fp16 ONNX variant and
               ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``.
TensorRT 11.x  networks are always strongly typed and the precision flags are gone: fp16
               means parsing the fp16 ONNX variant (``mar_rt.export.fp16``); no flags.
=============  ==========================================================================

Every builder step whose TensorRT call returns None/False (network, parser, profile, timing
cache, ``build_serialized_network``, deserialisation) is checked where it happens and raises
``EngineBuildError`` naming the graph and file, with the parser errors or the tail of the
captured build log.  ``tensorrt`` is imported only inside the functions that need it; where it
is missing, :func:`import_tensorrt` raises ``BackendUnavailableError`` with one message.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mar_rt.errors import BackendUnavailableError, MarRtError
from mar_rt.export.cache import EngineKey

__all__ = [
    "EngineBuildError",
    "TrtBuildOptions",
    "TrtBuildPlan",
    "build_engine",
    "build_plan",
    "capture_logger",
    "check_engine_io",
    "cuda_device_identity",
    "import_tensorrt",
    "parse_version",
    "profile_shapes",
    "trt_engine_key",
]

log = logging.getLogger(__name__)

MISSING_TENSORRT = (
    "TensorRT is not installed (python package 'tensorrt' not importable): install "
    "'mar-rt[gpu]' (tensorrt>=10) on a machine with an NVIDIA GPU, or use --backend "
    "onnxruntime / torch"
)
# TensorRT layer types that stay fp32 under 10.x weak typing (same reasons as fp16.Fp16Policy).
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX")


class EngineBuildError(MarRtError):
    """A TensorRT build step failed; the message names the graph and file."""


# --------------------------------------------------------------------------- pure parts
def parse_version(version: str) -> tuple[int, int, int]:
    """``"10.8.0.43"`` → (10, 8, 0).  ValueError for a string without a major.minor."""
    match = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not match:
        raise ValueError(f"not a TensorRT version string: {version!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


@dataclass(frozen=True)
class TrtBuildOptions:
    """Builder settings that change the engine (part of the engine key).

    precision: ``fp32`` or ``fp16``.
    batch: (min, opt, max) batch profile; ``opt`` is what TensorRT tunes for.
    workspace_gib: workspace memory pool limit.
    strongly_typed: on 10.x, build fp16 from the fp16 ONNX as a strongly typed network
        instead of the FP16 flag (11.x always does).
    version_compatible: ``BuilderFlag.VERSION_COMPATIBLE`` (the plan embeds a lean runtime,
        i.e. host code — the loader must allow that explicitly).
    refit: ``BuilderFlag.REFIT`` (weights can be swapped without a rebuild).
    tf32: allow TF32 in fp32 engines (off: fp32 engines match torch's fp32 results).
    opt_level: builder optimisation level 0–5 (None: TensorRT's default, 3).
    """

    precision: str = "fp16"
    batch: tuple[int, int, int] = (1, 1, 2)
    workspace_gib: float = 4.0
    strongly_typed: bool = False
    version_compatible: bool = False
    refit: bool = False
    tf32: bool = False
    opt_level: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16"):
            raise ValueError(
                f"TrtBuildOptions: precision must be fp32 or fp16, got {self.precision!r}"
            )
        lo, opt, hi = (int(b) for b in self.batch)
        if not 1 <= lo <= opt <= hi:
            raise ValueError(
                f"TrtBuildOptions: batch must be 1 ≤ min ≤ opt ≤ max, got {self.batch}"
            )
        object.__setattr__(self, "batch", (lo, opt, hi))
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise ValueError(f"TrtBuildOptions: opt_level must be 0..5, got {self.opt_level}")

    def key_options(self) -> dict[str, Any]:
        """The options that enter the engine key (precision and batch have their own fields)."""
        return {
            "strongly_typed": self.strongly_typed,
            "version_compatible": self.version_compatible,
            "refit": self.refit,
            "tf32": self.tf32,
            "opt_level": self.opt_level,
        }


@dataclass(frozen=True)
class TrtBuildPlan:
    """What the builder does for one TensorRT version and precision (see module docstring).

    network_flags / builder_flags / cleared_flags: enum member names of
    ``NetworkDefinitionCreationFlag`` / ``BuilderFlag`` to set / clear.
    onnx_precision: which ONNX variant to parse (``fp32`` or ``fp16``).
    pin_fp32_layers: pin ``FP32_LAYER_TYPES`` layers to fp32 (10.x weak-typed fp16 only).
    """

    major: int
    network_flags: tuple[str, ...] = ()
    builder_flags: tuple[str, ...] = ()
    cleared_flags: tuple[str, ...] = ()
    onnx_precision: str = "fp32"
    pin_fp32_layers: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


def build_plan(version: str, options: TrtBuildOptions) -> TrtBuildPlan:
    """The build recipe for TensorRT ``version`` (pure; see the module docstring).

    Raises BackendUnavailableError for TensorRT < 10 (the explicit-batch-only, v3-execution
    API this module uses starts at 10).
    """
    major, _, _ = parse_version(version)
    if major < 10:
        raise BackendUnavailableError(
            f"TensorRT {version} is too old: mar-rt needs TensorRT 10 or 11 "
            f"(execute_async_v3, set_tensor_address, explicit batch only)"
        )
    notes = []
    if major > 11:
        notes.append(f"TensorRT {version} is newer than 11.x; building with the 11.x rules")
    builder, cleared = [], []
    if options.version_compatible:
        builder.append("VERSION_COMPATIBLE")
    if options.refit:
        builder.append("REFIT")
    if major == 10:
        if options.precision == "fp16" and options.strongly_typed:
            return TrtBuildPlan(
                major, ("STRONGLY_TYPED",), tuple(builder), (), "fp16", False, tuple(notes)
            )
        if options.precision == "fp16":
            builder += ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
            return TrtBuildPlan(major, (), tuple(builder), (), "fp32", True, tuple(notes))
        if not options.tf32:
            cleared.append("TF32")
        return TrtBuildPlan(major, (), tuple(builder), tuple(cleared), "fp32", False, tuple(notes))
    # 11.x and later: always strongly typed; precision comes from the ONNX file's types.
    if options.precision == "fp32" and not options.tf32:
        cleared.append("TF32")
    return TrtBuildPlan(
        major, (), tuple(builder), tuple(cleared), options.precision, False, tuple(notes)
    )


def profile_shapes(
    spec: Any, batch: tuple[int, int, int]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Optimisation-profile shapes (min, opt, max) per input of a ``GraphSpec``: the batch
    axis ``B`` takes the three batch sizes, every other dim is the spec's static size."""
    out = {}
    for name, tspec in spec.inputs.items():
        shapes = []
        for b in batch:
            dims = []
            for d in tspec.shape:
                if isinstance(d, str):
                    if d != "B":
                        raise EngineBuildError(
                            f"graph {spec.name}: input {name} has free dim {d!r}; only the "
                            f"batch dim 'B' may be dynamic"
                        )
                    dims.append(int(b))
                else:
                    dims.append(int(d))
            shapes.append(tuple(dims))
        out[name] = (shapes[0], shapes[1], shapes[2])
    return out


# --------------------------------------------------------------------------- TensorRT side
def import_tensorrt() -> Any:
    """``import tensorrt``, or BackendUnavailableError with one clear message."""
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or a broken CUDA install raising OSError
        raise BackendUnavailableError(f"{MISSING_TENSORRT} ({type(exc).__name__}: {exc})") from exc
    return tensorrt


def cuda_device_identity(index: int = 0) -> tuple[str, str]:
    """(GPU name, "major.minor" compute capability) of CUDA device ``index`` (CuPy, else torch).

    Raises BackendUnavailableError when neither library sees a CUDA device.
    """
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(index)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        return name, f"{int(props['major'])}.{int(props['minor'])}"
    except Exception as exc:
        cupy_error = exc
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(index)
            return props.name, f"{props.major}.{props.minor}"
    except Exception:
        pass
    raise BackendUnavailableError(
        f"no CUDA device {index} visible to CuPy or torch "
        f"({type(cupy_error).__name__}: {cupy_error})"
    )


def capture_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that keeps every message (severity, text) and forwards to logging."""

    class CaptureLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity: Any, msg: str) -> None:  # noqa: D401 - TensorRT callback
            name = getattr(severity, "name", str(severity))
            self.lines.append(f"[{name}] {msg}")
            if name in ("INTERNAL_ERROR", "ERROR"):
                log.error("TensorRT: %s", msg)
            elif name == "WARNING":
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

        def tail(self, n: int = 20) -> str:
            return "\n".join(self.lines[-n:])

    return CaptureLogger()


def _flag(enum: Any, name: str, what: str, version: str) -> Any:
    try:
        return getattr(enum, name)
    except AttributeError:
        raise EngineBuildError(f"TensorRT {version} has no {what}.{name}") from None


def _parse(trt: Any, network: Any, logger: Any, onnx_bytes: bytes, path: Path, graph: str) -> None:
    parser = trt.OnnxParser(network, logger)
    if parser is None:
        raise EngineBuildError(f"graph {graph}: TensorRT could not create an ONNX parser")
    if not parser.parse(onnx_bytes, str(path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = getattr(err, "node_name", lambda: "")() or str(
                getattr(err, "node", lambda: "?")()
            )
            op = getattr(err, "node_operator", lambda: "")()
            errors.append(f"node {node} ({op}): {err.desc()}")
        raise EngineBuildError(
            f"graph {graph}: TensorRT's ONNX parser rejected {path}: "
            + "; ".join(errors or ["(no details)"])
        )


def _pin_fp32(trt: Any, network: Any) -> int:
    wanted = {getattr(trt.LayerType, t) for t in FP32_LAYER_TYPES if hasattr(trt.LayerType, t)}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in wanted:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_engine(
    onnx_bytes: bytes,
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    spec: Any,
    options: TrtBuildOptions,
    *,
    timing_cache: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Build one graph's engine from already-verified ONNX bytes and write it to ``plan_path``.

    Args:
        onnx_bytes: the ONNX file's content (sha256-checked by the caller); ``onnx_path`` is
            passed to the parser only to resolve external data.
        spec: the graph's ``GraphSpec`` (profile shapes, IO names).
        timing_cache: file read before and written after the build (created when missing).

    Returns:
        {"plan_bytes", "log", "plan", "tensorrt_version"} — the engine bytes and build log lines.

    Raises:
        BackendUnavailableError: tensorrt missing. EngineBuildError: any build step failed.
    """
    trt = import_tensorrt()
    version = str(trt.__version__)
    plan = build_plan(version, options)
    for note in plan.notes:
        log.warning(note)
    graph = spec.name
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    logger = capture_logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise EngineBuildError(f"graph {graph}: trt.Builder failed: {logger.tail()}")
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(
            _flag(trt.NetworkDefinitionCreationFlag, name, "NetworkDefinitionCreationFlag", version)
        )
    network = builder.create_network(flags)
    if network is None:
        raise EngineBuildError(f"graph {graph}: create_network failed: {logger.tail()}")
    _parse(trt, network, logger, onnx_bytes, onnx_path, graph)

    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if inputs != list(spec.inputs) or outputs != list(spec.outputs):
        raise EngineBuildError(
            f"graph {graph}: {onnx_path} has IO {inputs} → {outputs}, expected "
            f"{list(spec.inputs)} → {list(spec.outputs)}"
        )

    config = builder.create_builder_config()
    if config is None:
        raise EngineBuildError(f"graph {graph}: create_builder_config failed: {logger.tail()}")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    if options.opt_level is not None:
        config.builder_optimization_level = int(options.opt_level)
    for name in plan.builder_flags:
        config.set_flag(_flag(trt.BuilderFlag, name, "BuilderFlag", version))
    for name in plan.cleared_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    if plan.pin_fp32_layers:
        log.info("graph %s: %d layers pinned to fp32", graph, _pin_fp32(trt, network))

    profile = builder.create_optimization_profile()
    if profile is None:
        raise EngineBuildError(f"graph {graph}: create_optimization_profile failed")
    for name, (lo, opt, hi) in profile_shapes(spec, options.batch).items():
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(
            f"graph {graph}: the optimisation profile {profile_shapes(spec, options.batch)} was "
            f"rejected: {logger.tail()}"
        )

    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None:
            raise EngineBuildError(
                f"graph {graph}: timing cache {timing_cache} could not be created"
            )
        if not config.set_timing_cache(cache, False):
            raise EngineBuildError(
                f"graph {graph}: timing cache {timing_cache} was refused (another GPU or TensorRT?)"
            )

    log.info(
        "graph %s: building TensorRT %s engine (%s, batch %s)",
        graph,
        version,
        options.precision,
        options.batch,
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"graph {graph}: build_serialized_network failed for {onnx_path}:\n{logger.tail()}"
        )
    plan_bytes = bytes(serialized)

    runtime = trt.Runtime(logger)
    if runtime is None:
        raise EngineBuildError(f"graph {graph}: trt.Runtime failed: {logger.tail()}")
    if options.version_compatible:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise EngineBuildError(
            f"graph {graph}: the engine just built does not deserialise: {logger.tail()}"
        )

    if cache is not None:
        updated = config.get_timing_cache()
        if updated is not None:
            _write_atomic(timing_cache, bytes(updated.serialize()))
    _write_atomic(plan_path, plan_bytes)
    return {
        "plan_bytes": plan_bytes,
        "log": list(logger.lines),
        "plan": plan,
        "tensorrt_version": version,
    }


def check_engine_io(trt: Any, engine: Any, spec: Any, where: str) -> None:
    """Refuse an engine whose IO names, modes or dtypes differ from the graph spec."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if inputs != list(spec.inputs) or sorted(outputs) != sorted(spec.outputs):
        raise EngineBuildError(
            f"{where}: engine IO {inputs} → {outputs} differs from graph {spec.name}'s "
            f"{list(spec.inputs)} → {list(spec.outputs)}"
        )
    for n in names:
        if engine.get_tensor_dtype(n) != trt.float32:
            raise EngineBuildError(
                f"{where}: engine tensor {n} is {engine.get_tensor_dtype(n)}, expected float32"
            )


def trt_engine_key(
    *,
    trt_version: str,
    gpu: tuple[str, str],
    options: TrtBuildOptions,
    onnx_sha256: Mapping[str, str],
) -> EngineKey:
    """The engine key of a TensorRT engine set (pure): ``onnx_sha256`` are the hashes of the
    ONNX variant the build parses (``build_plan(...).onnx_precision``, stored as option
    ``onnx``)."""
    plan = build_plan(trt_version, options)
    return EngineKey(
        backend="tensorrt",
        runtime_version=trt_version,
        device=gpu[0],
        compute_capability=gpu[1],
        provider="",
        precision=options.precision,
        batch=options.batch,
        onnx_sha256=onnx_sha256,
        options={**options.key_options(), "onnx": plan.onnx_precision},
    )
