"""The torch backend: a bundle network run eagerly (optionally ``torch.compile``d), the
reference the ONNX Runtime and TensorRT backends are checked against (DESIGN §10)."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from mar_rt.errors import BackendUnavailableError
from mar_rt.export.graphs import GraphSpec, bundle_graph_module, bundle_graph_specs
from mar_rt.runtime.backends.base import Backend

log = logging.getLogger(__name__)


class TorchBackend(Backend):
    """Runs one graph's ``nn.Module`` under ``torch.inference_mode``.

    Args:
        spec: the graph's IO.
        module: the graph module (inputs in spec order → outputs in spec order).
        device: CPU or CUDA.
        precision: ``fp32``; ``fp16`` runs under CUDA autocast (CPU refuses it).
        compile: wrap the module in ``torch.compile`` at activation.

    Activation moves the module to ``device`` in place (``nn.Module.to``) and sets eval mode,
    so graphs of one network (``_cond`` and ``_step``) share its weights. Outputs are copied
    into the base class's per-shape buffers.
    """

    name: ClassVar[str] = "torch"

    def __init__(
        self,
        spec: GraphSpec,
        module: nn.Module,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        compile: bool = False,
    ) -> None:
        super().__init__(spec, device=device, precision=precision)
        if precision == "fp16" and self.device.type != "cuda":
            raise BackendUnavailableError(
                f"torch backend, graph {spec.name}: fp16 needs a CUDA device, got {self.device}"
            )
        self._source = module
        self._compile = compile
        self._module: nn.Module | Any | None = None

    @classmethod
    def from_bundle(
        cls,
        bundle: Any,
        graph: str,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        compile: bool = False,
        shared: dict[str, Any] | None = None,
        **options: Any,
    ) -> TorchBackend:
        """The graph's module built from ``bundle``; ``shared`` (from ``GraphSet``) lets the
        ``_cond`` and ``_step`` graphs of one network share its module."""
        if options:
            log.debug("torch backend ignores options %s", sorted(options))
        spec = bundle_graph_specs(bundle)[graph]
        return cls(
            spec,
            bundle_graph_module(bundle, graph, shared=shared),
            device=device,
            precision=precision,
            compile=compile,
        )

    def _activate_impl(self) -> None:
        module = self._source.to(self.device).eval()
        module.requires_grad_(False)
        self._module = torch.compile(module) if self._compile else module

    def _infer_impl(
        self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> None:
        assert self._module is not None
        args = [inputs[name] for name in self.input_specs]
        with torch.inference_mode():
            with self._autocast():
                result = self._module(*args)
            if isinstance(result, torch.Tensor):
                result = (result,)
            for buf, value in zip(outputs.values(), result, strict=True):
                buf.copy_(value)

    def _deactivate_impl(self) -> None:
        self._module = None

    def _autocast(self) -> Any:
        if self.precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast(self.device.type, enabled=False)
