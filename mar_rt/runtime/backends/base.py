"""The backend base class: one graph of a bundle, run by torch, ONNX Runtime or TensorRT.

Lifecycle (Polygraphy-style, DESIGN.md §10–11, STYLE points 5 and 10)::

    backend = SomeBackend.from_bundle(bundle, "unet_image_step", device="cuda")
    with backend:                      # activate(): load module / session / engine
        out = backend.infer(feed)      # checks state and feed, then _infer_impl
    # deactivate(): release it

Subclasses implement only ``_activate_impl``, ``_infer_impl`` and ``_deactivate_impl`` (and
optionally ``_prepare_shape_impl``, called once per new input-shape key, where a TensorRT
backend sets input shapes and tensor addresses or an ONNX Runtime backend binds IO).

Buffers and aliasing: output buffers are allocated once per input-shape key (torch tensors on
the backend's device, so CuPy / TensorRT / ORT can take their ``data_ptr()``). **``infer``
returns views of these internal buffers**: they are overwritten by the next ``infer`` call
with the same shapes. Pass ``copy_outputs=True`` (or clone) to keep them.

Streams: on CUDA every backend runs on the *current* torch CUDA stream at the time of the
call (``stream_handle()`` gives its raw ``cudaStream_t`` for TensorRT's ``execute_async_v3``
or ORT's IO binding), so the caller picks the stream with ``torch.cuda.stream(s)``.

IO dtypes: every graph's inputs and outputs are float32 (an fp16 engine keeps fp32 IO);
``precision`` only says how the backend computes inside.
"""

from __future__ import annotations

import abc
import logging
from collections import OrderedDict
from collections.abc import Mapping
from types import TracebackType
from typing import Any, ClassVar

import torch

from mar_rt.errors import MarRtError
from mar_rt.export.graphs import GraphSpec, TensorSpec

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
_MAX_SHAPE_KEYS = 4  # buffer sets kept per backend (LRU)


class BackendStateError(MarRtError):
    """A backend was used in the wrong state (``infer`` before ``activate`` ...)."""


class FeedError(MarRtError, ValueError):
    """A feed does not match the graph's inputs (names, shapes, dtypes or device)."""


ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]


