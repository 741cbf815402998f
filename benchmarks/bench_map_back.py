"""Benchmark: how a corrected slice goes back from the bundle grid (416²) to a 512² scanner
grid.  ``resample`` (the default of ``mar_rt.runtime.study``) replaces the slice by R(X_out);
``change`` adds the resampled change map R(X_out − X_g) to the original.  Both against
the input and LI, measured in the same run.

Cases: real 512² clean slices from ``../shared/data/ct-volumes`` with a simulated titanium
implant, simulated at 512² with the series' own pixel size (the SynDeepLesion fan-beam
geometry scaled to that field of view), so the input carries scanner-grid detail the bundle
grid cannot hold.  Scores: PSNR / SSIM at 512² against the clean slice (SynDeepLesion
convention, metal excluded), and the same restricted to pixels farther than 25 px from the
metal ("far"), where nothing should change.

    python benchmarks/bench_map_back.py [--bundle PATH] [--cases 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct-volumes"
CASES = (("pancreas_ct_cb001", 70), ("lidc_chest", 40), ("totalseg_abdomen_dicom", 10))


def _geometry_for(spacing_mm: float, n: int = 512):
    from mar_rt.ct.geometry import FanBeamGeometry

    sdl = FanBeamGeometry.syndeeplesion()
    scale = (n * spacing_mm / 10.0) / (sdl.n_rows * sdl.pixel_size)
    return FanBeamGeometry(
        n_rows=n,
        n_cols=n,
        pixel_size=spacing_mm / 10.0,
        n_views=sdl.n_views,
        n_det=sdl.n_det,
        det_spacing=sdl.det_spacing * scale,
        source_distance=sdl.source_distance * scale,
        detector_distance=sdl.detector_distance * scale,
    )


def _case(name: str, index: int):
    from mar_rt.ct.masks import body_outline, generate_metal_mask
    from mar_rt.ct.simulate import simulate_metal_artifact
    from mar_rt.ct.units import hu_to_mu

    spacing = json.loads((DATA / f"{name}.json").read_text())["spacing_mm"]["x"]
    with np.load(DATA / f"{name}.npz") as data:
        clean = hu_to_mu(data["hu"][index].astype(np.float32))
    mask = generate_metal_mask(
        clean.shape, seed=index, body_mask=body_outline(clean), size_px=600, kind="screw"
    )
    sim = simulate_metal_artifact(
        torch.from_numpy(clean), torch.from_numpy(mask), geometry=_geometry_for(spacing), seed=0
    )
    return clean, mask, sim["ma_CT"].numpy(), sim["LI_CT"].numpy(), spacing


def _scores(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    from mar_rt.ct.metrics import psnr, ssim

    far = ndi.distance_transform_edt(~mask) > 25
    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    return {
        "psnr": float(psnr(p, t, torch.from_numpy(mask))),
        "ssim": float(ssim(p, t, torch.from_numpy(mask))),
        "psnr_far": float(psnr(p, t, torch.from_numpy(~far))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--cases", type=int, default=len(CASES))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from mar_rt.runtime.io.common import Study
    from mar_rt.runtime.study import correct_study, open_pipeline

    torch.set_num_threads(1)
    rows = []
    with open_pipeline(args.bundle, backend="torch", device="cpu") as pipe:
        for name, index in CASES[: args.cases]:
            clean, mask, ma, li, spacing = _case(name, index)
            study = Study(
                images=ma[None].astype(np.float32),
                pixel_spacing_mm=(spacing, spacing),
                positions_mm=np.array([np.nan]),
                source_kind="npy",
                source_paths=(Path(f"{name}_{index}.npy"),),
                stored=ma[None].astype(np.float32),
            )
            row = {"case": f"{name}[{index}]", "metal_px": int(mask.sum())}
            row["input"] = _scores(ma, clean, mask)
            row["li"] = _scores(li, clean, mask)
            for how in ("change", "resample"):
                t0 = time.perf_counter()
                out = correct_study(study, pipe, map_back=how, reinsert_metal=False)
                row[how] = _scores(out.images_mu[0].astype(np.float32), clean, mask)
                row[how]["seconds"] = time.perf_counter() - t0
            rows.append(row)

    head = f"{'case':<28}{'method':<10}{'PSNR':>8}{'SSIM':>8}{'PSNR far':>10}"
    print(head)
    for row in rows:
        for method in ("input", "li", "resample", "change"):
            s = row[method]
            print(
                f"{row['case']:<28}{method:<10}{s['psnr']:>8.2f}{s['ssim']:>8.4f}"
                f"{s['psnr_far']:>10.2f}"
            )
    for key in ("psnr", "ssim", "psnr_far"):
        diff = np.mean([r["change"][key] - r["resample"][key] for r in rows])
        print(f"mean change − resample, {key}: {diff:+.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
