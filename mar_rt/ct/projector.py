"""Joseph fan-beam projector, its exact adjoint, and the Projector that caches their tables.

Notation (lengths in cm; DESIGN.md §4, geometry.py for the orientation):

    s_k, p_kj   source of view k, centre of detector bin j;  d = p − s,  L = |d|
    x_c, y_r    pixel centres of column c and row r;  Δ pixel size;  H × W image I
    column branch (|d_x| ≥ |d_y|, ties included), for every column c:
        t = (x_c − s_x)/d_x,  y = s_y + t·d_y,  r = (H − 1)/2 − y/Δ,  r0 = ⌊r⌋,  f = r − r0
        P_kj += (Δ·L/|d_x|) · [(1 − f)·I[r0, c] + f·I[r0 + 1, c]]    (I = 0 off rows 0..H−1)
    row branch (otherwise), for every row ρ:
        t = (y_ρ − s_y)/d_y,  x = s_x + t·d_x,  q = x/Δ + (W − 1)/2,  q0 = ⌊q⌋,  f = q − q0
        P_kj += (Δ·L/|d_y|) · [(1 − f)·I[ρ, q0] + f·I[ρ, q0 + 1]]    (I = 0 off cols 0..W−1)

P is a line integral (cm × cm⁻¹).  Only samples that can be nonzero are stored (rays clipped
to the image box), which leaves every value unchanged.  The fractional index is evaluated in
the algebraically equal affine form r = α + β·c (float64), which differs from the literal
one by rounding only (tests compare both to 1e-12).

The operator is kept as a sparse matrix A whose columns index the stacked vector
[vec(I); vec(Iᵀ)] (see ``_joseph``): row-branch rays read the row-major image and
column-branch rays its transpose, so that both interpolation neighbours are adjacent in
memory.  With the rotation symmetry of ``_tables`` only the first V/m views are tabulated;
the other views are the same rows applied to rotated images.  The adjoint uses Aᵀ, built
from the same entries (same weights, transposed), so it is exact to rounding.
"""

from __future__ import annotations

import functools

import torch

from mar_rt.ct import _joseph, _tables
from mar_rt.ct._checks import FLOAT_DTYPES, check_operand
from mar_rt.ct._pixel_driven import backprojection_entries
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.ramp import check_filter, filter_sinogram

DEFAULT_TABLE_BYTES = 3 * 2**29  # 1.5 GiB of cached tables per Projector

__all__ = [
    "BackProjectFn",
    "DEFAULT_TABLE_BYTES",
    "ForwardProjectFn",
    "Projector",
    "back_project",
    "forward_project",
    "get_projector",
]


