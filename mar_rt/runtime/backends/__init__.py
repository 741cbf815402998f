"""Inference backends: one ``Backend`` per graph, a ``GraphSet`` per bundle, and the registry
that maps a backend name to its class without importing heavy libraries up front.

Backend names: ``torch`` (always), ``onnxruntime`` and ``tensorrt`` (added in
``onnxruntime_backend.py`` / ``tensorrt_backend.py``; their modules import their libraries
lazily). ``resolve_backend`` turns a request such as ``auto`` or ``tensorrt`` into a runnable
(backend, device) pair with the fallback chain tensorrt → onnxruntime → torch (DESIGN §12).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mar_rt.errors import BackendUnavailableError
from mar_rt.export.graphs import bundle_graph_names
from mar_rt.runtime.backends.base import (
    PRECISIONS,
    Backend,
    BackendStateError,
    FeedError,
)

log = logging.getLogger(__name__)

BACKEND_CLASSES: Mapping[str, str] = {
    "torch": "mar_rt.runtime.backends.torch_backend:TorchBackend",
    "onnxruntime": "mar_rt.runtime.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "tensorrt": "mar_rt.runtime.backends.tensorrt_backend:TensorRTBackend",
}
"""Backend name → ``module:Class`` (imported on first use)."""


def backend_class(name: str) -> type[Backend]:
    """The ``Backend`` subclass for ``name``; BackendUnavailableError if unknown or missing."""
    if name not in BACKEND_CLASSES:
        raise BackendUnavailableError(
            f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CLASSES)}"
        )
    module_name, cls_name = BACKEND_CLASSES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {name!r} is not available: {exc}") from exc
    return getattr(module, cls_name)


class GraphSet(Mapping[str, Backend]):
    """The graphs of one bundle on one backend, device and precision (a read-only mapping
    graph name → ``Backend``), activated and deactivated together; also a context manager.

    Build it with :meth:`from_bundle`; ``with_precision`` makes a sibling set (the fp16
    overflow fallback of the pipeline).
    """

    def __init__(
        self,
        backends: Mapping[str, Backend],
        *,
        backend: str,
        device: str | torch.device,
        precision: str = "fp32",
        bundle: Any = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self._backends = dict(backends)
        self.backend = backend
        self.device = torch.device(device)
        self.precision = precision
        self._bundle = bundle
        self._options = dict(options or {})
        self._active = False

    @classmethod
    def from_bundle(
        cls,
        bundle: Any,
        backend: str = "torch",
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        graphs: tuple[str, ...] | None = None,
        **options: Any,
    ) -> GraphSet:
        """Build (not activate) the graphs of ``bundle`` (default: every graph whose network
        it holds) with backend ``backend``.

        Each backend's ``from_bundle(bundle, graph, device=, precision=, shared=, **options)``
        receives the same ``shared`` dict, where backends of one set may share loaded state
        (the torch backend shares a network's module between its two graphs).
        """
        if precision not in PRECISIONS:
            raise BackendUnavailableError(
                f"precision must be one of {PRECISIONS}, got {precision!r}"
            )
        klass = backend_class(backend)
        names = bundle_graph_names(bundle) if graphs is None else graphs
        shared: dict[str, Any] = {}
        built = {
            g: klass.from_bundle(
                bundle, g, device=device, precision=precision, shared=shared, **options
            )
            for g in names
        }
        return cls(
            built,
            backend=backend,
            device=device,
            precision=precision,
            bundle=bundle,
            options=options,
        )

    def with_precision(self, precision: str) -> GraphSet:
        """A new (inactive) set of the same graphs, backend and device at ``precision``."""
        if self._bundle is None:
            raise BackendUnavailableError(
                f"graph set ({self.backend}) was not built from a bundle; cannot rebuild it at "
                f"{precision}"
            )
        return GraphSet.from_bundle(
            self._bundle,
            self.backend,
            device=self.device,
            precision=precision,
            graphs=tuple(self._backends),
            **self._options,
        )

    # Mapping
    def __getitem__(self, name: str) -> Backend:
        try:
            return self._backends[name]
        except KeyError:
            raise BackendUnavailableError(
                f"graph {name!r} is not in this {self.backend} graph set "
                f"(has {sorted(self._backends)})"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._backends)

    def __len__(self) -> int:
        return len(self._backends)

    # lifecycle
    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> GraphSet:
        """Activate every graph (rolls back the ones activated if one fails)."""
        done = []
        try:
            for b in self._backends.values():
                b.activate()
                done.append(b)
        except BaseException:
            for b in done:
                b.deactivate()
            raise
        self._active = True
        return self

    def deactivate(self) -> None:
        for b in self._backends.values():
            b.deactivate()
        self._active = False

    def __enter__(self) -> GraphSet:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()


@dataclass(frozen=True)
class BackendChoice:
    """What ``resolve_backend`` picked: the backend class name, device and the reason."""

    backend: str
    device: str
    reason: str


def resolve_backend(
    requested: str = "auto",
    *,
    device: str | None = None,
    bundle: str | Path | None = None,
    onnx_available: bool | None = None,
) -> BackendChoice:
    """Map ``auto`` / ``tensorrt`` / ``onnxruntime`` / ``torch`` (or the ``-cpu`` / ``-cuda``
    names of ``mar_rt.runtime.environment``) to a runnable backend and device.

    ``onnx_available`` says whether the bundle has an ONNX export (tensorrt and onnxruntime
    need one); by default it is looked up for ``bundle`` where the backends will read it (the
    per-user cache that ``mar-rt build-engines`` writes, else the bundle folder:
    ``mar_rt.export.build.find_artifacts``), and assumed without a ``bundle``.

    Candidates are tried along ``environment.FALLBACKS[requested]`` (tensorrt → onnxruntime →
    torch); ``device`` (``cpu`` / ``cuda``), when given, rules out candidates on the other
    device, and a backend whose module is not in this installation is skipped. The reason
    says why each earlier candidate was passed over.
    """
    from mar_rt.runtime.environment import (
        FALLBACKS,
        backend_and_device,
        pick_backend,
        probe_environment,
    )

    if requested not in FALLBACKS:
        raise BackendUnavailableError(
            f"unknown backend {requested!r}; choose one of {', '.join(FALLBACKS)}"
        )
    if onnx_available is None:
        from mar_rt.export.build import find_artifacts

        onnx_available = bundle is None or find_artifacts(bundle) is not None
    env = probe_environment()
    want = None if device is None else torch.device(device).type
    skipped: list[str] = []
    for candidate in FALLBACKS[requested]:
        base, dev = backend_and_device(candidate)
        if want is not None and dev != want:
            skipped.append(f"{candidate}: not on the requested device {want}")
            continue
        try:
            name, reason = pick_backend(env, candidate, onnx_available=onnx_available)
        except BackendUnavailableError as exc:
            skipped.append(f"{candidate}: {exc}")
            continue
        if name != candidate:  # pick_backend fell back: keep only why the candidate failed
            skipped.append(reason.split(";")[0].split(" → ")[0])
            continue
        try:
            backend_class(base)
        except BackendUnavailableError as exc:
            skipped.append(f"{candidate}: {exc}")
            continue
        where = reason.rsplit(" (", 1)[0]  # "<name> on <device>" without pick_backend's tag
        if not skipped:
            tag = "best available" if requested == "auto" else "requested"
            picked = f"{where} ({tag})"
        else:
            picked = "; ".join(skipped) + f" → falling back to {where}"
        return BackendChoice(base, str(torch.device(device)) if device else dev, picked)
    raise BackendUnavailableError(
        f"no backend can run for request {requested!r}: " + "; ".join(skipped)
    )


__all__ = [
    "BACKEND_CLASSES",
    "Backend",
    "BackendChoice",
    "BackendStateError",
    "FeedError",
    "GraphSet",
    "backend_class",
    "resolve_backend",
]
