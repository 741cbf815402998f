"""GPU operators: the ``cuda/*.cu`` kernels through ``cupy.RawModule`` (DESIGN.md §11).

Same operators and signatures as :mod:`mar_rt.kernels.host`, plus ``stream=``.  CuPy is
imported lazily; without CuPy or a GPU every entry point raises
:class:`mar_rt.errors.BackendUnavailableError`.

Arrays: CuPy arrays, or CUDA torch tensors (taken through DLPack, no copy when they are
contiguous float32).  Results are new CuPy arrays, or — when the first input is a torch tensor —
torch tensors that are DLPack *views* of the CuPy allocation (no copy; the tensor keeps the
buffer alive).  ``out=`` takes a preallocated contiguous float32 buffer (CuPy or torch) of the
result's shape, is written in place and returned.

Streams: kernels run on ``stream`` (a ``cupy.cuda.Stream`` / ``ExternalStream``) when given;
else, for torch inputs, on torch's current stream (so torch work before and after stays
ordered); else on CuPy's current stream.  Nothing synchronises the host.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.ramp import check_filter, padded_length, ramp_response
from mar_rt.errors import BackendUnavailableError, BadInputError
from mar_rt.kernels import build
from mar_rt.kernels._arrays import (
    GeometryTables,
    check_geometry_shape,
    geometry_tables,
    leading_batch,
)

__all__ = [
    "GpuProjector",
    "back_project",
    "fbp",
    "forward_project",
    "fuse",
    "get_gpu_projector",
    "gpu_available",
    "li_inpaint",
    "match_stats",
    "metal_trace",
    "sde_step",
]

BLOCK = 256
Array = Any  # cupy.ndarray | torch.Tensor (CUDA)


# --------------------------------------------------------------------------- CuPy access
def _cupy() -> Any:
    """The cupy module, or BackendUnavailableError naming what is missing."""
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(
            "cupy is not installed (pip install 'mar-rt[gpu]' or cupy-cuda12x/13x): the GPU "
            "kernels need it"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, or a driver that will not load
        raise BackendUnavailableError(f"cupy found no usable CUDA device: {exc}") from exc
    if count < 1:
        raise BackendUnavailableError("cupy found no CUDA device")
    return cupy


def gpu_available() -> tuple[bool, str]:
    """(True, device name) when CuPy, a GPU and the kernels' NVRTC build work; else the reason."""
    try:
        cp = _cupy()
        _module("projector.cu", cp.cuda.Device().id)
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    except BackendUnavailableError as exc:
        return False, str(exc)
    name = props["name"]
    return True, name.decode() if isinstance(name, bytes) else str(name)


@functools.cache
def _module(source: str, device_id: int) -> Any:
    """The compiled RawModule of one .cu file on one device (NVRTC, cached by CuPy on disk)."""
    cp = _cupy()
    with cp.cuda.Device(device_id):
        try:
            module = cp.RawModule(code=build.device_source(source), options=build.NVRTC_OPTIONS)
            module.compile()
        except Exception as exc:  # cupy.cuda.compiler.CompileException and driver errors
            raise BackendUnavailableError(f"NVRTC build of {source} failed: {exc}") from exc
    return module


def _kernel(source: str, name: str) -> Any:
    cp = _cupy()
    return _module(source, cp.cuda.Device().id).get_function(name)


def _launch(source: str, name: str, n: int, args: tuple) -> None:
    """One thread per item, on the current CuPy stream (callers enter the stream)."""
    if n <= 0:
        return
    _kernel(source, name)((math.ceil(n / BLOCK),), (BLOCK,), args)


# --------------------------------------------------------------------------- array plumbing
def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _stream(stream: Any, template: Any) -> Any:
    """Where to launch: the given stream, torch's current stream for torch input, else CuPy's."""
    cp = _cupy()
    if stream is not None:
        return stream
    if _is_torch(template):
        import torch

        current = torch.cuda.current_stream(template.device)
        from_external = getattr(cp.cuda.Stream, "from_external", None)
        if from_external is not None and hasattr(current, "__cuda_stream__"):
            return from_external(current)
        return cp.cuda.ExternalStream(current.cuda_stream)
    return cp.cuda.get_current_stream()


