"""Metal detector (``mar_rt.ct.detect``, "do no harm"): false positives on clean real slices,
detection on simulated metal, per size group.

Clean: every slice of ``ct-volumes/*.npz`` (at its own pixel size) and ``clean-ct``. A slice
counts as *dense* when it holds ≥ 20 mm² of bone at ≥ 1200 HU or any pixel ≥ 2500 HU (dense
contrast, calcification: the plain threshold's false positives). A false positive is a clean
slice with ``has_metal``: the runtime would change it.

Simulated: the cases of ``route_cases.py`` folders (random simulator settings, metals Ti, Fe,
Cu, Au, densities), ``ma_CT`` in HU at the case's pixel size (its series' spacing × 512/416;
DeepLesion slices 0.8 mm). Detected: ``has_metal``; recall: the share of true metal pixels
inside the detected mask.

    python benchmarks/detector_rates.py --cases VAL OOR --json detector_rates.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mar_rt.ct.detect import detect_metal
from mar_rt.ct.syndeeplesion import read_case
from mar_rt.ct.units import mu_to_hu
from mar_rt.runtime.evaluate import group_key

DENSE_BONE_HU, DENSE_BONE_MM2, CANDIDATE_HU = 1200.0, 20.0, 2500.0


def clean_slices(data: Path):
    """(name, HU slice, pixel area mm²) of every clean real slice."""
    for npz in sorted((data / "ct-volumes").glob("*.npz")):
        spacing = json.loads(npz.with_suffix(".json").read_text())["spacing_mm"]
        with np.load(npz) as f:
            for k, plane in enumerate(f["hu"]):
                yield f"{npz.stem}/{k}", plane, spacing["x"] * spacing["y"]
    for path in sorted((data / "clean-ct").rglob("*.npy")):
        yield path.stem, np.load(path), (0.8 if "spineweb" in str(path) else 0.6) ** 2


def case_pixel_mm(data: Path, series: str) -> float:
    if series.startswith("ctvol_"):
        meta = json.loads((data / "ct-volumes" / f"{series[6:]}.json").read_text())
        return float(meta["spacing_mm"]["x"]) * 512 / 416
    return 0.8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--cases", type=Path, nargs="*", default=[])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    n = dense = candidates = 0
    flagged = []
    for name, hu, area in clean_slices(args.data):
        n += 1
        bone_mm2 = float((hu >= DENSE_BONE_HU).sum()) * area
        cand = bool((hu >= CANDIDATE_HU).any())
        dense += bone_mm2 >= DENSE_BONE_MM2 or cand
        candidates += cand
        if detect_metal(hu, area).has_metal:
            flagged.append(name)
    clean = {"slices": n, "dense": dense, "above_2500_hu": candidates, "flagged": flagged}
    print(
        f"clean real slices: {n} ({dense} dense: ≥ {DENSE_BONE_MM2:.0f} mm² at ≥ "
        f"{DENSE_BONE_HU:.0f} HU or a pixel ≥ {CANDIDATE_HU:.0f} HU; {candidates} with a "
        f"pixel ≥ {CANDIDATE_HU:.0f} HU); changed (flagged as metal): {len(flagged)}"
    )

    groups: dict[str, dict[str, float]] = {}
    for folder in args.cases:
        listing = json.loads((folder / "cases.json").read_text())["cases"]
        for c in listing:
            data = read_case(folder / c["case"] / "0.h5")
            true = np.asarray(data["mask"]) > 0.5
            pixel = case_pixel_mm(args.data, c["series"])
            det = detect_metal(mu_to_hu(np.asarray(data["ma_CT"])), pixel**2)
            g = groups.setdefault(group_key(int(true.sum())), {"n": 0, "found": 0, "recall": 0.0})
            g["n"] += 1
            g["found"] += det.has_metal
            g["recall"] += float((det.mask & true).sum() / true.sum())
    for key, g in sorted(groups.items(), key=lambda kv: -int(kv[0].rstrip("+").split("-")[0])):
        g["recall"] /= g["n"]
        print(
            f"simulated metal {key:>10} px: found {g['found']}/{g['n']}, "
            f"mean recall of metal pixels {g['recall']:.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"clean": clean, "simulated": groups}, indent=1))


if __name__ == "__main__":
    main()
