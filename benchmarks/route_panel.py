"""A PNG panel for the model card: three evaluation cases of different metal sizes, both routes.

Rows: each case on the measured-sinogram route, then on the image-only route. Columns: input
(``ma_CT``), LI, NMAR, DuDoCROP, target (the clean slice), each titled with its PSNR / SSIM
against the target (metal excluded, ``mar_rt.ct.metrics``), in a W 500 / L 50 HU window. The
methods are run as ``mar-rt eval`` runs them (``mar_rt.runtime.evaluate``): the measured route
sees ``ma_sinogram`` and the true mask; the image-only route sees ``ma_CT`` alone
(Y_ma = FP(ma_CT), mask segmented at μ > 0.672); both through
``mar_rt.runtime.evaluate.method_output``.

Cases: in a ``route_cases.py`` folder, the largest, the median and the smallest implant
(by ``cases.json``), or those named by ``--cases``.

    python benchmarks/route_panel.py VAL --bundle mar_rt/assets/demo_bundle \
        --out mar_rt/assets/demo_bundle/panel_validation.png
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from mar_rt.atomic import atomic_file
from mar_rt.ct import metrics
from mar_rt.ct.syndeeplesion import read_case, read_gt
from mar_rt.ct.units import mu_to_hu
from mar_rt.runtime.evaluate import ROUTES, method_output, seen_mask
from mar_rt.runtime.pipeline import DuDoCROPPipeline

WINDOW_HU = (-200.0, 300.0)  # W 500 / L 50
COLUMN_METHODS = {"input": "input", "LI": "li", "NMAR": "nmar", "DuDoCROP": "dudocrop"}
COLUMNS = (*COLUMN_METHODS, "target")


def pick_cases(folder: Path, names: list[str] | None) -> list[dict]:
    listing = json.loads((folder / "cases.json").read_text())["cases"]
    if names:
        return [c for c in listing if c["case"] in names]
    ordered = sorted(listing, key=lambda c: -c["metal_px"])
    return [ordered[0], ordered[len(ordered) // 2], ordered[-1]]


def run_routes(pipe: DuDoCROPPipeline, case_dir: Path, seed: int) -> dict[str, dict]:
    """route → {"images": column → image (μ), "mask", "target"} for one case."""
    target = torch.from_numpy(read_gt(case_dir / "gt.h5")["image"])
    data = read_case(case_dir / "0.h5")
    mask = torch.from_numpy(np.asarray(data["mask"]) > 0.5)
    proj = pipe.operators.ct_view()
    out = {}
    for route in ROUTES:
        image_only = route == "image_only"
        seen = seen_mask(torch.from_numpy(data["ma_CT"]), mask, image_only)
        images = {
            name: method_output(
                method, data, seen, image_only=image_only, projector=proj,
                filter=pipe.config.fbp_filter, pipeline=pipe, seed=seed, where=case_dir,
            )
            for name, method in COLUMN_METHODS.items()
        }  # fmt: skip
        out[route] = {"images": images | {"target": target}, "mask": mask, "target": target}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--bundle", default="mar_rt/assets/demo_bundle")
    ap.add_argument("--cases", nargs="*")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipe = DuDoCROPPipeline.from_bundle(args.bundle)
    cases = pick_cases(args.folder, args.cases)
    fig, axes = plt.subplots(
        2 * len(cases), len(COLUMNS), figsize=(2.2 * len(COLUMNS), 4.6 * len(cases))
    )
    summary = []
    for i, c in enumerate(cases):
        routes = run_routes(pipe, args.folder / c["case"], args.seed)
        for j, (route, r) in enumerate(routes.items()):
            row = 2 * i + j
            for col, name in enumerate(COLUMNS):
                img = r["images"][name]
                ax = axes[row, col]
                ax.imshow(mu_to_hu(img.numpy()), cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1])
                ax.set_xticks([])
                ax.set_yticks([])
                if name != "target":
                    p = float(metrics.psnr(img, r["target"], r["mask"]))
                    s = float(metrics.ssim(img, r["target"], r["mask"]))
                    ax.set_title(f"{name}\n{p:.2f} dB / {s:.3f}", fontsize=7)
                    summary.append(
                        {"case": c["case"], "route": route, "method": name, "psnr": p, "ssim": s}
                    )
                else:
                    ax.set_title("target", fontsize=7)
            label = "measured" if route == "sinogram" else "image-only"
            axes[row, 0].set_ylabel(f"{c['metal_px']} px, {label}", fontsize=7)
    fig.suptitle(
        f"{args.folder.name}: W 500 / L 50 HU; PSNR / SSIM vs target, metal excluded", fontsize=8
    )
    fig.tight_layout()
    with atomic_file(args.out) as tmp:
        fig.savefig(tmp, dpi=72, format="png")
    plt.close(fig)
    pipe.close()
    print(json.dumps(summary, indent=1))
    print(f"panel: {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
