"""Verification of exported graphs: ONNX Runtime (CPU) against the torch module, per graph.

Every export is checked on two kinds of feed (DESIGN §10):

- ``random``: independent random tensors at batch 2 (images uniform in [0, 1], embeddings
  normal, t uniform in [1, T]) — this also proves the batch axis is really dynamic;
- ``real``: batch 1, values a deployed graph sees, chained through the torch networks: a real
  CT slice (network scale, DESIGN §3) and its sinogram feed the CLIP graphs; their embeddings
  feed the ``_cond`` graphs; each domain's image (its high-pass part for the residual domain)
  plus noise, t = T/2 and the torch ``cond`` feed the ``_step`` graphs.

The report keeps max |ONNX − torch| per output and feed; a graph passes when every error is at
most ``atol`` (1e-4 for fp32).  ``max_ref`` (max |torch|) is kept so relative errors can be read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mar_rt.errors import MarRtError

__all__ = [
    "FP32_ATOL",
    "OutputError",
    "VerifyCase",
    "VerifyReport",
    "demo_real_slice",
    "ort_cpu_session",
    "random_feed",
    "real_feeds",
    "verify_graph",
]

FP32_ATOL = 1e-4
_T_REAL = 50.0  # network time of the real feed (mid-trajectory for T = 100)
_NOISE_REAL = 50.0 / 255.0  # λ of the default SDE (max_sigma 50)


class VerificationError(MarRtError):
    """An exported graph does not match its torch module within the tolerance."""


@dataclass(frozen=True)
class OutputError:
    """max |ONNX − torch| of one output (``max_ref`` = max |torch|)."""

    output: str
    max_abs_err: float
    max_ref: float


@dataclass(frozen=True)
class VerifyCase:
    """One feed (``random`` or ``real``) at one batch size and its per-output errors."""

    label: str
    batch: int
    errors: tuple[OutputError, ...]

    @property
    def max_abs_err(self) -> float:
        return max(e.max_abs_err for e in self.errors)


@dataclass(frozen=True)
class VerifyReport:
    """Verification of one graph's ONNX file against its torch module."""

    graph: str
    onnx: str
    atol: float
    cases: tuple[VerifyCase, ...] = field(default_factory=tuple)

    @property
    def max_abs_err(self) -> float:
        return max((c.max_abs_err for c in self.cases), default=float("nan"))

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(
            np.isfinite(e.max_abs_err) and e.max_abs_err <= self.atol
            for c in self.cases
            for e in c.errors
        )

    def summary(self) -> str:
        parts = ", ".join(f"{c.label} B={c.batch}: {c.max_abs_err:.2e}" for c in self.cases)
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.graph}: max|Δ| {parts} (≤ {self.atol:g}: {verdict})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "atol": self.atol,
            "passed": self.passed,
            "max_abs_err": self.max_abs_err,
            "cases": [
                {
                    "label": c.label,
                    "batch": c.batch,
                    "errors": {
                        e.output: {"max_abs_err": e.max_abs_err, "max_ref": e.max_ref}
                        for e in c.errors
                    },
                }
                for c in self.cases
            ],
        }


