"""Block-sparse operator tables and the fan-beam rotation symmetry (internal to ``ct``).

Notation (DESIGN.md §4):

    V     n_views;  m  symmetry order (4, 2 or 1);  V_b = V / m base views
    Q     rotation about the isocentre by 360°/m
    R_g   image permutation (R_g I)(p) = I(Q^g p): view g·V_b + k of an operator on I equals
          view k of the same operator on R_g I (sources, detectors and both Joseph branches
          rotate with the views; exact up to float rounding, see ``symmetry_order``)

A table is a sparse matrix stored as CSR row blocks, each owning a slice (or an index list)
of the output rows.  Blocks are made on demand by a builder and kept while the owning
projector's byte budget allows; the rest are rebuilt on every call, so memory stays bounded
for any geometry.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

_ENTRY_TARGET = 4_000_000  # upper bound on generated entries per block (≈ 32 MB per float64 temp)


def symmetry_order(n_rows: int, n_cols: int, n_views: int) -> int:
    """Largest m in (4, 2, 1) with V % m == 0 whose rotation maps the pixel grid onto itself.

    Quarter turns need a square grid; half turns work on any grid.  The symmetric evaluation
    equals the direct one up to float rounding of the view angles, except on rays with
    |d_x| == |d_y| exactly, where the tie rule picks the column branch in both views.
    """
    if n_views % 4 == 0 and n_rows == n_cols:
        return 4
    if n_views % 2 == 0:
        return 2
    return 1


def rotate(image: torch.Tensor, g: int, m: int) -> torch.Tensor:
    """R_g applied to (..., H, W): rotation by g·360°/m, clockwise on the array."""
    return torch.rot90(image, -g * (4 // m), dims=(-2, -1))


def rotate_back(image: torch.Tensor, g: int, m: int) -> torch.Tensor:
    """R_g⁻¹ = R_gᵀ applied to (..., H, W)."""
    return torch.rot90(image, g * (4 // m), dims=(-2, -1))


def csr(
    crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """A CSR tensor with int32 indices (MKL/cuSPARSE run faster on them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly")
        return torch.sparse_csr_tensor(
            crow.to(torch.int32), col.to(torch.int32), val, shape, check_invariants=False
        )


def csr_from_counts(
    counts: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """CSR from per-row entry counts and the entries in row order."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=col.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return csr(crow, col, val, shape)


def csr_nbytes(matrix: torch.Tensor) -> int:
    """Bytes held by a CSR tensor's index and value buffers."""
    parts = (matrix.crow_indices(), matrix.col_indices(), matrix.values())
    return sum(p.numel() * p.element_size() for p in parts)


class Budget:
    """Bytes a projector may still spend on cached blocks, and the lock its tables build under."""

    def __init__(self, nbytes: int) -> None:
        self.left = int(nbytes)
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit; say whether they did."""
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


@dataclass(frozen=True)
class Block:
    """One CSR block and the output rows its rows fill (a slice, or an index tensor)."""

    matrix: torch.Tensor
    rows: slice | torch.Tensor


class BlockTable:
    """A sparse matrix (n_rows, n_cols) as blocks made by ``build(i)``, cached within a budget."""

    def __init__(
        self, n_rows: int, n_blocks: int, build: Callable[[int], Block], budget: Budget
    ) -> None:
        self.n_rows = n_rows
        self._build = build
        self._budget = budget
        self._cache: list[Block | None] = [None] * n_blocks

    @property
    def cached_bytes(self) -> int:
        """Bytes held by the cached blocks."""
        return sum(csr_nbytes(b.matrix) for b in self._cache if b is not None)

    def block(self, i: int) -> Block:
        """Block i, from the cache or freshly built (and cached if the budget allows)."""
        cached = self._cache[i]
        if cached is not None:
            return cached
        with self._budget.lock:  # one build per block when threads share a projector
            cached = self._cache[i]
            if cached is not None:
                return cached
            made = self._build(i)
            if self._budget.take(csr_nbytes(made.matrix)):
                self._cache[i] = made
            return made

    def matmul(self, z: torch.Tensor) -> torch.Tensor:
        """Table @ z for dense z of shape (n_cols, K); returns (n_rows, K)."""
        out = torch.zeros(self.n_rows, z.shape[1], dtype=z.dtype, device=z.device)
        for i in range(len(self._cache)):
            blk = self.block(i)
            out[blk.rows] = blk.matrix @ z
        return out


def chunks(n: int, per_chunk: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..n in pieces of ``per_chunk``."""
    per_chunk = max(1, per_chunk)
    return [(a, min(n, a + per_chunk)) for a in range(0, n, per_chunk)]


def per_chunk(entries_per_item: int) -> int:
    """How many items fit in one block of ``_ENTRY_TARGET`` generated entries."""
    return max(1, _ENTRY_TARGET // max(1, entries_per_item))
