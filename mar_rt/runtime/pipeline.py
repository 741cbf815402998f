"""The DuDoCROP pipeline (DESIGN.md §8): DAPG (two DuDoCLIP-guided IR-SDE loops) then OSRO.

Notation (DESIGN §8; network scales from ``mar_rt.ct.units``):

    X_ma, Y_ma   metal-affected image (μ, cm⁻¹, (B, H, W)) and sinogram ((B, V, D))
    M, Tr        metal mask and trace FP(M) > 0
    X_LI, Y_LI   LI pair: Y_LI = LI(Y_ma) across Tr, X_LI = FBP(Y_LI)
    c_•, a_•     DuDoCLIP content / artifact embeddings (CLIP sees X_ma and Y_ma)
    X_p, Y_p     DAPG priors: IR-SDE_img(μ = X_LI or X_ma), IR-SDE_sino(μ = Y_LI or Y_ma)
    x = clip(μ, 0, 0.5)/0.5,  y = clip(p, 0, 4)/4      what the networks see
    Y_f, X'_p    fidelity sinogram and its FBP (OSRO step 1, Eq. 13)
    X̃_p, R, R̂    Norm¹(X_p → X'_p), X̃_p − X'_p, residual IR-SDE output (steps 2–3)
    X̂_p, X_out   X'_p + R̂ (Eq. 16);  α·Norm²(X̂_p → X_p) + (1 − α)·X_p (steps 4–6)

Each step is a named method with its switch in :class:`PipelineConfig`. The recipe in
``__call__``:

    1. check_inputs                      (shapes, NaN/inf, size policy)
    2. segment metal if no mask          (μ > metal_threshold, small components dropped)
    3. prepare: Y_ma (measured or FP), Tr, Y_LI, X_LI
    4. per batch of metal slices:
       a. embed          CLIP(X_ma), CLIP(Y_ma)  or zeros without DuDoCLIP
       b. DAPG loops     image and sinogram IR-SDE (concurrent CUDA streams on GPU)
       c. OSRO           steps 1–6
    5. pass slices without metal through, reinsert metal if asked
    6. QA record         data consistency of output and LI outside the trace
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mar_rt.ct import units
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.mar import nmar_from_li, segment_metal
from mar_rt.ct.resample import resample_images
from mar_rt.errors import BadInputError, MarRtError
from mar_rt.export.graphs import clip_graph
from mar_rt.models.dudoclip import daclip_pixels
from mar_rt.models.sde import SDEConfig
from mar_rt.runtime import osro
from mar_rt.runtime.backends import GraphSet
from mar_rt.runtime.config import PipelineConfig, Route
from mar_rt.runtime.operators import Operators, select_operators
from mar_rt.runtime.qa import QARecord, slice_qa_record
from mar_rt.runtime.sampler import DomainSampler, ProgressFn, loop_generator

log = logging.getLogger(__name__)

STAGES = ("prepare", "clip", "image_sde", "sinogram_sde", "osro", "qa", "total")
"""Keys of ``PipelineOutput.timings`` (seconds)."""

_SLICE_SEED_STRIDE = 104_729


def slice_seed(seed: int, index: int) -> int:
    """The noise seed of the batch that starts at slice ``index`` of a call seeded ``seed``.

    Callers that split a stack into several calls pass ``slice_seed(seed, start)`` as each
    call's seed, so a slice's noise does not depend on how the stack was split (at equal
    ``batch_size``).
    """
    return int(seed) + _SLICE_SEED_STRIDE * int(index)


@dataclass(frozen=True, eq=False)
class PipelineOutput:
    """Result of one pipeline call.

    Attributes:
        output: corrected μ (cm⁻¹), same shape and size as the input image.
        intermediates: name → tensor on the bundle grid, one row per input slice (slices passed
            through hold the input): ``x_ma``, ``y_ma``, ``mask``, ``trace``, ``x_li``, ``y_li``,
            ``x_p``, ``y_p``, ``y_f``, ``x_p_prime``, ``x_p_tilde``, ``residual``,
            ``residual_hat``, ``x_hat_p``, ``x_out`` (before metal reinsertion).
            Empty when called with ``return_intermediates=False``.
        timings: seconds per stage (``STAGES``), summed over batches.
        seed: the seed used.
        steps: reverse-SDE steps per loop.
        qa: the QA record (one ``SliceQA`` per slice).
    """

    output: torch.Tensor
    intermediates: dict[str, torch.Tensor]
    timings: dict[str, float]
    seed: int
    steps: int
    qa: QARecord


@dataclass
class _Batch:
    """The tensors of one batch of metal slices (bundle grid, float32, one device)."""

    index: list[int]
    x_ma: torch.Tensor
    y_ma: torch.Tensor
    mask: torch.Tensor
    trace: torch.Tensor
    x_li: torch.Tensor
    y_li: torch.Tensor
    seed: int
    out: dict[str, torch.Tensor] = field(default_factory=dict)
    reruns: list[str] = field(default_factory=list)


class DuDoCROPPipeline:
    """DuDoCROP over one bundle's graphs on one backend and device.

    Args:
        graphs: the bundle's graphs, built for one backend (see ``GraphSet``); activated here.
        sde: the bundle's IR-SDE config.
        geometry: the bundle's fan-beam geometry (image grid = ``config.image_size``²).
        config: pipeline switches.
        bundle_name: the bundle's name (not a path), recorded in the QA record.
        bundle_sha256: the sha256 of the bundle's manifest, recorded with derived images.
        fp32_graphs: builds an fp32 ``GraphSet`` for the fp16 overflow rerun (defaults to
            ``graphs.with_precision("fp32")``).
        operators: the FP/FBP operators and fused SDE step (``mar_rt.runtime.operators``);
            default ``select_operators(geometry, graphs.device)``: the CUDA / host kernels
            when they work, else the torch reference ``mar_rt.ct.projector``.
    """

    def __init__(
        self,
        graphs: GraphSet,
        *,
        sde: SDEConfig,
        geometry: FanBeamGeometry,
        config: PipelineConfig,
        bundle_name: str = "",
        bundle_sha256: str = "",
        fp32_graphs: Callable[[], GraphSet] | None = None,
        operators: Operators | None = None,
    ) -> None:
        if geometry.image_shape != (config.image_size, config.image_size):
            raise MarRtError(
                f"bundle {bundle_name!r}: pipeline image_size {config.image_size} does not match "
                f"the geometry's image {geometry.image_shape}"
            )
        self.graphs = graphs
        self.sde = sde
        self.geometry = geometry
        self.config = config
        self.bundle_name = bundle_name
        self.bundle_sha256 = bundle_sha256
        self.device = graphs.device
        self._fp32_factory = fp32_graphs or (lambda: graphs.with_precision("fp32"))
        self._fp32: GraphSet | None = None
        self.operators = operators or select_operators(geometry, self.device)
        self.projector = self.operators.projector
        self._samplers: dict[tuple[int, str, int], DomainSampler] = {}
        self._route_pipes: dict[str, DuDoCROPPipeline] = {}
        if not graphs.is_active:
            graphs.activate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        *,
        backend: str = "torch",
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        config: PipelineConfig | None = None,
        operators: str = "auto",
        **backend_options: Any,
    ) -> DuDoCROPPipeline:
        """Load a bundle folder and build its graphs on ``backend`` (``torch``,
        ``onnxruntime``, ``tensorrt``) and ``device``. ``config`` overrides the bundle's
        ``"pipeline"`` section; ``operators`` is ``auto`` / ``kernels`` / ``ct``
        (``mar_rt.runtime.operators``)."""
        from mar_rt.runtime.bundle_access import open_bundle

        facts = open_bundle(path)
        graphs = GraphSet.from_bundle(
            facts.bundle, backend, device=device, precision=precision, **backend_options
        )
        return cls(
            graphs,
            sde=facts.sde,
            geometry=facts.geometry,
            config=config or facts.pipeline,
            bundle_name=facts.name,
            bundle_sha256=facts.sha256,
            operators=select_operators(facts.geometry, graphs.device, prefer=operators),
        )

    def with_config(self, config: PipelineConfig) -> DuDoCROPPipeline:
        """A pipeline with another config sharing this one's graphs and projector (ablations).

        Close only the original: closing either releases the shared graphs.
        """
        return DuDoCROPPipeline(
            self.graphs,
            sde=self.sde,
            geometry=self.geometry,
            config=config,
            bundle_name=self.bundle_name,
            bundle_sha256=self.bundle_sha256,
            fp32_graphs=self._fp32_factory,
            operators=self.operators,
        )

    def for_route(self, route: Route) -> DuDoCROPPipeline:
        """The pipeline that runs ``route``: this one, or (when the config overrides switches
        for that route, ``PipelineConfig.image_only``) a cached ``with_config`` sibling."""
        cfg = self.config.for_route(route)
        if cfg is self.config:
            return self
        if route not in self._route_pipes:
            self._route_pipes[route] = self.with_config(cfg)
        return self._route_pipes[route]

    def close(self) -> None:
        """Release every graph (and the fp32 fallback sets, if built)."""
        self.graphs.deactivate()
        for pipe in [self, *self._route_pipes.values()]:
            if pipe._fp32 is not None:
                pipe._fp32.deactivate()
                pipe._fp32 = None

    def __enter__(self) -> DuDoCROPPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ validation
    def check_inputs(
        self,
        image_mu: Any,
        sinogram: Any | None,
        mask: Any | None,
        steps: int,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, tuple[int, int] | None]:
        """Validate and move inputs to the bundle grid.

        Returns ``(x (B,H,W), sinogram (B,V,D) | None, mask (B,H,W) bool | None,
        resampled_from (H, W) | None)``. Raises BadInputError naming the argument.
        """
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise BadInputError(f"steps must be a positive integer, got {steps!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise BadInputError(f"seed must be a non-negative integer, got {seed!r}")
        x = _as_batch(image_mu, "image_mu", self.device)
        grid = self.geometry.image_shape
        src = (int(x.shape[-2]), int(x.shape[-1]))
        resampled_from = None
        if src != grid:
            if self.config.on_size_mismatch == "refuse":
                raise BadInputError(
                    f"image_mu has size {src[0]}×{src[1]}; this bundle supports "
                    f"{grid[0]}×{grid[1]} "
                    "(set on_size_mismatch='resample' to resample it)"
                )
            log.warning("image_mu: resampling %d×%d → %d×%d (same field of view)", *src, *grid)
            x = resample_images(x, grid)
            resampled_from = src
        y = None
        if sinogram is not None:
            y = _as_batch(sinogram, "sinogram", self.device)
            if tuple(y.shape[-2:]) != self.geometry.sino_shape:
                raise BadInputError(
                    f"sinogram has shape {tuple(y.shape[-2:])} per slice; the bundle geometry "
                    f"needs {self.geometry.n_views} views × {self.geometry.n_det} detector bins"
                )
            if y.shape[0] != x.shape[0]:
                raise BadInputError(
                    f"sinogram has {y.shape[0]} slices but image_mu has {x.shape[0]}"
                )
        m = None
        if mask is not None:
            m = _as_batch(mask, "mask", self.device, floating=False)
            if tuple(m.shape) != (x.shape[0], *src):
                raise BadInputError(
                    f"mask has shape {tuple(m.shape)}, expected {(x.shape[0], *src)} like image_mu"
                )
            m = m if m.dtype == torch.bool else m > 0.5
            if resampled_from is not None:
                m = resample_images(m.to(torch.float32), grid) >= 0.5
        return x, y, m, resampled_from

    # ------------------------------------------------------------------ the recipe
    @torch.no_grad()  # not inference_mode: callers may modify the returned tensors in place
    def __call__(
        self,
        image_mu: Any,
        *,
        sinogram: Any | None = None,
        sinogram_is_measured: bool = False,
        mask: Any | None = None,
        steps: int | None = None,
        seed: int = 0,
        progress: ProgressFn | None = None,
        return_intermediates: bool = True,
    ) -> PipelineOutput:
        """Correct one slice (H, W) or a stack (B, H, W) of μ images (cm⁻¹).

        Args:
            image_mu: metal-affected image(s) X_ma.
            sinogram: the raw sinogram(s) Y_ma (B, V, D), if the scanner gives it; otherwise
                Y_ma = FP(X_ma) and the QA record marks it synthetic.
            sinogram_is_measured: True when ``sinogram`` came from the scanner; False records
                it as synthetic (simulated or reprojected) in the QA record. The route follows:
                ``"sinogram"`` when measured, else ``"image_only"``, which runs the config's
                image-only overrides (``PipelineConfig.for_route``) when it has any.
            mask: metal mask like ``image_mu``; segmented (μ > ``metal_threshold``) if None.
            steps: reverse-SDE steps (default ``config.steps``).
            seed: seeds every noise generator; same seed, inputs and device → same output.
            progress: ``progress(stage, i, n)`` after each SDE step and each other stage.
            return_intermediates: keep the per-stage tensors in the output.
        """
        route: Route = "sinogram" if sinogram is not None and sinogram_is_measured else "image_only"
        runner = self.for_route(route)
        if runner is not self:
            return runner(
                image_mu,
                sinogram=sinogram,
                sinogram_is_measured=sinogram_is_measured,
                mask=mask,
                steps=steps,
                seed=seed,
                progress=progress,
                return_intermediates=return_intermediates,
            )
        t_start = time.perf_counter()
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        squeeze = _ndim(image_mu) == 2
        timings = dict.fromkeys(STAGES, 0.0)

        # 1. validate
        x, y, mask_t, resampled_from = self.check_inputs(image_mu, sinogram, mask, steps, seed)
        synthetic = y is None or not sinogram_is_measured

        # 2-3. segment, trace, LI
        t0 = self._now()
        if mask_t is None:
            mask_t = segment_metal(x, cfg.metal_threshold, cfg.min_metal_px)
        metal_px = [int(v) for v in mask_t.sum(dim=(-2, -1)).tolist()]
        found = [n > 0 for n in metal_px]
        y_ma, trace, y_li, x_li = self._prepare(x, y, mask_t, found)
        timings["prepare"] += self._now() - t0
        _report(progress, "prepare")

        # 4. correct the metal slices, batch by batch
        keys = ("x_p", "y_p", "y_f", "x_p_prime", "x_p_tilde", "residual", "residual_hat")
        keys += ("x_hat_p", "x_out")
        rows: dict[str, torch.Tensor] = {
            "x_p": x_li.clone(),
            "y_p": y_li.clone(),
            "y_f": y_ma.clone(),
            "x_p_prime": x_li.clone(),
            "x_p_tilde": x_li.clone(),
            "residual": torch.zeros_like(x),
            "residual_hat": torch.zeros_like(x),
            "x_hat_p": x_li.clone(),
            "x_out": x.clone(),
        }
        reruns: dict[int, list[str]] = {}
        metal_idx = [i for i, f in enumerate(found) if f]
        for start in range(0, len(metal_idx), cfg.batch_size):
            idx = metal_idx[start : start + cfg.batch_size]
            sel = torch.tensor(idx, device=self.device)
            batch = _Batch(
                index=idx,
                x_ma=x[sel],
                y_ma=y_ma[sel],
                mask=mask_t[sel],
                trace=trace[sel],
                x_li=x_li[sel],
                y_li=y_li[sel],
                seed=slice_seed(seed, idx[0]),
            )
            self._correct(batch, steps, timings, progress)
            for k in keys:
                rows[k][sel] = batch.out[k]
            for i in idx:
                reruns[i] = list(batch.reruns)

        # 5. pass-through rows keep X_ma; metal reinsertion for display
        out_grid = rows["x_out"].clone()
        if cfg.reinsert_metal:
            out_grid = torch.where(mask_t, x, out_grid)
        for i, f in enumerate(found):
            if not f:
                log.warning("slice %d: no metal found; passing it through unchanged", i)

        # 6. QA
        t0 = self._now()
        qa = slice_qa_record(
            self.projector,
            x_out=rows["x_out"],
            x_li=x_li,
            y_ma=y_ma,
            trace=trace,
            mask=mask_t,
            synthetic=synthetic,
            steps=int(steps),
            seed=int(seed),
            resampled_from=resampled_from,
            reruns=reruns,
            backend=self.graphs.backend,
            device=str(self.device),
            bundle=self.bundle_name,
            operators=self.operators.name,
            config=self.config.to_dict(),
        )
        timings["qa"] += self._now() - t0

        # resample back and restore the caller's shape; pass-through slices are the input
        output = out_grid
        if resampled_from is not None:
            output = resample_images(out_grid, resampled_from)
            original = _as_batch(image_mu, "image_mu", self.device)
            keep = torch.tensor([not f for f in found], device=self.device)
            output = torch.where(keep[:, None, None], original, output)
        if squeeze:
            output = output[0]
        intermediates: dict[str, torch.Tensor] = {}
        if return_intermediates:
            intermediates = {
                "x_ma": x,
                "y_ma": y_ma,
                "mask": mask_t,
                "trace": trace,
                "x_li": x_li,
                "y_li": y_li,
                **rows,
            }
        timings["total"] = self._now() - t_start
        return PipelineOutput(
            output=output,
            intermediates=intermediates,
            timings=timings,
            seed=int(seed),
            steps=int(steps),
            qa=qa,
        )

    # ------------------------------------------------------------------ steps
    def _prepare(
        self, x: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor, found: list[bool]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Y_ma (measured or FP(X_ma)), Tr = FP(M) > 0, Y_LI = LI(Y_ma), X_LI = FBP(Y_LI).

        Slices without metal get Tr = 0, Y_LI = Y_ma and X_LI = X_ma (no FBP is run).
        """
        y_ma = self.projector.forward(x) if y is None else y
        trace = torch.zeros(y_ma.shape, dtype=torch.bool, device=self.device)
        y_li = y_ma.clone()
        x_li = x.clone()
        idx = [i for i, f in enumerate(found) if f]
        if idx:
            sel = torch.tensor(idx, device=self.device)
            trace[sel] = self.operators.trace(mask[sel])
            y_li[sel] = self.operators.li(y_ma[sel], trace[sel])
            x_li[sel] = self.projector.fbp(y_li[sel], filter=self.config.fbp_filter)
        return y_ma, trace, y_li, x_li

    def _correct(
        self, b: _Batch, steps: int, timings: dict[str, float], progress: ProgressFn | None
    ) -> None:
        """DAPG + OSRO on one batch of metal slices; fills ``b.out``."""
        cfg = self.config
        # a. embeddings
        t0 = self._now()
        emb = self._stage("clip", b, lambda g: self.embed(g, b.x_ma, b.y_ma))
        timings["clip"] += self._now() - t0
        _report(progress, "clip")

        # b. DAPG priors
        x_p, y_p = self.dapg(b, emb, steps, timings, progress)
        b.out["x_p"], b.out["y_p"] = x_p, y_p

        # c. OSRO
        t0 = self._now()
        if cfg.run_osro:
            self.osro(b, emb, x_p, y_p, steps, progress)
        else:
            for k in ("y_f", "x_p_prime", "x_p_tilde", "x_hat_p"):
                b.out[k] = x_p if k.startswith("x") else y_p
            b.out["residual"] = torch.zeros_like(x_p)
            b.out["residual_hat"] = torch.zeros_like(x_p)
            b.out["x_out"] = x_p
        timings["osro"] += self._now() - t0
        _report(progress, "osro")

    def embed(
        self, graphs: Mapping[str, Any], x_ma: torch.Tensor, y_ma: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(c, a) per CLIP domain: CLIP_img(x(X_ma)), CLIP_sino(y(Y_ma)); zeros without CLIP."""
        out = {}
        for domain, net in (
            ("image", units.image_to_net(x_ma)),
            ("sinogram", units.sino_to_net(y_ma)),
        ):
            backend = graphs[clip_graph(domain)]
            if not self.config.use_clip:
                dim = backend.output_specs["content_emb"].shape[-1]
                zeros = torch.zeros(net.shape[0], int(dim), device=self.device)
                out[domain] = (zeros, zeros)
                continue
            pixels = net[:, None].contiguous()
            spec_hw = tuple(backend.input_specs["image"].shape[-2:])
            if spec_hw != tuple(pixels.shape[-2:]):
                # a CLIP with preprocess="daclip" takes host-processed S×S pixels (export.graphs)
                pixels = daclip_pixels(pixels, int(spec_hw[0])).contiguous()
            res = backend.infer({"image": pixels}, copy_outputs=True)
            out[domain] = (res["content_emb"], res["artifact_emb"])
        return out

    def dapg(
        self,
        b: _Batch,
        emb: dict[str, tuple[torch.Tensor, torch.Tensor]],
        steps: int,
        timings: dict[str, float],
        progress: ProgressFn | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """X_p and Y_p: the two IR-SDE loops (μ = LI pair or metal-affected pair).

        A disabled loop returns its μ (X_LI/Y_LI when μ is the metal-affected pair). On CUDA
        the loops run on two streams; on CPU one after the other.
        """
        cfg = self.config
        t0 = self._now()
        mu_img, mu_sino = self.reversion_targets(b)
        timings["prepare"] += self._now() - t0
        jobs: dict[str, Callable[[GraphSet], torch.Tensor]] = {}
        if cfg.run_image_sde:
            mu_x = units.image_to_net(mu_img)[:, None].contiguous()
            jobs["image_sde"] = lambda g: self._loop(
                g, "image", mu_x, emb["image"], steps, b.seed, progress
            )
        if cfg.run_sinogram_sde:
            mu_y = units.sino_to_net(mu_sino)[:, None].contiguous()
            jobs["sinogram_sde"] = lambda g: self._loop(
                g, "sinogram", mu_y, emb["sinogram"], steps, b.seed, progress
            )
        results = self._run_jobs(jobs, b, timings)
        keep_x, keep_y = (b.x_li, b.y_li) if cfg.mu_source == "ma" else (mu_img, mu_sino)
        x_p = units.net_to_image(results["image_sde"][:, 0]) if "image_sde" in results else keep_x
        y_p = (
            units.net_to_sino(results["sinogram_sde"][:, 0])
            if "sinogram_sde" in results
            else keep_y
        )
        return x_p, y_p

    def reversion_targets(self, b: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, sinogram) in μ / line integrals that the DAPG loops revert to
        (``config.mu_source``): the LI pair, the NMAR pair (computed here from the LI one) or
        the metal-affected pair."""
        source = self.config.mu_source
        if source == "li":
            return b.x_li, b.y_li
        if source == "ma":
            return b.x_ma, b.y_ma
        y_nmar, x_nmar, _ = nmar_from_li(
            b.y_ma, b.x_li, b.mask, b.trace, self.operators.ct_view(), self.config.fbp_filter
        )
        return x_nmar, y_nmar

    def osro(
        self,
        b: _Batch,
        emb: dict[str, tuple[torch.Tensor, torch.Tensor]],
        x_p: torch.Tensor,
        y_p: torch.Tensor,
        steps: int,
        progress: ProgressFn | None,
    ) -> None:
        """OSRO steps 1–6 (DESIGN §8) into ``b.out``."""
        cfg = self.config
        valid = ~b.mask
        # 1. raw-data fidelity: Y_f = (1 − Tr)⊙Y_ma + Tr⊙Y_p (or Y_ma across the trace
        # normalised by FP(X_p)), X'_p = FBP(Y_f)
        if not cfg.osro_fidelity:
            y_f = y_p
        elif cfg.fidelity_prior == "image":
            y_prior = self.projector.forward(osro.image_prior(x_p, b.mask).contiguous())
            y_f = osro.prior_normalised_sinogram(b.y_ma, y_prior, b.trace)
        else:
            y_f = osro.fidelity_sinogram(b.y_ma, y_p, b.trace)
        x_pp = self.projector.fbp(y_f.contiguous(), filter=cfg.fbp_filter)
        # 2. Norm¹: X̃_p = Norm(X_p → X'_p)
        x_tilde = self.operators.match_stats(x_p, x_pp, valid) if cfg.norm1 else x_p
        # 3. residual R = X̃_p − X'_p, refined by the residual IR-SDE → R̂ (R̂ = 0 when off)
        residual = x_tilde - x_pp
        if cfg.osro_residual:
            r_steps = cfg.residual_steps_for(steps)
            mu_r = osro.residual_to_net(residual, cfg.residual_scale)[:, None].contiguous()
            r_net = self._stage(
                "residual_sde",
                b,
                lambda g: self._loop(g, "residual", mu_r, emb["image"], r_steps, b.seed, progress),
            )
            residual_hat = osro.net_to_residual(r_net[:, 0], cfg.residual_scale)
        else:
            residual_hat = torch.zeros_like(residual)
        # 4. X̂_p = X'_p + R̂
        x_hat = x_pp + residual_hat
        # 5. Norm²: match X̂_p to X_p
        x_hat_n = self.operators.match_stats(x_hat, x_p, valid) if cfg.norm2 else x_hat
        # 6. fusion
        x_out = self.operators.fuse(x_hat_n, x_p, cfg.alpha)
        b.out.update(
            y_f=y_f,
            x_p_prime=x_pp,
            x_p_tilde=x_tilde,
            residual=residual,
            residual_hat=residual_hat,
            x_hat_p=x_hat,
            x_out=x_out,
        )

    # ------------------------------------------------------------------ machinery
    def _sampler(self, graphs: GraphSet, domain: str, steps: int) -> DomainSampler:
        name = self.config.sampler
        key = (id(graphs), domain, int(steps), name)
        if key not in self._samplers:
            self._samplers[key] = DomainSampler(
                graphs,
                domain,
                self.sde,
                steps=int(steps),
                step_fn=self.operators.step_fn,
                sampler=name,
            )
        return self._samplers[key]

    def _loop(
        self,
        graphs: GraphSet,
        domain: str,
        mu: torch.Tensor,
        emb: tuple[torch.Tensor, torch.Tensor],
        steps: int,
        seed: int,
        progress: ProgressFn | None,
    ) -> torch.Tensor:
        sampler = self._sampler(graphs, domain, steps)
        cond = sampler.condition(*emb)
        gen = loop_generator(seed, domain, mu.device)
        return sampler.sample(mu, cond, generator=gen, progress=progress)

    def _fp32_graphs(self) -> GraphSet:
        if self._fp32 is None:
            self._fp32 = self._fp32_factory()
            if not self._fp32.is_active:
                self._fp32.activate()
        return self._fp32

    def _stage(self, name: str, b: _Batch, fn: Callable[[GraphSet], Any]) -> Any:
        """Run ``fn(graphs)``; on NaN/inf from a non-fp32 graph set, rerun it in fp32."""
        out = fn(self.graphs)
        if _finite(out):
            return out
        return self._rerun_fp32(name, b, fn)

    def _rerun_fp32(self, name: str, b: _Batch, fn: Callable[[GraphSet], Any]) -> Any:
        if self.graphs.precision == "fp32":
            raise MarRtError(
                f"stage {name} ({self.graphs.backend}, fp32) produced NaN/inf for slices {b.index}"
            )
        log.warning(
            "stage %s: %s output held NaN/inf; rerunning it in fp32", name, self.graphs.precision
        )
        out = fn(self._fp32_graphs())
        if not _finite(out):
            raise MarRtError(f"stage {name} produced NaN/inf for slices {b.index}, even in fp32")
        b.reruns.append(name)
        return out

    def _run_jobs(
        self,
        jobs: dict[str, Callable[[GraphSet], torch.Tensor]],
        b: _Batch,
        timings: dict[str, float],
    ) -> dict[str, torch.Tensor]:
        """Run independent loops: two CUDA streams on GPU, sequentially on CPU."""
        results: dict[str, torch.Tensor] = {}
        if self.device.type == "cuda" and len(jobs) > 1:
            main = torch.cuda.current_stream(self.device)
            events = {}
            for name, fn in jobs.items():
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(main)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(stream):
                    start.record(stream)
                    results[name] = fn(self.graphs)
                    end.record(stream)
                main.wait_stream(stream)
                results[name].record_stream(main)
                events[name] = (start, end)
            torch.cuda.synchronize(self.device)
            for name, (start, end) in events.items():
                timings[name] += start.elapsed_time(end) / 1000.0
        else:
            for name, fn in jobs.items():
                t0 = self._now()
                results[name] = fn(self.graphs)
                timings[name] += self._now() - t0
        for name, fn in jobs.items():
            if not _finite(results[name]):
                t0 = self._now()
                results[name] = self._rerun_fp32(name, b, fn)
                timings[name] += self._now() - t0
        return results

    def _now(self) -> float:
        """Wall clock at a stage boundary (synchronises CUDA first)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


# ---------------------------------------------------------------------- helpers
def _ndim(x: Any) -> int:
    return int(getattr(x, "ndim", 0))


def _as_batch(x: Any, name: str, device: torch.device, *, floating: bool = True) -> torch.Tensor:
    """(H, W) or (B, H, W) numpy/torch → (B, H, W) tensor on ``device``; NaN/inf refused."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise BadInputError(f"{name} has unsupported dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise BadInputError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim not in (2, 3):
        raise BadInputError(f"{name} must have shape (H, W) or (B, H, W), got {tuple(x.shape)}")
    if x.ndim == 2:
        x = x[None]
    if x.shape[0] == 0 or x.numel() == 0:
        raise BadInputError(f"{name} is empty: shape {tuple(x.shape)}")
    if x.is_floating_point() or x.is_complex():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            slices = sorted({int(i) for i in bad.nonzero()[:, 0].tolist()})
            raise BadInputError(
                f"{name} holds {int(bad.sum())} NaN/inf value(s) in slice(s) {slices[:10]}"
            )
    if floating:
        x = x.to(device=device, dtype=torch.float32)
    else:
        x = x.to(device=device)
    return x.contiguous()


def _finite(out: Any) -> bool:
    """True when every tensor in ``out`` (tensor, tuple, dict of them) is finite."""
    if isinstance(out, torch.Tensor):
        return bool(torch.isfinite(out).all())
    if isinstance(out, Mapping):
        return all(_finite(v) for v in out.values())
    if isinstance(out, (tuple, list)):
        return all(_finite(v) for v in out)
    return True


def _report(progress: ProgressFn | None, stage: str) -> None:
    if progress is not None:
        progress(stage, 0, 1)


__all__ = ["DuDoCROPPipeline", "PipelineOutput", "STAGES", "slice_seed"]