# --------------------------------------------------------------------------- sessions
def ort_cpu_session(model: str | Path | bytes, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session (all graph optimisations) for ``model`` (path or bytes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- feeds
def _spec_shape(spec: Any, batch: int) -> tuple[int, ...]:
    return tuple(batch if isinstance(d, str) else int(d) for d in spec.shape)


def random_feed(
    spec: Any, batch: int, *, seed: int, t_max: float = 100.0
) -> dict[str, torch.Tensor]:
    """Independent random inputs for a ``GraphSpec`` at ``batch`` (distinct tensors per name).

    Names: ``image``, ``x_t``, ``mu`` → U(0, 1); ``t`` → U(1, t_max); embeddings and ``cond``
    → N(0, 1).
    """
    gen = torch.Generator().manual_seed(seed)
    feed = {}
    for name, tspec in spec.inputs.items():
        shape = _spec_shape(tspec, batch)
        if name in ("image", "x_t", "mu"):
            value = torch.rand(shape, generator=gen)
        elif name == "t":
            value = 1.0 + (t_max - 1.0) * torch.rand(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen)
        feed[name] = value.to(tspec.dtype)
    return feed


def demo_real_slice(geometry: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped real CT slice on ``geometry``'s grid and its sinogram, at network scale.

    Returns (image01 (1,1,H,W) = clip(μ,0,0.5)/0.5, sino01 (1,1,V,D) = clip(p,0,4)/4), with p the
    Joseph forward projection of μ in ``geometry`` (``mar_rt.ct``).
    """
    from mar_rt.ct import units
    from mar_rt.ct.projector import forward_project

    path = Path(__file__).resolve().parents[1] / "assets" / "demo_slice.npz"
    if not path.is_file():
        raise MarRtError(f"the demo slice {path} is missing; pass real inputs explicitly")
    with np.load(path) as data:
        mu = torch.from_numpy(data["mu"].astype(np.float32))[None, None]
    if tuple(mu.shape[-2:]) != tuple(geometry.image_shape):
        mu = F.interpolate(mu, size=geometry.image_shape, mode="bilinear", antialias=True)
    mu = mu.clamp_min(0.0)
    with torch.no_grad():
        sino = forward_project(mu[0, 0], geometry)
    return units.image_to_net(mu), units.sino_to_net(sino)[None, None]


def _high_pass(image01: torch.Tensor) -> torch.Tensor:
    return image01 - F.avg_pool2d(image01, 5, stride=1, padding=2, count_include_pad=False)


def real_feeds(
    specs: Mapping[str, Any],
    modules: Callable[[str], torch.nn.Module],
    image01: torch.Tensor,
    sino01: torch.Tensor,
    *,
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """Batch-1 feeds for every graph in ``specs`` built from one real slice (see module doc).

    ``modules(graph)`` returns the torch module of a graph (eval mode); CLIP and ``_cond``
    outputs computed here become the inputs of the graphs downstream.
    """
    gen = torch.Generator().manual_seed(seed)
    domain_image = {"image": image01, "sinogram": sino01, "residual": 0.2 * _high_pass(image01)}
    clip_of = {"image": "image", "sinogram": "sinogram", "residual": "image"}
    feeds: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.inference_mode():
        for domain in ("image", "sinogram"):
            graph = f"clip_{domain}"
            if graph in specs:
                feeds[graph] = {"image": domain_image[domain].clone()}
                content, artifact = modules(graph)(domain_image[domain])
                embeddings[domain] = (content.clone(), artifact.clone())
        for domain in ("image", "sinogram", "residual"):
            cond_graph, step_graph = f"unet_{domain}_cond", f"unet_{domain}_step"
            if cond_graph not in specs and step_graph not in specs:
                continue
            spec = specs.get(cond_graph) or specs[step_graph]
            if clip_of[domain] in embeddings:
                content, artifact = embeddings[clip_of[domain]]
            else:
                width = _spec_shape(specs[cond_graph].inputs["content_emb"], 1)
                content = torch.randn(width, generator=gen)
                artifact = torch.randn(width, generator=gen)
            cond = None
            if cond_graph in specs:
                feeds[cond_graph] = {"content_emb": content, "artifact_emb": artifact}
                cond = modules(cond_graph)(content, artifact).clone()
            if step_graph in specs:
                spec = specs[step_graph]
                mu = domain_image[domain]
                if cond is None:
                    cond = torch.randn(_spec_shape(spec.inputs["cond"], 1), generator=gen)
                noise = torch.randn(mu.shape, generator=gen)
                feeds[step_graph] = {
                    "x_t": (mu + _NOISE_REAL * noise).contiguous(),
                    "mu": mu.clone(),
                    "t": torch.full((1,), _T_REAL),
                    "cond": cond,
                }
    return feeds


# --------------------------------------------------------------------------- verification
def _run_torch(
    module: torch.nn.Module, spec: Any, feed: Mapping[str, torch.Tensor]
) -> list[np.ndarray]:
    with torch.inference_mode():
        out = module(*[feed[name] for name in spec.inputs])
    if isinstance(out, torch.Tensor):
        out = (out,)
    return [o.float().numpy() for o in out]


def verify_graph(
    module: torch.nn.Module,
    spec: Any,
    session: Any,
    feeds: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    onnx_name: str = "",
    atol: float = FP32_ATOL,
) -> VerifyReport:
    """Compare ``session`` (ONNX Runtime) with ``module`` on each labelled feed.

    Args:
        module: the graph's torch module (eval mode, CPU).
        spec: the graph's ``GraphSpec`` (input order and output names).
        session: an ``onnxruntime.InferenceSession`` of the exported file.
        feeds: label → feed (input name → CPU float32 tensor).
        atol: the pass bound on max |ONNX − torch|.
    """
    got_inputs = [i.name for i in session.get_inputs()]
    got_outputs = [o.name for o in session.get_outputs()]
    if got_inputs != list(spec.inputs) or got_outputs != list(spec.outputs):
        raise VerificationError(
            f"graph {spec.name}: ONNX IO {got_inputs} → {got_outputs} differs from the fixed "
            f"IO {list(spec.inputs)} → {list(spec.outputs)}"
        )
    cases = []
    for label, feed in feeds.items():
        expected = _run_torch(module, spec, feed)
        got = session.run(None, {k: v.numpy() for k, v in feed.items()})
        errors = []
        for name, ref, out in zip(spec.outputs, expected, got, strict=True):
            if ref.shape != out.shape:
                raise VerificationError(
                    f"graph {spec.name}: output {name} has shape {out.shape} in ONNX, "
                    f"{ref.shape} in torch"
                )
            diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
            err = float(diff.max()) if np.all(np.isfinite(out)) else float("inf")
            errors.append(OutputError(name, err, float(np.abs(ref).max())))
        batch = int(next(iter(feed.values())).shape[0])
        cases.append(VerifyCase(label, batch, tuple(errors)))
    return VerifyReport(spec.name, onnx_name, atol, tuple(cases))