def _device_array(x: Any, name: str, dtype: Any) -> Any:
    """``x`` as a contiguous CuPy array of ``dtype`` (a view when it already is one)."""
    cp = _cupy()
    if _is_torch(x):
        if x.device.type != "cuda":
            raise BadInputError(f"{name} is on {x.device}; mar_rt.kernels.gpu takes CUDA arrays")
        x = cp.from_dlpack(x.detach())
    elif not isinstance(x, cp.ndarray):
        raise BadInputError(
            f"{name} must be a cupy array or CUDA torch tensor, got {type(x).__name__}"
        )
    return cp.ascontiguousarray(x, dtype=dtype)


def _f32(x: Any, name: str) -> Any:
    return _device_array(x, name, np.float32)


def _u8(x: Any, name: str) -> Any:
    """A bool / 0-1 mask as contiguous uint8 (nonzero → 1).  Torch bool tensors are cast to
    uint8 before DLPack (not every DLPack pairing carries bool)."""
    cp = _cupy()
    if _is_torch(x) and x.dtype is _torch_bool():
        x = x.to(_torch_uint8())
    arr = _device_array(x, name, None)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.view(np.uint8)
    return cp.ascontiguousarray(arr != 0, dtype=np.uint8)


def _out(out: Any, shape: tuple[int, ...], name: str = "out") -> Any:
    cp = _cupy()
    if out is None:
        return cp.empty(shape, dtype=np.float32)
    arr = cp.from_dlpack(out) if _is_torch(out) else out
    if (
        not isinstance(arr, cp.ndarray)
        or arr.dtype != np.float32
        or not arr.flags.c_contiguous
        or tuple(arr.shape) != tuple(shape)
    ):
        raise BadInputError(
            f"{name} must be a C-contiguous float32 GPU array of shape {tuple(shape)}, got "
            f"{type(out).__name__} {getattr(out, 'dtype', '?')} {tuple(getattr(out, 'shape', ()))}"
        )
    return arr


def _torch_bool() -> Any:
    import torch

    return torch.bool


def _torch_uint8() -> Any:
    import torch

    return torch.uint8


def _like(result: Any, template: Any, out: Any) -> Any:
    if out is not None:
        return out
    if _is_torch(template):
        import torch

        return torch.from_dlpack(result)
    return result


def _i(v: int) -> np.int32:
    return np.int32(v)


# --------------------------------------------------------------------------- projector
def slices_per_thread(n_batch: int) -> int:
    """How many slices one thread of the batched kernels handles (8, 4, 2 or 1)."""
    for nb in (8, 4, 2):
        if n_batch >= nb:
            return nb
    return 1


