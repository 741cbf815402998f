"""Write held-out evaluation cases in the SynDeepLesion layout, for ``mar-rt eval`` (both routes).

Cases are ``tune_route.make_cases``: clean slices of one split (``mar_rt.train.split``, by
series), one procedural mask each (size groups in turn), each simulated with its own settings
drawn from ``--ranges``:

    training   ``TRAINING_RANGES``, what the clinical recipe trains on (in range)
    held-out   ``HELD_OUT_RANGES``, outside the training intervals (denser metal, fewer
               photons, more scatter and filtration, 3× grid, wider apertures)

Each case is its own folder ``<out>/<case>/gt.h5`` + ``0.h5`` (the ``gt.h5`` target ``image`` is
the clean slice; ``poly_sinogram`` is that case's metal-free scan) and ``0.h5`` carries the true
mask, which ``mar-rt eval`` scores on. ``cases.json`` lists each case's series, size and settings.

    python benchmarks/route_cases.py --split validation --cases 20 --out VAL
    python benchmarks/route_cases.py --split validation --cases 10 --ranges held-out --out OOR
    mar-rt eval VAL --ablations --json val_sinogram.json
    mar-rt eval VAL --ablations --image-only --json val_image_only.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune_route import make_cases, split_slices  # noqa: E402

from mar_rt.atomic import atomic_file  # noqa: E402
from mar_rt.ct.projector import get_projector  # noqa: E402
from mar_rt.ct.sim_settings import HELD_OUT_RANGES, TRAINING_RANGES  # noqa: E402
from mar_rt.ct.syndeeplesion import write_case  # noqa: E402
from mar_rt.train.pairs import GEOMETRY  # noqa: E402

RANGES = {"training": TRAINING_RANGES, "held-out": HELD_OUT_RANGES}
SEED_OFFSET = {"tune": 0, "validation": 100}
"""tune_route.py's seeds per split (its tune / validate modes), so the cases are the ones it
draws for the same split and seed."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", choices=("tune", "validation"), default="validation")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--ranges", choices=sorted(RANGES), default="training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    seed = args.seed + SEED_OFFSET[args.split] + (1000 if args.ranges == "held-out" else 0)
    slices = split_slices(args.data, args.split)
    proj = get_projector(GEOMETRY, device="cpu", dtype=torch.float32)
    cases = make_cases(slices, args.cases, seed, proj, RANGES[args.ranges])
    listing = []
    for c in cases:
        write_case(args.out / c["name"], c["sim"], k=0)
        listing.append(
            {
                "case": c["name"],
                "series": c["series"],
                "metal_px": int(c["mask"].sum()),
                "settings": c["settings"],
            }
        )
    meta = {"split": args.split, "ranges": args.ranges, "seed": seed, "cases": listing}
    with atomic_file(args.out / "cases.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    print(f"{len(cases)} cases ({args.split}, {args.ranges} settings, seed {seed}) → {args.out}")


if __name__ == "__main__":
    main()
