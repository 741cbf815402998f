"""CPU fast path: the CUDA kernels' host build, on numpy arrays or CPU torch tensors.

Same operators and argument order as the references (``mar_rt.ct.projector``,
``mar_rt.ct.fbp``, ``mar_rt.ct.mar``, ``mar_rt.models.sde``, ``mar_rt.runtime.osro``); every
kernel is the ``__host__ __device__`` body of ``cuda/*.cu`` looped with OpenMP
(see :mod:`mar_rt.kernels.build`).

Arrays: images ``(..., H, W)``, sinograms ``(..., V, D)``.  Inputs are converted to
contiguous float32 (no copy when they already are); results are float32 numpy arrays, or
CPU torch tensors when the (first) input is a torch tensor.  ``out=`` takes a preallocated
contiguous float32 numpy array (or CPU tensor) of the result's shape and is returned.

Precision: geometry tables are float64 rounded to float32; Joseph sample positions and all
sums are float32; FBP positions and weights float64 (see the notation blocks of the .cu files).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.ramp import check_filter, padded_length, ramp_response
from mar_rt.errors import BadInputError
from mar_rt.kernels import build
from mar_rt.kernels._arrays import (
    GeometryTables,
    check_geometry_shape,
    geometry_tables,
    leading_batch,
)

__all__ = [
    "HostProjector",
    "back_project",
    "cpu_fast_path_available",
    "fbp",
    "forward_project",
    "fuse",
    "get_host_projector",
    "li_inpaint",
    "match_stats",
    "metal_trace",
    "sde_step",
]

Array = Any  # numpy.ndarray | torch.Tensor (CPU)


def cpu_fast_path_available() -> bool:
    """True when the host build of the kernels compiles (or is cached) and loads."""
    return build.host_available()[0]


# --------------------------------------------------------------------------- array plumbing
def _f32(x: Array, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 numpy array (a view when it already is one)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise BadInputError(f"{name} is on {x.device}; mar_rt.kernels.host takes CPU arrays")
        x = x.detach().to(torch.float32).contiguous().numpy()
    elif not isinstance(x, np.ndarray):
        raise BadInputError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.number) and x.dtype != np.bool_:
        raise BadInputError(f"{name} must be numeric, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _u8(x: Array, name: str) -> np.ndarray:
    """A bool / 0-1 mask as contiguous uint8 (nonzero → 1)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise BadInputError(f"{name} is on {x.device}; mar_rt.kernels.host takes CPU arrays")
        x = x.detach().cpu().numpy()
    elif not isinstance(x, np.ndarray):
        raise BadInputError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.dtype == np.bool_ or x.dtype == np.uint8:
        return np.ascontiguousarray(x.view(np.uint8) if x.dtype == np.bool_ else x)
    return np.ascontiguousarray(x != 0, dtype=np.uint8)


def _finite(x: np.ndarray, name: str) -> None:
    if not np.isfinite(x).all():
        raise BadInputError(f"{name} contains {int((~np.isfinite(x)).sum())} NaN or inf value(s)")


def _out(out: Array | None, shape: tuple[int, ...], name: str = "out") -> np.ndarray:
    """A float32 C-contiguous result buffer: ``out`` itself (checked) or a new array."""
    if out is None:
        return np.empty(shape, dtype=np.float32)
    arr = out.numpy() if isinstance(out, torch.Tensor) and out.device.type == "cpu" else out
    if (
        not isinstance(arr, np.ndarray)
        or arr.dtype != np.float32
        or not arr.flags.c_contiguous
        or tuple(arr.shape) != tuple(shape)
    ):
        raise BadInputError(
            f"{name} must be a C-contiguous float32 CPU array of shape {tuple(shape)}, got "
            f"{type(out).__name__} {getattr(out, 'dtype', '?')} {tuple(getattr(out, 'shape', ()))}"
        )
    return arr


def _like(result: np.ndarray, template: Array, out: Array | None) -> Array:
    """Return ``out`` when given, else ``result`` as the template's kind (torch or numpy)."""
    if out is not None:
        return out
    return torch.from_numpy(result) if isinstance(template, torch.Tensor) else result


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _check_nb(nb: int | None, n_batch: int) -> int:
    """Slices per thread: ``nb``, or by default 8, 4, 2 or 1 as the batch allows (as on the GPU)."""
    if nb is None:
        return next(n for n in (8, 4, 2, 1) if n_batch >= n)
    if nb not in build.SLICES_PER_THREAD:
        raise BadInputError(
            f"slices_per_thread must be one of {build.SLICES_PER_THREAD}, got {nb!r}"
        )
    return int(nb)