@dataclass(frozen=True, eq=False)
class GpuProjector:
    """Device-resident tables of one geometry on one GPU (see ``HostProjector``): ray table
    ``rays``, view coefficients ``vcoef`` (float64) / ``vcoef32``, gather table ``gtab``, bin
    centres ``u``."""

    tables: GeometryTables
    device_id: int
    rays: Any
    vcoef: Any
    vcoef32: Any
    gtab: Any
    u: Any
    span: int

    @property
    def geometry(self) -> FanBeamGeometry:
        return self.tables.geometry

    @property
    def pad(self) -> int:
        return self.span

    @classmethod
    def build(cls, geometry: FanBeamGeometry, device_id: int | None = None) -> GpuProjector:
        cp = _cupy()
        device_id = cp.cuda.Device().id if device_id is None else device_id
        t = geometry_tables(geometry)
        g = geometry
        with cp.cuda.Device(device_id):
            views, u = cp.asarray(t.views), cp.asarray(t.u)
            rays = cp.empty((g.n_views, g.n_det, 4), dtype=np.float32)
            vcoef = cp.empty((g.n_views, 8), dtype=np.float64)
            _launch(
                "projector.cu",
                "mr_ray_table",
                g.n_views * g.n_det,
                (
                    views,
                    u,
                    _i(g.n_views),
                    _i(g.n_det),
                    _i(g.n_rows),
                    _i(g.n_cols),
                    np.float64(g.pixel_size),
                    rays,
                ),
            )
            _launch(
                "projector.cu",
                "mr_view_coef",
                g.n_views,
                (
                    views,
                    _i(g.n_views),
                    _i(g.n_rows),
                    _i(g.n_cols),
                    np.float64(g.pixel_size),
                    np.float64(t.u[0]),
                    np.float64(g.det_spacing),
                    np.float64(t.u_abs_max),
                    vcoef,
                ),
            )
            span = int(vcoef[:, 7].max().get())  # one sync, at build time only
            gtab = cp.empty((g.n_views, g.n_det + 2 * span, 4), dtype=np.float32)
            _launch(
                "projector.cu",
                "mr_gather_table",
                int(np.prod(gtab.shape[:-1])),
                (rays, _i(g.n_views), _i(g.n_det), _i(span), gtab),
            )
            vcoef32 = vcoef.astype(np.float32)
            cp.cuda.get_current_stream().synchronize()
            return cls(t, device_id, rays, vcoef, vcoef32, gtab, u, span)

    def _check_device(self) -> None:
        cp = _cupy()
        if cp.cuda.Device().id != self.device_id:
            raise BadInputError(
                f"this GpuProjector lives on GPU {self.device_id}, the current device is "
                f"{cp.cuda.Device().id}"
            )

    def forward(self, image: Array, *, out: Array | None = None, stream: Any = None) -> Array:
        """Joseph projection: (..., H, W) → (..., V, D) on the GPU.  Column-branch rays read a
        transposed copy of the image (made here, per call)."""
        self._check_device()
        cp = _cupy()
        g = self.geometry
        with _stream(stream, image):
            x = _f32(image, "image")
            check_geometry_shape(g, x.shape, "image", "image")
            y = _out(out, (*x.shape[:-2], g.n_views, g.n_det))
            b = leading_batch(x.shape, "image")
            x_t = cp.ascontiguousarray(cp.swapaxes(x, -1, -2))
            nb = slices_per_thread(b)
            n_chunks = -(-b // nb)
            _launch(
                "projector.cu",
                f"mr_forward_{nb}",
                n_chunks * g.n_views * g.n_det,
                (
                    x,
                    x_t,
                    self.rays,
                    _i(b),
                    _i(g.n_rows),
                    _i(g.n_cols),
                    _i(g.n_views),
                    _i(g.n_det),
                    y,
                ),
            )
        return _like(y, image, out)

    def adjoint(
        self,
        sinogram: Array,
        *,
        out: Array | None = None,
        stream: Any = None,
        method: Literal["gather", "scatter"] = "gather",
    ) -> Array:
        """Aᵀ: (..., V, D) → (..., H, W).  ``gather`` (default): one thread per (slice chunk,
        pixel), no atomics; ``scatter``: one thread per ray with atomicAdd."""
        self._check_device()
        g = self.geometry
        if method not in ("gather", "scatter"):
            raise BadInputError(f"method must be 'gather' or 'scatter', got {method!r}")
        with _stream(stream, sinogram):
            s = _f32(sinogram, "sinogram")
            check_geometry_shape(g, s.shape, "sinogram", "sinogram")
            x = _out(out, (*s.shape[:-2], g.n_rows, g.n_cols))
            b = leading_batch(s.shape, "sinogram")
            dims = (_i(b), _i(g.n_rows), _i(g.n_cols), _i(g.n_views), _i(g.n_det))
            if method == "scatter":
                x.fill(0)
                _launch(
                    "projector.cu",
                    "mr_adjoint_scatter",
                    b * g.n_views * g.n_det,
                    (s, self.rays, *dims, x),
                )
            else:
                nb = slices_per_thread(b)
                _launch(
                    "projector.cu",
                    f"mr_adjoint_{nb}",
                    -(-b // nb) * g.n_rows * g.n_cols,
                    (s, self.gtab, self.vcoef32, *dims, _i(self.pad), _i(self.span), x),
                )
        return _like(x, sinogram, out)

    def weight(self, sinogram: Array, *, out: Array | None = None, stream: Any = None) -> Array:
        """FBP cosine pre-weighting of (..., V, D)."""
        self._check_device()
        g = self.geometry
        with _stream(stream, sinogram):
            s = _f32(sinogram, "sinogram")
            check_geometry_shape(g, s.shape, "sinogram", "sinogram")
            y = _out(out, s.shape)
            rows = leading_batch(s.shape, "sinogram") * g.n_views
            _launch(
                "fbp.cu",
                "mr_fbp_weight",
                rows * g.n_det,
                (
                    s,
                    self.u,
                    _i(rows),
                    _i(g.n_det),
                    np.float64(g.source_distance),
                    np.float64(self.tables.iso),
                    y,
                ),
            )
        return _like(y, sinogram, out)

    def backproject_filtered(
        self, filtered: Array, *, out: Array | None = None, stream: Any = None
    ) -> Array:
        """FBP's pixel-driven back-projection of a filtered sinogram."""
        self._check_device()
        g = self.geometry
        with _stream(stream, filtered):
            q = _f32(filtered, "filtered sinogram")
            check_geometry_shape(g, q.shape, "sinogram", "filtered sinogram")
            x = _out(out, (*q.shape[:-2], g.n_rows, g.n_cols))
            b = leading_batch(q.shape, "sinogram")
            nb = slices_per_thread(b)
            _launch(
                "fbp.cu",
                f"mr_fbp_{nb}",
                -(-b // nb) * g.n_rows * g.n_cols,
                (
                    q,
                    self.vcoef,
                    _i(b),
                    _i(g.n_rows),
                    _i(g.n_cols),
                    _i(g.n_views),
                    _i(g.n_det),
                    np.float64(self.tables.bp_scale),
                    x,
                ),
            )
        return _like(x, filtered, out)

    def fbp(
        self,
        sinogram: Array,
        *,
        filter: str = "ram-lak",
        out: Array | None = None,
        stream: Any = None,
    ) -> Array:
        """Fan-beam FBP: weight (kernel) → ramp filter (cupy.fft) → back-project (kernel)."""
        check_filter(filter)
        cp = _cupy()
        g = self.geometry
        st = _stream(stream, sinogram)
        with st:
            weighted = self.weight(_f32(sinogram, "sinogram"), stream=st)
            size = padded_length(g.n_det)
            response = _ramp_response(
                g.n_det, g.det_spacing * self.tables.iso, filter, self.device_id
            )
            spectrum = cp.fft.rfft(weighted, n=size, axis=-1)
            spectrum *= response
            q = cp.fft.irfft(spectrum, n=size, axis=-1)[..., : g.n_det]
            q = cp.ascontiguousarray(q, dtype=np.float32)
            x = self.backproject_filtered(q, out=out, stream=st)
        return _like(x, sinogram, out)


@functools.lru_cache(maxsize=16)
def _ramp_response(n_det: int, spacing: float, filter: str, device_id: int) -> Any:
    """The filter's frequency response (``mar_rt.ct.ramp.ramp_response``) as a float32 CuPy
    array on one device, built once per (size, spacing, filter)."""
    cp = _cupy()
    with cp.cuda.Device(device_id):
        return cp.asarray(ramp_response(n_det, spacing, filter), dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _cached_projector(geometry: FanBeamGeometry, device_id: int) -> GpuProjector:
    return GpuProjector.build(geometry, device_id)


def get_gpu_projector(geometry: FanBeamGeometry) -> GpuProjector:
    """A shared :class:`GpuProjector` for (geometry, current device); the last four are kept."""
    return _cached_projector(geometry, _cupy().cuda.Device().id)


def forward_project(
    image: Array, geometry: FanBeamGeometry, *, out: Array | None = None, stream: Any = None
) -> Array:
    """Joseph line integrals (..., H, W) → (..., V, D) on the GPU."""
    return get_gpu_projector(geometry).forward(image, out=out, stream=stream)


def back_project(
    sinogram: Array,
    geometry: FanBeamGeometry,
    *,
    out: Array | None = None,
    stream: Any = None,
    method: Literal["gather", "scatter"] = "gather",
) -> Array:
    """Exact adjoint of :func:`forward_project` on the GPU."""
    return get_gpu_projector(geometry).adjoint(sinogram, out=out, stream=stream, method=method)


def fbp(
    sinogram: Array,
    geometry: FanBeamGeometry,
    *,
    filter: str = "ram-lak",
    out: Array | None = None,
    stream: Any = None,
) -> Array:
    """Fan-beam FBP (..., V, D) → (..., H, W) μ in cm⁻¹ on the GPU."""
    return get_gpu_projector(geometry).fbp(sinogram, filter=filter, out=out, stream=stream)


# --------------------------------------------------------------------------- MAR
def metal_trace(
    mask: Array, geometry: FanBeamGeometry, *, threshold: float = 0.0, stream: Any = None
) -> Array:
    """Tr = FP(M) > threshold: bool (..., V, D)."""
    cp = _cupy()
    st = _stream(stream, mask)
    with st:
        m = _f32(_u8(mask, "mask"), "mask")
        check_geometry_shape(geometry, m.shape, "image", "mask")
        projection = get_gpu_projector(geometry).forward(m, stream=st)
        trace = cp.empty(projection.shape, dtype=np.uint8)
        _launch(
            "mar.cu",
            "mr_trace",
            projection.size,
            (projection, np.int64(projection.size), np.float32(threshold), trace),
        )
    if _is_torch(mask):
        return _like(trace, mask, None).to(_torch_bool())
    return trace.view(np.bool_)


def li_inpaint(
    sinogram: Array, trace: Array, *, out: Array | None = None, stream: Any = None
) -> Array:
    """LI along the detector across the trace; one thread per (slice, view)."""
    with _stream(stream, sinogram):
        p = _f32(sinogram, "sinogram")
        tr = _u8(trace, "trace")
        if tr.shape != p.shape:
            raise BadInputError(f"trace has shape {tr.shape} but sinogram has shape {p.shape}")
        if p.ndim < 2:
            raise BadInputError(f"sinogram must be at least 2-D (views, bins), got {p.shape}")
        y = _out(out, p.shape)
        rows = int(p.size // p.shape[-1])
        _launch("mar.cu", "mr_li", rows, (p, tr, _i(rows), _i(p.shape[-1]), y))
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
    stream: Any = None,
) -> Array:
    """x ← μ + a·(x − μ) − b·ε̂ + c·z, one fused kernel; ``out=x`` updates in place.

    Argument order as ``mar_rt.models.sde.sample_posterior``'s ``step``.
    """
    with _stream(stream, x):
        xs = _f32(x, "x")
        e, m = _f32(eps, "eps"), _f32(mu, "mu")
        zs = _f32(z, "z") if z is not None else None
        for name, arr in (("eps", e), ("mu", m), ("z", zs)):
            if arr is not None and arr.shape != xs.shape:
                raise BadInputError(f"{name} has shape {arr.shape}, expected x's shape {xs.shape}")
        y = _out(out, xs.shape)
        _launch(
            "fusion.cu",
            "mr_sde_step",
            xs.size,
            (
                xs,
                e,
                m,
                zs if zs is not None else np.uint64(0),
                np.int64(xs.size),
                np.float32(a),
                np.float32(b),
                np.float32(c),
                y,
            ),
        )
    return _like(y, x, out)


def masked_sums(x: Array, valid: Array, *, stream: Any = None) -> Any:
    """Per-slice (n, Σx, Σx²) over ``valid`` pixels: float64 CuPy array (B, 3)."""
    cp = _cupy()
    with _stream(stream, x):
        xs, vs = _f32(x, "x"), _u8(valid, "valid")
        if vs.shape != xs.shape:
            raise BadInputError(f"valid has shape {vs.shape}, expected {xs.shape}")
        b = leading_batch(xs.shape, "x")
        plane = int(xs.shape[-2] * xs.shape[-1])
        sums = cp.zeros((b, 3), dtype=np.float64)
        blocks = max(1, min(64, math.ceil(plane / BLOCK)))
        _kernel("fusion.cu", "mr_masked_sums")(
            (blocks, b), (BLOCK,), (xs, vs, np.int64(plane), sums)
        )
    return sums


def match_stats(
    src: Array, ref: Array, valid: Array, *, out: Array | None = None, stream: Any = None
) -> Array:
    """Norm(src → ref) per slice over ``valid`` (True = non-metal), as ``runtime.osro``."""
    st = _stream(stream, src)
    with st:
        xs, rs = _f32(src, "src"), _f32(ref, "ref")
        if rs.shape != xs.shape:
            raise BadInputError(f"ref has shape {rs.shape}, expected src's shape {xs.shape}")
        sums_src = masked_sums(xs, valid, stream=st)
        sums_ref = masked_sums(rs, valid, stream=st)
        b = leading_batch(xs.shape, "src")
        plane = int(xs.shape[-2] * xs.shape[-1])
        y = _out(out, xs.shape)
        _launch(
            "fusion.cu",
            "mr_match_apply",
            b * plane,
            (xs, sums_src, sums_ref, _i(b), np.int64(plane), y),
        )
    return _like(y, src, out)


def fuse(
    a: Array, b: Array, alpha: float, *, out: Array | None = None, stream: Any = None
) -> Array:
    """α·a + (1 − α)·b, elementwise (1 − α in float64, then float32)."""
    with _stream(stream, a):
        xa, xb = _f32(a, "a"), _f32(b, "b")
        if xb.shape != xa.shape:
            raise BadInputError(f"b has shape {xb.shape}, expected a's shape {xa.shape}")
        y = _out(out, xa.shape)
        _launch(
            "fusion.cu",
            "mr_fuse",
            xa.size,
            (xa, xb, np.int64(xa.size), np.float32(alpha), np.float32(1.0 - float(alpha)), y),
        )
    return _like(y, a, out)
