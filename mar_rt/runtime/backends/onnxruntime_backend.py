"""The ONNX Runtime backend: one exported graph in an ``onnxruntime.InferenceSession``.

Providers: CPU here; CUDA (and optionally TensorRT) where onnxruntime-gpu is installed.
Inputs and outputs go through IO binding on the caller's torch tensors — host pointers on
CPU, device pointers on CUDA — so nothing is copied: ORT writes straight into the backend's
output buffers (``Backend`` base: ``infer`` returns views of them).

Loading (``_activate_impl``):

1. the ONNX file (fp32, or its fp16 variant for ``precision="fp16"``) is read once and its
   sha256 checked against ``onnx/manifest.json`` — the session is created from those bytes;
2. if an ONNX Runtime engine set (``engines/<key>/``, built by ``mar-rt build-engines
   --backend onnxruntime``) fits this machine, ORT version, provider, precision and ONNX
   file, its optimised model is loaded instead (sha256-checked, optimisations off);
   a set that does not fit is not used, and the log says what differs;
   ``onnx/`` and ``engines/`` are read from the bundle's folder in the per-user cache, else
   from the bundle folder (``mar_rt.export.build.find_artifacts``);
3. session options: graph optimisation level ``all``, intra-op threads = physical cores,
   no spinning (the pipeline interleaves torch work with ORT calls).

On CUDA the session runs on the torch stream that is current at activation (ORT's
``user_compute_stream``); ``infer`` from another stream first waits for that stream's work.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mar_rt.errors import BackendUnavailableError, EngineMismatchError
from mar_rt.export.build import ENGINES_DIR, find_artifacts
from mar_rt.export.cache import find_engine_set, read_verified
from mar_rt.export.graphs import GraphSpec
from mar_rt.export.onnx_export import ONNX_DIR, OnnxEntry, onnx_entry, read_onnx_manifest
from mar_rt.export.ort import (
    create_session,
    import_onnxruntime,
    ort_device_identity,
    ort_engine_key,
    ort_providers,
)
from mar_rt.runtime.backends.base import Backend

log = logging.getLogger(__name__)


def artifacts_root(bundle: Any, artifacts: str | Path | None, shared: dict[str, Any]) -> Path:
    """The folder holding ``onnx/`` and ``engines/`` for a bundle's graphs: ``artifacts`` when
    given, else ``find_artifacts`` (the bundle's cache folder, else the bundle folder); looked
    up once per graph set (kept in ``shared``)."""
    if "artifacts" not in shared:
        found = artifacts if artifacts is not None else find_artifacts(bundle.folder)
        shared["artifacts"] = Path(found) if found is not None else Path(bundle.folder)
    return shared["artifacts"]


def onnx_sha256_map(onnx_dir: Path, precision: str) -> dict[str, str]:
    """graph → sha256 of its ``precision`` ONNX file, from the manifest."""
    manifest = read_onnx_manifest(onnx_dir)
    section = manifest["graphs" if precision == "fp32" else "fp16"]
    return {g: e["sha256"] for g, e in section.items()}


class OnnxRuntimeBackend(Backend):
    """Runs one graph's ONNX file in ONNX Runtime (see the module docstring).

    Args:
        spec: the graph's IO.
        model: the manifest entry of the ONNX file to run.
        device: ``cpu`` or ``cuda[:i]``.
        precision: ``fp32`` or ``fp16`` (the fp16 ONNX variant; IO stays float32).
        engines_root: folder of engine sets to look for an optimised model in (None: none).
        threads: intra-op threads (default: physical cores).
        tensorrt_ep: put ORT's TensorRT execution provider first (CUDA only).
        max_batch: the batch the engine set must cover is checked per call shape; this is
            the batch it is looked up with.
        bundle_folder: the bundle, named in the build command a missing set's log gives.
    """

    name: ClassVar[str] = "onnxruntime"

    def __init__(
        self,
        spec: GraphSpec,
        model: OnnxEntry,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        engines_root: str | Path | None = None,
        threads: int | None = None,
        tensorrt_ep: bool = False,
        batch: int = 1,
        bundle_folder: str | Path | None = None,
    ) -> None:
        super().__init__(spec, device=device, precision=precision)
        if model.precision != precision:
            raise EngineMismatchError(
                f"onnxruntime backend, graph {spec.name}: got the {model.precision} ONNX for "
                f"precision {precision}"
            )
        if self.device.type not in ("cpu", "cuda"):
            raise BackendUnavailableError(
                f"onnxruntime backend, graph {spec.name}: device {self.device} is not cpu or cuda"
            )
        self.model = model
        self.engines_root = Path(engines_root) if engines_root is not None else None
        self.threads = threads
        self.providers = ort_providers(self.device.type, tensorrt_ep=tensorrt_ep)
        self.batch = int(batch)
        self.bundle_folder = Path(bundle_folder) if bundle_folder is not None else None
        self.engine_folder: Path | None = None
        self._session: Any = None
        self._binding: Any = None
        self._stream: int = 0

    @classmethod
    def from_bundle(
        cls,
        bundle: Any,
        graph: str,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        artifacts: str | Path | None = None,
        threads: int | None = None,
        tensorrt_ep: bool = False,
        batch: int = 1,
        shared: dict[str, Any] | None = None,
        **options: Any,
    ) -> OnnxRuntimeBackend:
        """The backend of ``graph`` of a loaded bundle; ONNX files and engine sets are read
        from ``artifacts``: ``onnx/`` and ``engines/`` (default: ``find_artifacts``, the
        bundle's cache folder, else the bundle folder)."""
        from mar_rt.export.graphs import bundle_graph_specs

        if options:
            log.debug("onnxruntime backend ignores options %s", sorted(options))
        cache = {} if shared is None else shared
        root = artifacts_root(bundle, artifacts, cache)
        if "graph_specs" not in cache:  # one bundle read per GraphSet
            cache["graph_specs"] = bundle_graph_specs(bundle)
        spec = cache["graph_specs"][graph]
        entry = onnx_entry(root / ONNX_DIR, graph, precision)
        return cls(
            spec,
            entry,
            device=device,
            precision=precision,
            engines_root=root / ENGINES_DIR,
            threads=threads,
            tensorrt_ep=tensorrt_ep,
            batch=batch,
            bundle_folder=bundle.folder,
        )

    # ---------------------------------------------------------------- lifecycle
    def _engine_model(self) -> tuple[bytes, Path, Any] | None:
        """(optimised model bytes, its path, the set) from a fitting engine set, or None."""
        if self.engines_root is None or not self.engines_root.is_dir():
            return None
        ort = import_onnxruntime()
        index = self.device.index or 0
        onnx_dir = self.model.path.parent
        wanted = ort_engine_key(
            ort_version=ort.__version__,
            provider=self.providers[0],
            device_identity=ort_device_identity(self.providers[0], index),
            precision=self.precision,
            onnx_sha256=onnx_sha256_map(onnx_dir, self.precision),
            batch=(1, self.batch, self.batch),
        )
        try:
            found = find_engine_set(
                self.engines_root, wanted, batch=self.batch, bundle=self.bundle_folder
            )
        except EngineMismatchError as exc:
            log.info(
                "graph %s: no ONNX Runtime engine set fits, optimising at load: %s", self.graph, exc
            )
            return None
        path = found.engine_path(self.graph)
        return found.read_engine(self.graph), path, found

    def _activate_impl(self) -> None:
        where = f"onnxruntime backend, graph {self.graph}"
        if self.device.type == "cuda":
            self._stream = self.stream_handle(self.device)
        cached = self._engine_model() if self.model.data_path is None else None
        trt_cache = None
        if cached is not None:
            model, path, found = cached
            self.engine_folder = found.folder
            trt_cache = (
                found.folder / "trt_ep" if "TensorrtExecutionProvider" in self.providers else None
            )
            optimize = False
            log.info("%s: optimised model %s", where, path)
        else:
            optimize = True
            if self.model.data_path is None:
                model = read_verified(
                    self.model.path, self.model.sha256, what=f"ONNX of {self.graph}"
                )
            else:  # external data: check both files, then let ORT read them by path
                read_verified(self.model.path, self.model.sha256, what=f"ONNX of {self.graph}")
                read_verified(
                    self.model.data_path,
                    self.model.data_sha256 or "",
                    what=f"ONNX data of {self.graph}",
                )
                model = str(self.model.path)
        self._session = create_session(
            model,
            self.providers,
            precision=self.precision,
            threads=self.threads,
            optimize=optimize,
            trt_cache_dir=trt_cache,
            cuda_stream=self._stream or None,
            device_index=self.device.index or 0,
        )
        names_in = [i.name for i in self._session.get_inputs()]
        names_out = [o.name for o in self._session.get_outputs()]
        if names_in != list(self.input_specs) or sorted(names_out) != sorted(self.output_specs):
            raise EngineMismatchError(
                f"{where}: session IO {names_in} → {names_out} differs from the graph's "
                f"{list(self.input_specs)} → {list(self.output_specs)}"
            )
        self._binding = self._session.io_binding()

    def _infer_impl(
        self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> None:
        binding = self._binding
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        index = self.device.index or 0
        if kind == "cuda" and self.stream_handle(self.device) != self._stream:
            torch.cuda.current_stream(self.device).synchronize()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, tensor in inputs.items():
            binding.bind_input(
                name, kind, index, np.float32, tuple(tensor.shape), tensor.data_ptr()
            )
        for name, tensor in outputs.items():
            binding.bind_output(
                name, kind, index, np.float32, tuple(tensor.shape), tensor.data_ptr()
            )
        self._session.run_with_iobinding(binding)

    def _deactivate_impl(self) -> None:
        self._binding = None
        self._session = None
        self.engine_folder = None


__all__ = ["OnnxRuntimeBackend", "artifacts_root", "onnx_sha256_map"]