# --------------------------------------------------------------------------- projector
@dataclass(frozen=True, eq=False)
class HostProjector:
    """Ray and view tables of one geometry for the host kernels (built once, read-only).

    ``rays`` float32 (V, D, 4) = (a, m, w, col); ``vcoef`` float64 (V, 8) and its float32 copy
    ``vcoef32``; ``gtab`` float32 (V, D + 2·pad, 4), the gather adjoint's table; ``span``
    candidate bins per view of the gather adjoint (= ``pad``).

    ``slices_per_thread`` (default: 8, 4, 2 or 1 as the batch allows, as on the GPU) and
    ``gpu_layout`` (a transposed copy for column-branch rays) select the instantiations, so
    that the host tests cover the very bodies the device executes.
    """

    tables: GeometryTables
    rays: np.ndarray
    vcoef: np.ndarray
    vcoef32: np.ndarray
    gtab: np.ndarray
    span: int

    @property
    def geometry(self) -> FanBeamGeometry:
        return self.tables.geometry

    @property
    def pad(self) -> int:
        return self.span

    @classmethod
    def build(cls, geometry: FanBeamGeometry) -> HostProjector:
        lib = build.load_host_library()
        t = geometry_tables(geometry)
        g = geometry
        rays = np.empty((g.n_views, g.n_det, 4), dtype=np.float32)
        lib.mr_host_ray_table(
            _ptr(t.views),
            _ptr(t.u),
            g.n_views,
            g.n_det,
            g.n_rows,
            g.n_cols,
            g.pixel_size,
            _ptr(rays),
        )
        vcoef = np.empty((g.n_views, 8), dtype=np.float64)
        lib.mr_host_view_coef(
            _ptr(t.views),
            g.n_views,
            g.n_rows,
            g.n_cols,
            g.pixel_size,
            float(t.u[0]),
            g.det_spacing,
            t.u_abs_max,
            _ptr(vcoef),
        )
        span = int(vcoef[:, 7].max())
        gtab = np.empty((g.n_views, g.n_det + 2 * span, 4), dtype=np.float32)
        lib.mr_host_gather_table(_ptr(rays), g.n_views, g.n_det, span, _ptr(gtab))
        vcoef32 = vcoef.astype(np.float32)
        for arr in (rays, vcoef, vcoef32, gtab):
            arr.setflags(write=False)
        return cls(t, rays, vcoef, vcoef32, gtab, span)

    # --- operators -------------------------------------------------------------------------
    def forward(
        self,
        image: Array,
        *,
        out: Array | None = None,
        slices_per_thread: int | None = None,
        gpu_layout: bool = False,
    ) -> Array:
        """Joseph projection A·image: (..., H, W) μ in cm⁻¹ → (..., V, D) line integrals."""
        g = self.geometry
        x = _f32(image, "image")
        check_geometry_shape(g, x.shape, "image", "image")
        _finite(x, "image")
        y = _out(out, (*x.shape[:-2], g.n_views, g.n_det))
        x_t = np.ascontiguousarray(np.swapaxes(x, -1, -2)) if gpu_layout else None
        status = build.load_host_library().mr_host_forward(
            _ptr(x),
            _ptr(x_t) if x_t is not None else None,
            _ptr(self.rays),
            leading_batch(x.shape, "image"),
            g.n_rows,
            g.n_cols,
            g.n_views,
            g.n_det,
            _check_nb(slices_per_thread, leading_batch(x.shape, "image")),
            _ptr(y),
        )
        assert status == 0, "mr_host_forward refused slices_per_thread"
        return _like(y, image, out)

    def adjoint(
        self,
        sinogram: Array,
        *,
        out: Array | None = None,
        method: Literal["scatter", "gather"] = "scatter",
        slices_per_thread: int | None = None,
    ) -> Array:
        """Aᵀ·sinogram: (..., V, D) → (..., H, W), the exact adjoint of :meth:`forward`.

        ``scatter`` (default on the CPU) walks each ray as the forward pass does; ``gather`` runs
        the GPU's per-pixel body.  Both give Aᵀ to float rounding.
        """
        g = self.geometry
        s = _f32(sinogram, "sinogram")
        check_geometry_shape(g, s.shape, "sinogram", "sinogram")
        _finite(s, "sinogram")
        x = _out(out, (*s.shape[:-2], g.n_rows, g.n_cols))
        b = leading_batch(s.shape, "sinogram")
        lib = build.load_host_library()
        if method == "scatter":
            status = lib.mr_host_adjoint_scatter(
                _ptr(s), _ptr(self.rays), b, g.n_rows, g.n_cols, g.n_views, g.n_det, _ptr(x)
            )
            if status != 0:
                raise MemoryError("mr_host_adjoint_scatter could not allocate its scratch planes")
        elif method == "gather":
            status = lib.mr_host_adjoint(
                _ptr(s),
                _ptr(self.gtab),
                _ptr(self.vcoef32),
                b,
                g.n_rows,
                g.n_cols,
                g.n_views,
                g.n_det,
                self.pad,
                self.span,
                _check_nb(slices_per_thread, b),
                _ptr(x),
            )
            assert status == 0, "mr_host_adjoint refused slices_per_thread"
        else:
            raise BadInputError(f"method must be 'scatter' or 'gather', got {method!r}")
        return _like(x, sinogram, out)

    def weight(self, sinogram: Array, *, out: Array | None = None) -> Array:
        """FBP cosine pre-weighting p·R/√(R² + a_j²) of (..., V, D)."""
        g = self.geometry
        s = _f32(sinogram, "sinogram")
        check_geometry_shape(g, s.shape, "sinogram", "sinogram")
        y = _out(out, s.shape)
        build.load_host_library().mr_host_fbp_weight(
            _ptr(s),
            _ptr(self.tables.u),
            leading_batch(s.shape, "sinogram") * g.n_views,
            g.n_det,
            g.source_distance,
            self.tables.iso,
            _ptr(y),
        )
        return _like(y, sinogram, out)

    def backproject_filtered(
        self, filtered: Array, *, out: Array | None = None, slices_per_thread: int | None = None
    ) -> Array:
        """FBP's pixel-driven back-projection of a filtered sinogram (..., V, D) → (..., H, W)."""
        g = self.geometry
        q = _f32(filtered, "filtered sinogram")
        check_geometry_shape(g, q.shape, "sinogram", "filtered sinogram")
        x = _out(out, (*q.shape[:-2], g.n_rows, g.n_cols))
        status = build.load_host_library().mr_host_fbp(
            _ptr(q),
            _ptr(self.vcoef),
            leading_batch(q.shape, "sinogram"),
            g.n_rows,
            g.n_cols,
            g.n_views,
            g.n_det,
            self.tables.bp_scale,
            _check_nb(slices_per_thread, leading_batch(q.shape, "sinogram")),
            _ptr(x),
        )
        assert status == 0, "mr_host_fbp refused slices_per_thread"
        return _like(x, filtered, out)

    def fbp(self, sinogram: Array, *, filter: str = "ram-lak", out: Array | None = None) -> Array:
        """Fan-beam FBP (DESIGN §4): weight (kernel) → ramp filter (torch FFT) → back-project
        (kernel).  (..., V, D) line integrals → (..., H, W) μ in cm⁻¹."""
        check_filter(filter)
        g = self.geometry
        s = _f32(sinogram, "sinogram")
        check_geometry_shape(g, s.shape, "sinogram", "sinogram")
        _finite(s, "sinogram")
        weighted = torch.from_numpy(self.weight(s))
        size = padded_length(g.n_det)
        response = torch.as_tensor(
            ramp_response(g.n_det, g.det_spacing * self.tables.iso, filter), dtype=torch.float32
        )
        spectrum = torch.fft.rfft(weighted, n=size, dim=-1)
        spectrum *= response
        q = torch.fft.irfft(spectrum, n=size, dim=-1)[..., : g.n_det].contiguous()
        x = self.backproject_filtered(q.numpy(), out=out)
        return _like(x, sinogram, out)


