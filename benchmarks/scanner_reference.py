"""Re-reference a ``route_cases.py`` folder to each case's own metal-free scan, for ``mar-rt eval``.

``route_cases.py`` scores against the clean slice, so a method that also corrects the
simulator's calibration (beam-hardening correction, scatter) or sharpens its blur scores higher
there without removing more of the metal artifact. Here each case's ``gt.h5`` target becomes
the metal-free, noise-free image of that case's own scan (its settings from ``cases.json``;
``mar_rt.ct.simulate.metal_free_scan``, as ``mar_rt.train.domains.with_scanner_targets``
makes the training targets):

    --kernel pipeline   reconstructed with Ram-Lak, the pipeline's kernel (the measured route)
    --kernel own        with the case's own kernel (the image-only route starts from its image)

The case files (``0.h5``, with the true mask) are linked, not copied. Scoring against this
target measures only what a method does to the metal artifact and the noise.

    python benchmarks/scanner_reference.py VAL VAL_scanner --kernel pipeline
    mar-rt eval VAL_scanner --bundle mar_rt/assets/demo_bundle --methods li,nmar,dudocrop
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from mar_rt.atomic import atomic_file
from mar_rt.ct.sim_settings import SimulationSettings
from mar_rt.ct.simulate import metal_free_scan
from mar_rt.ct.syndeeplesion import read_case, read_image, write_case
from mar_rt.train.pairs import GEOMETRY


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="a route_cases.py folder (with cases.json)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--kernel", choices=("pipeline", "own"), default="pipeline")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    listing = json.loads((args.folder / "cases.json").read_text())
    for c in listing["cases"]:
        src = args.folder / c["case"]
        case = read_case(src / "0.h5")
        image = torch.from_numpy(read_image(src / "gt.h5"))
        scan = metal_free_scan(
            image, torch.from_numpy(case["mask"] > 0.5),
            settings=SimulationSettings.from_dict(c["settings"]), geometry=GEOMETRY,
        )  # fmt: skip
        ref = scan["poly_CT"] if args.kernel == "own" else scan["image"]
        dst = args.out / c["case"]
        write_case(dst, {**scan, "image": ref})
        link = dst / "0.h5"
        if not link.exists():
            link.symlink_to((src / "0.h5").resolve())
    meta = {**listing, "reference": f"scanner ({args.kernel} kernel)"}
    with atomic_file(args.out / "cases.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    print(f"{len(listing['cases'])} cases → {args.out} (scanner reference, {args.kernel} kernel)")


if __name__ == "__main__":
    main()
