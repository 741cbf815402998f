"""Quality-assurance record of one pipeline call: what was done to each slice, and a
data-consistency figure an integrator can check without a ground truth.

Notation (DESIGN.md §8):

    Y_ma      the sinogram the pipeline used (measured, or FP(X_ma) when synthetic)
    Tr        metal trace FP(M) > 0
    FP(X)     forward projection of an image (line integrals, dimensionless)
    DC(X)     mean over bins outside Tr of |FP(X) − Y_ma|    (``data_consistency_error``)

Outside the trace the measured data are trustworthy, so DC(output) says how far the corrected
image strays from the measurement there; DC(X_LI) is reported beside it as the reference.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


def data_consistency_error(
    sino_pred: torch.Tensor, sino_meas: torch.Tensor, trace: torch.Tensor
) -> torch.Tensor:
    """Mean |sino_pred − sino_meas| over the bins outside ``trace``, per slice.

    Args:
        sino_pred: FP of a corrected image, (B, V, D).
        sino_meas: the measured (or synthetic) sinogram, (B, V, D).
        trace: bool metal trace, (B, V, D).

    Returns:
        (B,) float64 tensor of line-integral errors (0 where every bin lies in the trace).
    """
    outside = (~trace).to(torch.float64)
    diff = (sino_pred.to(torch.float64) - sino_meas.to(torch.float64)).abs() * outside
    n = outside.sum(dim=(-2, -1)).clamp(min=1.0)
    return diff.sum(dim=(-2, -1)) / n


@dataclass(frozen=True, kw_only=True)
class SliceQA:
    """What the pipeline did to one slice.

    Attributes:
        index: slice index within the call.
        metal_px: metal pixels in the mask used (on the bundle's grid).
        metal_found: False when the mask was empty; the slice was then passed through.
        sinogram_synthetic: True when Y_ma = FP(X_ma) (no measured sinogram was given).
        dc_error_output: DC(X_out), line-integral units (None when passed through).
        dc_error_li: DC(X_LI), the same figure for LI (None when passed through).
        steps: reverse-SDE steps per loop.
        seed: the pipeline seed.
        resampled_from: the input's (H, W) when it was resampled to the bundle grid.
        fp32_reruns: stages whose fp16 output held NaN/inf and were rerun in fp32.
        notes: human-readable remarks (no metal, metal on the edge, ...).
    """

    index: int
    metal_px: int
    metal_found: bool
    sinogram_synthetic: bool
    dc_error_output: float | None
    dc_error_li: float | None
    steps: int
    seed: int
    resampled_from: tuple[int, int] | None = None
    fp32_reruns: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def passed_through(self) -> bool:
        """True when the output is the input (no metal)."""
        return not self.metal_found

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed_through"] = self.passed_through
        d["resampled_from"] = list(self.resampled_from) if self.resampled_from else None
        d["fp32_reruns"] = list(self.fp32_reruns)
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True, kw_only=True)
class QARecord:
    """The QA record of one pipeline call: one ``SliceQA`` per slice plus run facts
    (backend, device, bundle, which FP/FBP operators ran, the pipeline config that ran and
    the route: ``"sinogram"`` with a measured sinogram, ``"image_only"`` when Y_ma = FP(X_ma)
    or the sinogram was not measured)."""

    slices: tuple[SliceQA, ...]
    backend: str
    device: str
    bundle: str
    operators: str = "ct"
    config: dict[str, Any] = field(default_factory=dict)
    route: str = "sinogram"

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def n_passed_through(self) -> int:
        return sum(s.passed_through for s in self.slices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "device": self.device,
            "bundle": self.bundle,
            "operators": self.operators,
            "config": dict(self.config),
            "route": self.route,
            "slices": [s.to_dict() for s in self.slices],
        }

    @staticmethod
    def merge(records: Sequence[QARecord]) -> QARecord:
        """Concatenate records of consecutive calls (slice indices renumbered)."""
        if not records:
            raise ValueError("QARecord.merge: no records")
        slices = []
        for rec in records:
            for s in rec.slices:
                slices.append(dataclasses.replace(s, index=len(slices)))
        first = records[0]
        return QARecord(
            slices=tuple(slices),
            backend=first.backend,
            device=first.device,
            bundle=first.bundle,
            operators=first.operators,
            config=first.config,
            route=first.route,
        )

    def table(self) -> str:
        """A fixed-width text table, one row per slice."""
        head = f"{'slice':>5} {'metal px':>8} {'DC out':>9} {'DC LI':>9} {'sino':>9}  notes"
        rows = [head]
        for s in self.slices:
            dc_o = "-" if s.dc_error_output is None else f"{s.dc_error_output:.4f}"
            dc_l = "-" if s.dc_error_li is None else f"{s.dc_error_li:.4f}"
            sino = "synthetic" if s.sinogram_synthetic else "measured"
            notes = list(s.notes) + [f"fp32 rerun: {r}" for r in s.fp32_reruns]
            rows.append(
                f"{s.index:>5} {s.metal_px:>8} {dc_o:>9} {dc_l:>9} {sino:>9}  {'; '.join(notes)}"
            )
        return "\n".join(rows)


def _edge_touching(mask: torch.Tensor) -> list[bool]:
    """Per slice: does any metal pixel lie on the first/last row or column?"""
    edge = (
        mask[:, 0, :].any(1) | mask[:, -1, :].any(1) | mask[:, :, 0].any(1) | mask[:, :, -1].any(1)
    )
    return [bool(v) for v in edge.tolist()]


def slice_qa_record(
    projector: Any,
    *,
    x_out: torch.Tensor,
    x_li: torch.Tensor,
    y_ma: torch.Tensor,
    trace: torch.Tensor,
    mask: torch.Tensor,
    synthetic: bool,
    steps: int,
    seed: int,
    resampled_from: tuple[int, int] | None,
    reruns: dict[int, list[str]],
    backend: str,
    device: str,
    bundle: str,
    operators: str,
    config: dict[str, Any],
) -> QARecord:
    """The QA record of one pipeline call: per slice DC(X_out) and DC(X_LI) outside the trace
    (metal slices; ``projector.forward`` is FP), metal size, pass-through, edge contact, fp32
    reruns; plus the run facts.  Shapes: images (B, H, W), sinograms and trace (B, V, D)."""
    metal_px = [int(v) for v in mask.sum(dim=(-2, -1)).tolist()]
    metal_idx = [i for i, n in enumerate(metal_px) if n > 0]
    dc_out: list[float | None] = [None] * len(metal_px)
    dc_li: list[float | None] = [None] * len(metal_px)
    if metal_idx:
        sel = torch.tensor(metal_idx, device=x_out.device)
        fp_out, fp_li = projector.forward(x_out[sel]), projector.forward(x_li[sel])
        e_out = data_consistency_error(fp_out, y_ma[sel], trace[sel]).tolist()
        e_li = data_consistency_error(fp_li, y_ma[sel], trace[sel]).tolist()
        for j, i in enumerate(metal_idx):
            dc_out[i], dc_li[i] = e_out[j], e_li[j]
    edges = _edge_touching(mask)
    slices = []
    for i, n in enumerate(metal_px):
        notes = []
        if n == 0:
            notes.append("no metal found: passed through unchanged")
        if edges[i]:
            log.warning("slice %d: metal touches the image edge", i)
            notes.append("metal touches the image edge: its trace may be incomplete")
        slices.append(
            SliceQA(
                index=i,
                metal_px=n,
                metal_found=n > 0,
                sinogram_synthetic=synthetic,
                dc_error_output=dc_out[i],
                dc_error_li=dc_li[i],
                steps=steps,
                seed=seed,
                resampled_from=resampled_from,
                fp32_reruns=tuple(reruns.get(i, ())),
                notes=tuple(notes),
            )
        )
    return QARecord(
        slices=tuple(slices),
        backend=backend,
        device=device,
        bundle=bundle,
        operators=operators,
        config=config,
        route="image_only" if synthetic else "sinogram",
    )