class Backend(abc.ABC):
    """Runs one graph (fixed IO names, ``mar_rt.export.graphs``) on one device.

    Args:
        spec: the graph's name and IO specs.
        device: torch device the feed and outputs live on.
        precision: ``"fp32"`` or ``"fp16"`` (internal compute; IO stays float32).
    """

    name: ClassVar[str] = "base"

    def __init__(
        self, spec: GraphSpec, *, device: str | torch.device = "cpu", precision: str = "fp32"
    ) -> None:
        if precision not in PRECISIONS:
            raise MarRtError(
                f"graph {spec.name}: precision must be one of {PRECISIONS}, got {precision!r}"
            )
        self.spec = spec
        self.device = torch.device(device)
        self.precision = precision
        self._active = False
        self._buffers: OrderedDict[ShapeKey, dict[str, torch.Tensor]] = OrderedDict()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_bundle(
        cls,
        bundle: Any,
        graph: str,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        **options: Any,
    ) -> Backend:
        """Build the backend for ``graph`` of a loaded ``mar_rt.models.bundle.Bundle``.

        Every backend overrides this. ``GraphSet.from_bundle`` passes ``shared=`` (one dict per
        graph set, for state the graphs of one set may share, such as a network's module or an
        ONNX Runtime environment) plus the caller's backend options; ignore what you do not use.
        """
        raise NotImplementedError(f"{cls.__name__}.from_bundle")

    # ---------------------------------------------------------------- public API
    @property
    def graph(self) -> str:
        """The graph name, e.g. ``unet_image_step``."""
        return self.spec.name

    @property
    def input_specs(self) -> Mapping[str, TensorSpec]:
        """Input name → (shape, dtype); str dims (``"B"``) are free, int dims fixed."""
        return self.spec.inputs

    @property
    def output_specs(self) -> Mapping[str, TensorSpec]:
        """Output name → (shape, dtype), dims as in ``input_specs``."""
        return self.spec.outputs

    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> Backend:
        """Load the module / session / engine. Refuses a second activation."""
        if self._active:
            raise BackendStateError(f"{self.name} backend for graph {self.graph}: already active")
        self._activate_impl()
        self._active = True
        return self

    def deactivate(self) -> None:
        """Release everything ``activate`` and ``infer`` allocated (no-op when inactive)."""
        if not self._active:
            return
        try:
            self._deactivate_impl()
        finally:
            self._buffers.clear()
            self._active = False

    def __enter__(self) -> Backend:
        return self.activate()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.deactivate()

    def infer(
        self, feed: Mapping[str, torch.Tensor], *, copy_outputs: bool = False
    ) -> dict[str, torch.Tensor]:
        """Run the graph once.

        Args:
            feed: input name → tensor, exactly the graph's inputs, float32 on ``self.device``.
            copy_outputs: return clones instead of views of the internal output buffers.

        Returns:
            output name → tensor. Without ``copy_outputs`` these alias internal buffers that
            the next call with the same shapes overwrites.

        Raises:
            BackendStateError: before ``activate``.
            FeedError: a missing / unexpected name, or a wrong dtype, rank, dim or device.
        """
        if not self._active:
            raise BackendStateError(
                f"{self.name} backend for graph {self.graph}: infer() called before activate()"
            )
        inputs, dims = self._check_feed(feed)
        outputs = self._output_buffers(inputs, dims)
        self._infer_impl(inputs, outputs)
        if copy_outputs:
            return {k: v.clone() for k, v in outputs.items()}
        return dict(outputs)

    @staticmethod
    def stream_handle(device: torch.device) -> int:
        """The raw handle of the current torch CUDA stream on ``device`` (0 on CPU)."""
        if device.type != "cuda":
            return 0
        return int(torch.cuda.current_stream(device).cuda_stream)

    # ---------------------------------------------------------------- for subclasses
    @abc.abstractmethod
    def _activate_impl(self) -> None:
        """Load the graph (module to device, ORT session, TensorRT engine + context)."""

    @abc.abstractmethod
    def _infer_impl(
        self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> None:
        """Compute the graph on checked, contiguous ``inputs``, writing into ``outputs``."""

    @abc.abstractmethod
    def _deactivate_impl(self) -> None:
        """Release what ``_activate_impl`` loaded."""

    def _prepare_shape_impl(
        self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> None:  # noqa: B027 - optional hook
        """Called once when a new input-shape key gets its buffers (bind / set shapes)."""
        return None

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """One output buffer (override for pinned / CuPy-owned memory)."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    # ---------------------------------------------------------------- checks
    def _check_feed(
        self, feed: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        where = f"{self.name} backend, graph {self.graph}"
        names = set(feed)
        expected = set(self.input_specs)
        if names != expected:
            missing = sorted(expected - names)
            unexpected = sorted(names - expected)
            raise FeedError(
                f"{where}: feed names do not match the graph inputs "
                f"(missing {missing}, unexpected {unexpected})"
            )
        dims: dict[str, int] = {}
        inputs: dict[str, torch.Tensor] = {}
        for name, spec in self.input_specs.items():
            tensor = feed[name]
            if not isinstance(tensor, torch.Tensor):
                raise FeedError(f"{where}: input {name!r} is {type(tensor).__name__}, not a tensor")
            if tensor.dtype != spec.dtype:
                raise FeedError(
                    f"{where}: input {name!r} has dtype {tensor.dtype}, expected {spec.dtype}"
                )
            if tensor.device != self.device and not (
                tensor.device.type == self.device.type == "cuda" and self.device.index is None
            ):
                raise FeedError(
                    f"{where}: input {name!r} is on {tensor.device}, expected {self.device}"
                )
            if tensor.ndim != len(spec.shape):
                raise FeedError(
                    f"{where}: input {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {spec.shape_str()}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, tensor.shape, strict=True)):
                if isinstance(want, str):
                    if dims.setdefault(want, int(got)) != got:
                        raise FeedError(
                            f"{where}: input {name!r} has {want} = {got} on axis {axis}, but "
                            f"another input set {want} = {dims[want]}"
                        )
                elif want != got:
                    raise FeedError(
                        f"{where}: input {name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {spec.shape_str()}"
                    )
            inputs[name] = tensor.contiguous()
        return inputs, dims

    def _output_buffers(
        self, inputs: dict[str, torch.Tensor], dims: dict[str, int]
    ) -> dict[str, torch.Tensor]:
        key: ShapeKey = tuple((n, tuple(t.shape)) for n, t in inputs.items())
        buffers = self._buffers.get(key)
        if buffers is not None:
            self._buffers.move_to_end(key)
            return buffers
        buffers = {
            name: self._allocate(spec.resolve(dims, self.graph, name), spec.dtype)
            for name, spec in self.output_specs.items()
        }
        self._prepare_shape_impl(inputs, buffers)
        self._buffers[key] = buffers
        if len(self._buffers) > _MAX_SHAPE_KEYS:
            self._buffers.popitem(last=False)
        log.debug("graph %s: new buffers for %s", self.graph, dict(key))
        return buffers

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return (
            f"{type(self).__name__}({self.graph!r}, device={self.device}, {self.precision}, "
            f"{state})"
        )