@functools.lru_cache(maxsize=4)
def get_host_projector(geometry: FanBeamGeometry) -> HostProjector:
    """A shared :class:`HostProjector` per geometry (the last four are kept)."""
    return HostProjector.build(geometry)


def forward_project(image: Array, geometry: FanBeamGeometry, *, out: Array | None = None) -> Array:
    """Joseph line integrals of a μ image (..., H, W) → sinogram (..., V, D)."""
    return get_host_projector(geometry).forward(image, out=out)


def back_project(
    sinogram: Array,
    geometry: FanBeamGeometry,
    *,
    out: Array | None = None,
    method: Literal["scatter", "gather"] = "scatter",
) -> Array:
    """Exact adjoint of :func:`forward_project`: sinogram (..., V, D) → image (..., H, W)."""
    return get_host_projector(geometry).adjoint(sinogram, out=out, method=method)


def fbp(
    sinogram: Array,
    geometry: FanBeamGeometry,
    *,
    filter: str = "ram-lak",
    out: Array | None = None,
) -> Array:
    """Fan-beam FBP of line integrals (..., V, D) → μ image (..., H, W) in cm⁻¹."""
    return get_host_projector(geometry).fbp(sinogram, filter=filter, out=out)


# --------------------------------------------------------------------------- MAR
def metal_trace(mask: Array, geometry: FanBeamGeometry, *, threshold: float = 0.0) -> Array:
    """Tr = FP(M) > threshold: bool (..., V, D) (numpy, or torch when ``mask`` is torch)."""
    m = _f32(_u8(mask, "mask"), "mask")
    check_geometry_shape(geometry, m.shape, "image", "mask")
    projection = get_host_projector(geometry).forward(m)
    trace = np.empty(projection.shape, dtype=np.uint8)
    build.load_host_library().mr_host_trace(
        _ptr(projection), projection.size, float(threshold), _ptr(trace)
    )
    result = trace.view(np.bool_)
    return torch.from_numpy(result) if isinstance(mask, torch.Tensor) else result