class Projector:
    """Joseph forward projection A, its adjoint Aᵀ and FBP for one geometry, device, dtype.

    Shapes: images (H, W) or (B, H, W), sinograms (V, D) or (B, V, D); the dtype and device
    must be the projector's.  Tables are built on first use, in blocks, and cached while they
    fit in ``max_table_bytes`` (blocks beyond it are rebuilt on every call, so memory stays
    bounded).  ``symmetry=False`` tabulates every view (to test the rotation symmetry).
    """

    def __init__(
        self,
        geometry: FanBeamGeometry,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        max_table_bytes: int = DEFAULT_TABLE_BYTES,
        symmetry: bool = True,
    ) -> None:
        if not isinstance(geometry, FanBeamGeometry):
            raise ValueError(f"geometry must be a FanBeamGeometry, got {type(geometry).__name__}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        _joseph.check_grid(geometry)
        g = geometry
        self.geometry = g
        self.device = _normalise_device(device)
        self.dtype = dtype
        self.m = _tables.symmetry_order(g.n_rows, g.n_cols, g.n_views) if symmetry else 1
        self.n_base_views = g.n_views // self.m
        self._rays: _joseph.Rays | None = None
        budget = _tables.Budget(max_table_bytes)
        h, w = g.image_shape
        n_rays = self.n_base_views * g.n_det

        # Forward: row blocks of views.  Adjoint: row blocks of layout rows, one branch
        # (half of [vec(I); vec(Iᵀ)]) and a range of steps each.  FBP: row blocks of pixels.
        self._view_chunks = _tables.chunks(
            self.n_base_views, _tables.per_chunk(g.n_det * max(h, w) * 2)
        )
        steps_per_block = _tables.per_chunk(2 * n_rays)
        self._step_chunks = [(False, k) for k in _tables.chunks(h, steps_per_block)]
        self._step_chunks += [(True, k) for k in _tables.chunks(w, steps_per_block)]
        self._pixel_chunks = _tables.chunks(h * w, _tables.per_chunk(2 * self.n_base_views))
        self._bp_view_chunks = _tables.chunks(self.n_base_views, _tables.per_chunk(2 * h * w))
        self._a = _tables.BlockTable(n_rays, len(self._view_chunks), self._forward_block, budget)
        self._at = _tables.BlockTable(
            2 * h * w, len(self._step_chunks), self._adjoint_block, budget
        )
        self._bp = _tables.BlockTable(h * w, len(self._pixel_chunks), self._fbp_block, budget)
        # the transpose of the FBP back-projection, for gradients only
        self._bpt = _tables.BlockTable(
            n_rays, len(self._bp_view_chunks), self._fbp_transpose_block, budget
        )

    # --- table blocks -----------------------------------------------------------------------
    def _ray_parameters(self) -> _joseph.Rays:
        if self._rays is None:
            self._rays = _joseph.ray_parameters(self.geometry, self.n_base_views, self.device)
        return self._rays

    def _forward_block(self, i: int) -> _tables.Block:
        g = self.geometry
        r0, r1 = (v * g.n_det for v in self._view_chunks[i])
        rays = self._ray_parameters()
        ids, counts, cols, vals = [], [], [], []
        for column in (True, False):
            sel = torch.nonzero(rays.column[r0:r1] == column).squeeze(1) + r0
            _, e, a, b, n = _joseph.branch_samples(rays, g, sel, column)
            ids.append(sel)
            counts.append(2 * n)
            cols.append(torch.stack([e, e + 1], dim=1).reshape(-1))
            vals.append(torch.stack([a, b], dim=1).reshape(-1).to(self.dtype))
        shape = (r1 - r0, 2 * g.n_rows * g.n_cols)
        matrix = _tables.csr_from_counts(torch.cat(counts), torch.cat(cols), torch.cat(vals), shape)
        return _tables.Block(matrix, torch.cat(ids))  # rows: column-branch rays first

    def _adjoint_block(self, i: int) -> _tables.Block:
        g = self.geometry
        h, w = g.image_shape
        column, (k0, k1) = self._step_chunks[i]
        row0, row1 = (h * w + k0 * h, h * w + k1 * h) if column else (k0 * w, k1 * w)
        rays = self._ray_parameters()
        sel = torch.nonzero(rays.column == column).squeeze(1)
        local, e, a, b, _ = _joseph.branch_samples(rays, g, sel, column, steps=(k0, k1))
        key = (torch.stack([e, e + 1], dim=1).reshape(-1) - row0).to(torch.int32)
        order = torch.sort(key, stable=True).indices  # keeps rays ascending inside a row
        ray = sel.to(torch.int32).index_select(0, local).repeat_interleave(2)
        col = ray.index_select(0, order)
        val = torch.stack([a, b], dim=1).reshape(-1).to(self.dtype).index_select(0, order)
        counts = torch.bincount(key, minlength=row1 - row0)
        matrix = _tables.csr_from_counts(counts, col, val, (row1 - row0, rays.column.numel()))
        return _tables.Block(matrix, slice(row0, row1))

    def _fbp_block(self, i: int) -> _tables.Block:
        g = self.geometry
        p0, p1 = self._pixel_chunks[i]
        col, val = backprojection_entries(g, (p0, p1), (0, self.n_base_views), self.device)
        crow = torch.arange(p1 - p0 + 1, device=self.device) * col.shape[1]
        shape = (p1 - p0, self.n_base_views * g.n_det)
        matrix = _tables.csr(crow, col.reshape(-1), val.reshape(-1).to(self.dtype), shape)
        return _tables.Block(matrix, slice(p0, p1))

    def _fbp_transpose_block(self, i: int) -> _tables.Block:
        g = self.geometry
        hw = g.n_rows * g.n_cols
        k0, k1 = self._bp_view_chunks[i]
        col, val = backprojection_entries(g, (0, hw), (k0, k1), self.device)
        key = (col.reshape(-1) - k0 * g.n_det).to(torch.int32)
        order = torch.sort(key, stable=True).indices  # keeps pixels ascending inside a row
        pixel = torch.arange(hw, dtype=torch.int32, device=self.device)
        pixel = pixel.repeat_interleave(col.shape[1]).index_select(0, order)
        val = val.reshape(-1).to(self.dtype).index_select(0, order)
        counts = torch.bincount(key, minlength=(k1 - k0) * g.n_det)
        matrix = _tables.csr_from_counts(counts, pixel, val, ((k1 - k0) * g.n_det, hw))
        return _tables.Block(matrix, slice(k0 * g.n_det, k1 * g.n_det))

    @property
    def table_bytes(self) -> int:
        """Bytes held by cached tables now."""
        tables = (self._a, self._at, self._bp, self._bpt)
        return sum(t.cached_bytes for t in tables)

    # --- operators --------------------------------------------------------------------------
    def _check(self, x: object, kind: str, name: str) -> torch.Tensor:
        x = check_operand(x, self.geometry, kind, name)
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(
                f"{name} is {x.dtype} on {x.device}, but this Projector is {self.dtype} on "
                f"{self.device}"
            )
        return x

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward(image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """A·image: (…, H, W) μ in cm⁻¹ → (…, V, D) line integrals.  Differentiable (Aᵀ)."""
        self._check(image, "image", "image")
        if image.requires_grad and torch.is_grad_enabled():
            return ForwardProjectFn.apply(image, self)
        return self._forward(image)

    def adjoint(self, sinogram: torch.Tensor) -> torch.Tensor:
        """Aᵀ·sinogram: (…, V, D) → (…, H, W), the exact adjoint of :meth:`forward`."""
        self._check(sinogram, "sinogram", "sinogram")
        if sinogram.requires_grad and torch.is_grad_enabled():
            return BackProjectFn.apply(sinogram, self)
        return self._adjoint(sinogram)

    def fbp(self, sinogram: torch.Tensor, filter: str = "ram-lak") -> torch.Tensor:
        """Fan-beam FBP (see :mod:`mar_rt.ct.fbp`): (…, V, D) → μ image (…, H, W) in cm⁻¹.

        Differentiable: the back-projection's backward is its exact transpose (a table built
        on the first backward call).
        """
        self._check(sinogram, "sinogram", "sinogram")
        check_filter(filter)
        q = filter_sinogram(sinogram, self.geometry, filter)
        if q.requires_grad and torch.is_grad_enabled():
            return _PixelBackprojectFn.apply(q, self)
        return self._image_from_views(q, self._bp, layouts=1)

    def _forward(self, image: torch.Tensor) -> torch.Tensor:
        return self._views_from_image(image, self._a, layouts=2)

    def _views_from_image(
        self, image: torch.Tensor, table: _tables.BlockTable, layouts: int
    ) -> torch.Tensor:
        """Views of group g = table @ R_g(image); columns index [vec(I); vec(Iᵀ)][:layouts·HW]."""
        g, m = self.geometry, self.m
        batch = image.shape[:-2]
        x = image.reshape(-1, g.n_rows, g.n_cols)
        b, hw = x.shape[0], g.n_rows * g.n_cols
        if b == 0:
            return image.new_zeros(*batch, g.n_views, g.n_det)
        cols = []
        for k in range(m):
            rot = _tables.rotate(x, k, m)
            parts = [rot.reshape(b, hw), rot.transpose(-1, -2).reshape(b, hw)][:layouts]
            cols.append(torch.cat(parts, 1))
        z = torch.stack(cols, dim=1).reshape(b * m, layouts * hw).t().contiguous()
        y = table.matmul(z)  # (V_b·D, B·m)
        y = y.reshape(self.n_base_views, g.n_det, b, m).permute(2, 3, 0, 1)
        return y.reshape(*batch, g.n_views, g.n_det)

    def _adjoint(self, sinogram: torch.Tensor) -> torch.Tensor:
        return self._image_from_views(sinogram, self._at, layouts=2)

    def _image_from_views(
        self, sinogram: torch.Tensor, table: _tables.BlockTable, layouts: int
    ) -> torch.Tensor:
        """Σ_g R_gᵀ(table @ views of group g); table rows index [vec(I); vec(Iᵀ)][:layouts·HW]."""
        g, m = self.geometry, self.m
        h, w = g.image_shape
        batch = sinogram.shape[:-2]
        y = sinogram.reshape(-1, g.n_views * g.n_det)
        b = y.shape[0]
        if b == 0:
            return sinogram.new_zeros(*batch, h, w)
        z = y.reshape(b * m, self.n_base_views * g.n_det).t().contiguous()
        out = table.matmul(z).t().reshape(b, m, layouts * h * w)
        image = torch.zeros(b, h, w, dtype=sinogram.dtype, device=sinogram.device)
        for k in range(m):
            part = out[:, k, : h * w].reshape(b, h, w)
            if layouts == 2:
                part = part + out[:, k, h * w :].reshape(b, w, h).transpose(-1, -2)
            image += _tables.rotate_back(part, k, m)
        return image.reshape(*batch, h, w)


class ForwardProjectFn(torch.autograd.Function):
    """y = A x with backward Aᵀ (nothing else).  Not for exportable networks."""

    @staticmethod
    def forward(ctx, image: torch.Tensor, projector: Projector) -> torch.Tensor:  # type: ignore[override]
        ctx.projector = projector
        return projector._forward(image)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.projector._adjoint(grad.contiguous()), None


class BackProjectFn(torch.autograd.Function):
    """x = Aᵀ y with backward A (nothing else).  Not for exportable networks."""

    @staticmethod
    def forward(ctx, sinogram: torch.Tensor, projector: Projector) -> torch.Tensor:  # type: ignore[override]
        ctx.projector = projector
        return projector._adjoint(sinogram)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.projector._forward(grad.contiguous()), None


def _normalise_device(device: torch.device | str | None) -> torch.device:
    """CPU by default; a bare "cuda" becomes the current CUDA device, as tensors report it."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class _PixelBackprojectFn(torch.autograd.Function):
    """The FBP back-projection of a filtered sinogram, with its exact transpose as backward."""

    @staticmethod
    def forward(ctx, filtered: torch.Tensor, projector: Projector) -> torch.Tensor:  # type: ignore[override]
        ctx.projector = projector
        return projector._image_from_views(filtered, projector._bp, layouts=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        projector = ctx.projector
        return projector._views_from_image(grad.contiguous(), projector._bpt, layouts=1), None


@functools.lru_cache(maxsize=4)
def _cached_projector(geometry: FanBeamGeometry, device: str, dtype: torch.dtype) -> Projector:
    return Projector(geometry, device=device, dtype=dtype)


def get_projector(
    geometry: FanBeamGeometry,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Projector:
    """A shared Projector for (geometry, device, dtype); the last four are kept."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return _cached_projector(geometry, str(_normalise_device(device)), dtype)


def forward_project(image: torch.Tensor, geometry: FanBeamGeometry) -> torch.Tensor:
    """Joseph line integrals of a μ image (…, H, W) in cm⁻¹ → sinogram (…, V, D)."""
    check_operand(image, geometry, "image", "image")
    return get_projector(geometry, image.device, image.dtype).forward(image)


def back_project(sinogram: torch.Tensor, geometry: FanBeamGeometry) -> torch.Tensor:
    """Exact adjoint of :func:`forward_project`: sinogram (…, V, D) → image (…, H, W)."""
    check_operand(sinogram, geometry, "sinogram", "sinogram")
    return get_projector(geometry, sinogram.device, sinogram.dtype).adjoint(sinogram)
