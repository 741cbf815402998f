"""A PNG a person can check a corrected series with: a few slices with metal, input beside
output, in a soft-tissue and a bone window."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mar_rt.ct.units import mu_to_hu
from mar_rt.runtime.io.common import atomic_file
from mar_rt.runtime.io.dispatch import stored_hu

if TYPE_CHECKING:
    from mar_rt.runtime.study import CorrectedStudy

SOFT_TISSUE_HU = (-160.0, 240.0)  # W 400 / L 40
BONE_HU = (-500.0, 1500.0)  # W 2000 / L 500
MAX_ROWS = 3


def preview_slices(corrected: CorrectedStudy, n: int = MAX_ROWS) -> list[int]:
    """Up to ``n`` slice indices: those with the most metal, in study order; the middle
    slice when none has metal."""
    metal_px = corrected.metal_masks.reshape(len(corrected.keep), -1).sum(1)
    with_metal = np.flatnonzero(metal_px > 0)
    if with_metal.size == 0:
        return [len(corrected.keep) // 2]
    top = with_metal[np.argsort(-metal_px[with_metal], kind="stable")[:n]]
    return sorted(int(i) for i in top)


def write_preview(path: Path, corrected: CorrectedStudy) -> Path:
    """``path`` (PNG): one row per slice of :func:`preview_slices`; columns input and output
    in the soft-tissue window, then input and output in the bone window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = preview_slices(corrected)
    before = stored_hu(corrected.study)
    after = mu_to_hu(corrected.images_mu)
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 3.1 * len(rows)), squeeze=False)
    columns = (
        ("input", before, SOFT_TISSUE_HU),
        ("MAR", after, SOFT_TISSUE_HU),
        ("input", before, BONE_HU),
        ("MAR", after, BONE_HU),
    )
    for r, i in enumerate(rows):
        state = "passed through (no metal)" if corrected.keep[i] else "corrected"
        for c, (label, volume, (lo, hi)) in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(volume[i], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"slice {i + 1}: {label} [{lo:.0f}, {hi:.0f}] HU", fontsize=8)
            ax.axis("off")
        axes[r, 0].text(
            0.01, 0.01, state, transform=axes[r, 0].transAxes, color="yellow", fontsize=7
        )
    fig.suptitle(
        f"{corrected.n_metal_slices} of {len(corrected.keep)} slice(s) with metal corrected "
        f"({corrected.route.replace('_', '-')} route)",
        fontsize=10,
    )
    fig.tight_layout()
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return Path(path)