def li_inpaint(sinogram: Array, trace: Array, *, out: Array | None = None) -> Array:
    """LI along the detector across the trace, view by view (see ``cuda/mar.cu``)."""
    p = _f32(sinogram, "sinogram")
    tr = _u8(trace, "trace")
    if tr.shape != p.shape:
        raise BadInputError(f"trace has shape {tr.shape} but sinogram has shape {p.shape}")
    if p.ndim < 2:
        raise BadInputError(f"sinogram must be at least 2-D (views, bins), got {p.shape}")
    _finite(p, "sinogram")
    y = _out(out, p.shape)
    build.load_host_library().mr_host_li(
        _ptr(p), _ptr(tr), int(p.size // p.shape[-1]), p.shape[-1], _ptr(y)
    )
    return _like(y, sinogram, out)


# --------------------------------------------------------------------------- SDE and OSRO
def sde_step(
    x: Array,
    eps: Array,
    mu: Array,
    a: float,
    b: float,
    c: float,
    z: Array | None = None,
    *,
    out: Array | None = None,
) -> Array:
    """x ← μ + a·(x − μ) − b·ε̂ + c·z (z omitted when None), elementwise.

    Argument order as ``mar_rt.models.sde.sample_posterior``'s ``step``; ``out=x`` updates in
    place (only when ``x`` already is a contiguous float32 array).
    """
    xs = _f32(x, "x")
    arrays = {"eps": _f32(eps, "eps"), "mu": _f32(mu, "mu")}
    if z is not None:
        arrays["z"] = _f32(z, "z")
    for name, arr in arrays.items():
        if arr.shape != xs.shape:
            raise BadInputError(f"{name} has shape {arr.shape}, expected x's shape {xs.shape}")
    y = _out(out, xs.shape)
    build.load_host_library().mr_host_sde_step(
        _ptr(xs),
        _ptr(arrays["eps"]),
        _ptr(arrays["mu"]),
        _ptr(arrays["z"]) if z is not None else None,
        xs.size,
        float(a),
        float(b),
        float(c),
        _ptr(y),
    )
    return _like(y, x, out)


def _slices(x: np.ndarray, name: str) -> tuple[int, int]:
    b = leading_batch(x.shape, name)
    return b, int(x.shape[-2] * x.shape[-1])


def masked_sums(x: Array, valid: Array) -> np.ndarray:
    """Per-slice (n, Σx, Σx²) over ``valid`` pixels, float64 (B, 3)."""
    xs, vs = _f32(x, "x"), _u8(valid, "valid")
    if vs.shape != xs.shape:
        raise BadInputError(f"valid has shape {vs.shape}, expected {xs.shape}")
    b, plane = _slices(xs, "x")
    sums = np.empty((b, 3), dtype=np.float64)
    build.load_host_library().mr_host_masked_sums(_ptr(xs), _ptr(vs), b, plane, _ptr(sums))
    return sums


def match_stats(src: Array, ref: Array, valid: Array, *, out: Array | None = None) -> Array:
    """Norm(src → ref) = (src − m_src)·(s_ref/s_src) + m_ref per slice, statistics over
    ``valid`` (True = non-metal); a constant ``src`` is only shifted (``runtime.osro``)."""
    xs, rs = _f32(src, "src"), _f32(ref, "ref")
    if rs.shape != xs.shape:
        raise BadInputError(f"ref has shape {rs.shape}, expected src's shape {xs.shape}")
    sums_src, sums_ref = masked_sums(xs, valid), masked_sums(rs, valid)
    b, plane = _slices(xs, "src")
    y = _out(out, xs.shape)
    build.load_host_library().mr_host_match_apply(
        _ptr(xs), _ptr(sums_src), _ptr(sums_ref), b, plane, _ptr(y)
    )
    return _like(y, src, out)


def fuse(a: Array, b: Array, alpha: float, *, out: Array | None = None) -> Array:
    """α·a + (1 − α)·b, elementwise (1 − α in float64, then float32)."""
    xa, xb = _f32(a, "a"), _f32(b, "b")
    if xb.shape != xa.shape:
        raise BadInputError(f"b has shape {xb.shape}, expected a's shape {xa.shape}")
    y = _out(out, xa.shape)
    build.load_host_library().mr_host_fuse(
        _ptr(xa), _ptr(xb), xa.size, float(alpha), float(1.0 - float(alpha)), _ptr(y)
    )
    return _like(y, a, out)
