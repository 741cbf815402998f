"""The TensorRT backend: one graph's serialized engine from an engine set (``engines/<key>/``).

Lifecycle (TensorRT 10/11 Python API; ``tensorrt`` and ``cupy`` are imported lazily):

1. ``_activate_impl``: find the engine set that fits this GPU (name, compute capability),
   TensorRT version, precision, batch and the bundle's current ONNX files
   (``mar_rt.export.cache.find_engine_set``; anything else is refused with what differs);
   read the plan and check its sha256 against the set's manifest (an unlisted plan is never
   read); ``trt.Runtime.deserialize_cuda_engine`` on exactly those bytes; check the engine's IO
   against the graph spec; create the execution context.
2. per new input shape (``_prepare_shape_impl``): ``set_input_shape`` for each input and
   ``set_tensor_address`` for the output buffers.  Output buffers are CuPy allocations (CuPy
   owns device memory, DESIGN §11) exposed to torch through DLPack, so ``infer`` returns torch
   views of CuPy memory.
3. ``_infer_impl``: ``set_tensor_address`` for the inputs (the caller's torch CUDA tensors), then
   ``execute_async_v3`` on the caller's current CUDA stream (a CuPy stream works through
   ``torch.cuda.ExternalStream``).  No host synchronisation.

Every TensorRT call that reports failure by None/False is checked where it returns.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch

from mar_rt.errors import BackendUnavailableError, EngineMismatchError
from mar_rt.export.build import ENGINES_DIR
from mar_rt.export.cache import find_engine_set
from mar_rt.export.graphs import GraphSpec
from mar_rt.export.onnx_export import ONNX_DIR
from mar_rt.export.tensorrt import (
    EngineBuildError,
    TrtBuildOptions,
    capture_logger,
    check_engine_io,
    cuda_device_identity,
    import_tensorrt,
    trt_engine_key,
)
from mar_rt.runtime.backends.base import Backend
from mar_rt.runtime.backends.onnxruntime_backend import artifacts_root, onnx_sha256_map

log = logging.getLogger(__name__)


class TensorRTError(EngineBuildError):
    """A TensorRT runtime call failed (deserialisation, context, shapes, addresses, enqueue)."""


def _import_cupy() -> Any:
    try:
        import cupy
    except Exception as exc:
        raise BackendUnavailableError(
            f"the tensorrt backend needs CuPy for device buffers (install 'mar-rt[gpu]'): {exc}"
        ) from exc
    return cupy


class TensorRTBackend(Backend):
    """Runs one graph's TensorRT engine (see the module docstring).

    Args:
        spec: the graph's IO.
        engines_root: the ``engines/`` folder holding engine sets.
        onnx_dir: the ``onnx/`` folder whose manifest gives the current ONNX hashes.
        device: a CUDA device.
        precision: ``fp32`` or ``fp16``.
        batch: batch size the engine set must cover (its profile's opt nearest to it wins).
        bundle_folder: the bundle, named in the build command of a refusal's message.
    """

    name: ClassVar[str] = "tensorrt"

    def __init__(
        self,
        spec: GraphSpec,
        engines_root: str | Path,
        onnx_dir: str | Path,
        *,
        device: str | torch.device = "cuda",
        precision: str = "fp16",
        batch: int = 1,
        bundle_folder: str | Path | None = None,
    ) -> None:
        super().__init__(spec, device=device, precision=precision)
        if self.device.type != "cuda":
            raise BackendUnavailableError(
                f"tensorrt backend, graph {spec.name}: needs a CUDA device, got {self.device}"
            )
        self.engines_root = Path(engines_root)
        self.onnx_dir = Path(onnx_dir)
        self.batch = int(batch)
        self.bundle_folder = Path(bundle_folder) if bundle_folder is not None else None
        self.engine_folder: Path | None = None
        self._trt: Any = None
        self._logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None

    @classmethod
    def from_bundle(
        cls,
        bundle: Any,
        graph: str,
        *,
        device: str | torch.device = "cuda",
        precision: str = "fp16",
        artifacts: str | Path | None = None,
        batch: int = 1,
        shared: dict[str, Any] | None = None,
        **options: Any,
    ) -> TensorRTBackend:
        """The backend of ``graph``; engine sets and ONNX manifest come from ``artifacts``
        (default: ``find_artifacts``, the bundle's cache folder, else the bundle folder)."""
        from mar_rt.export.graphs import bundle_graph_specs

        if options:
            log.debug("tensorrt backend ignores options %s", sorted(options))
        cache = {} if shared is None else shared
        root = artifacts_root(bundle, artifacts, cache)
        if "graph_specs" not in cache:  # one bundle read per GraphSet
            cache["graph_specs"] = bundle_graph_specs(bundle)
        spec = cache["graph_specs"][graph]
        return cls(
            spec,
            root / ENGINES_DIR,
            root / ONNX_DIR,
            device=device,
            precision=precision,
            batch=batch,
            bundle_folder=bundle.folder,
        )

    # ---------------------------------------------------------------- lifecycle
    def _activate_impl(self) -> None:
        trt = import_tensorrt()
        _import_cupy()
        where = f"tensorrt backend, graph {self.graph}"
        index = self.device.index or 0
        version = str(trt.__version__)
        wanted = trt_engine_key(
            trt_version=version,
            gpu=cuda_device_identity(index),
            options=TrtBuildOptions(precision=self.precision, batch=(1, self.batch, self.batch)),
            onnx_sha256=onnx_sha256_map(self.onnx_dir, "fp32"),
        )
        found = find_engine_set(
            self.engines_root,
            wanted,
            batch=self.batch,
            onnx_sha256_for=lambda opts: onnx_sha256_map(self.onnx_dir, opts.get("onnx", "fp32")),
            bundle=self.bundle_folder,
        )
        plan = found.read_engine(self.graph)  # sha256-checked bytes
        self._trt = trt
        self._logger = capture_logger(trt)
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(self._logger)
            if runtime is None:
                raise TensorRTError(f"{where}: trt.Runtime failed: {self._logger.tail()}")
            if found.key.options.get("version_compatible"):
                runtime.engine_host_code_allowed = True  # listed and hash-checked plan only
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise TensorRTError(
                    f"{where}: {found.engine_path(self.graph)} does not deserialise: "
                    f"{self._logger.tail()}"
                )
            check_engine_io(trt, engine, self.spec, where)
            context = engine.create_execution_context()
            if context is None:
                raise TensorRTError(
                    f"{where}: create_execution_context failed: {self._logger.tail()}"
                )
        self._runtime, self._engine, self._context = runtime, engine, context
        self.engine_folder = found.folder
        log.info("%s: engine %s", where, found.engine_path(self.graph))

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        cupy = _import_cupy()
        if dtype != torch.float32:
            raise EngineMismatchError(f"tensorrt backend, graph {self.graph}: IO must be float32")
        with cupy.cuda.Device(self.device.index or 0):
            array = cupy.empty(shape, dtype=cupy.float32)
        return torch.from_dlpack(array)  # the DLPack capsule keeps the CuPy memory alive

    def _prepare_shape_impl(
        self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> None:
        where = f"tensorrt backend, graph {self.graph}"
        batch = next(iter(inputs.values())).shape[0]
        if self.engine_folder is not None and not self._covers(batch):
            raise EngineMismatchError(
                f"{where}: batch {batch} is outside the engine's profile; rebuild with "
                f"mar-rt build-engines --batch {batch}"
            )
        for name, tensor in inputs.items():
            if not self._context.set_input_shape(name, tuple(tensor.shape)):
                raise TensorRTError(
                    f"{where}: set_input_shape({name}, {tuple(tensor.shape)}) refused"
                )
        for name, tensor in outputs.items():
            got = tuple(self._context.get_tensor_shape(name))
            if got != tuple(tensor.shape):
                raise TensorRTError(
                    f"{where}: output {name} has shape {got}, expected {tuple(tensor.shape)}"
                )
            if not self._context.set_tensor_address(name, tensor.data_ptr()):
                raise TensorRTError(f"{where}: set_tensor_address({name}) refused")

    def _covers(self, batch: int) -> bool:
        lo, hi = 1, self.batch
        try:
            profile = self._engine.get_tensor_profile_shape(next(iter(self.input_specs)), 0)
            lo, hi = int(profile[0][0]), int(profile[2][0])
        except Exception:  # older bindings: trust the manifest check done at activation
            return True
        return lo <= batch <= hi

    def _infer_impl(
        self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> None:
        where = f"tensorrt backend, graph {self.graph}"
        context = self._context
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise TensorRTError(f"{where}: set_input_shape({name}) refused")
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise TensorRTError(f"{where}: set_tensor_address({name}) refused")
        for name, tensor in outputs.items():
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise TensorRTError(f"{where}: set_tensor_address({name}) refused")
        if not context.execute_async_v3(self.stream_handle(self.device)):
            raise TensorRTError(f"{where}: execute_async_v3 failed: {self._logger.tail()}")

    def _deactivate_impl(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None
        self.engine_folder = None


__all__ = ["TensorRTBackend", "TensorRTError"]
