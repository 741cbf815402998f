"""Where a method's error lies: near the metal (the artifact) or far from it (calibration).

For each case of a ``mar-rt eval`` folder and each method (run as ``mar-rt eval`` runs it,
``mar_rt.runtime.evaluate.method_output``), against the clean target, in HU:

    near_rms     RMS error within ``--near`` px of the metal (metal excluded): streaks live here
    far_rms      RMS error beyond ``--far`` px of the metal, inside the body (target > −900 HU)
    far_soft     mean error beyond ``--far`` px in soft tissue (target in (−100, 200) HU): a
                 calibration offset (beam-hardening correction, spectrum), not an artifact

Means over cases go to stdout and ``--json``. A method that only shifts ``far_soft`` towards 0
corrects the simulator's calibration; one that lowers ``near_rms`` removes the artifact.

    python benchmarks/error_by_region.py VAL --bundle mar_rt/assets/demo_bundle \
        --json benchmarks/results/error_by_region_val_2026-12-04.json [--image-only]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from mar_rt.atomic import atomic_file
from mar_rt.ct.syndeeplesion import read_case, read_image
from mar_rt.ct.units import mu_to_hu
from mar_rt.runtime.evaluate import (
    find_cases,
    load_test_masks,
    method_output,
    scoring_mask,
    seen_mask,
)
from mar_rt.runtime.pipeline import DuDoCROPPipeline

METHODS = ("li", "nmar", "dudocrop")


def region_errors(
    img_hu: np.ndarray, target_hu: np.ndarray, mask: np.ndarray, near: float, far: float
) -> dict[str, float]:
    """``near_rms``, ``far_rms`` and ``far_soft`` (HU) of one image (module docstring)."""
    dist = distance_transform_edt(~mask)  # px from the nearest metal pixel
    body = target_hu > -900
    e = img_hu - target_hu
    near_r = (dist > 0) & (dist <= near) & body
    far_r = (dist > far) & body
    soft = far_r & (target_hu > -100) & (target_hu < 200)
    return {
        "near_rms": float(np.sqrt((e[near_r] ** 2).mean())),
        "far_rms": float(np.sqrt((e[far_r] ** 2).mean())),
        "far_soft": float(e[soft].mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--bundle", default="mar_rt/assets/demo_bundle")
    ap.add_argument("--image-only", action="store_true")
    ap.add_argument("--near", type=float, default=30.0, help="px")
    ap.add_argument("--far", type=float, default=60.0, help="px")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pipe = DuDoCROPPipeline.from_bundle(args.bundle)
    proj = pipe.operators.ct_view()
    test_masks = load_test_masks(args.folder)
    rows = []
    for case in find_cases(args.folder):
        data = read_case(case.case_path)
        target = mu_to_hu(read_image(case.gt_path))
        mask = scoring_mask(case, data, test_masks, target.shape, args.folder)
        seen = seen_mask(torch.from_numpy(data["ma_CT"]), mask, args.image_only)
        row = {"case": case.name, "metal_px": int(mask.sum())}
        for m in METHODS:
            img = method_output(
                m, data, seen, image_only=args.image_only, projector=proj,
                filter=pipe.config.fbp_filter, pipeline=pipe, where=case.case_path,
            )  # fmt: skip
            row[m] = region_errors(mu_to_hu(img.numpy()), target, mask.numpy(), args.near, args.far)
        rows.append(row)
        rounded = {m: {k: round(v, 1) for k, v in row[m].items()} for m in METHODS}
        print(case.name, row["metal_px"], rounded)
    pipe.close()
    means = {
        m: {
            "near_rms": float(np.mean([r[m]["near_rms"] for r in rows])),
            "far_rms": float(np.mean([r[m]["far_rms"] for r in rows])),
            "far_soft_abs": float(np.mean([abs(r[m]["far_soft"]) for r in rows])),
        }
        for m in METHODS
    }  # the offset's sign differs per case: its size is what a method removes
    route = "image_only" if args.image_only else "sinogram"
    print(f"\nmeans over {len(rows)} cases, {route} route (HU): near_rms, far_rms, |far_soft|")
    for m, v in means.items():
        print(f"{m:<10}{v['near_rms']:8.1f}{v['far_rms']:8.1f}{v['far_soft_abs']:8.1f}")
    if args.json:
        result = {
            "folder": str(args.folder), "bundle": str(args.bundle), "route": route,
            "near_px": args.near, "far_px": args.far, "means": means, "cases": rows,
        }  # fmt: skip
        with atomic_file(args.json) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
