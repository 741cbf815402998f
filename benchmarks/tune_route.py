"""Tune α and the OSRO switches per route (DESIGN §8 "Image-only input") on held-out series,
then check the choice on other held-out series.

Cases: clean slices of one split (``mar_rt.train.split.split_by_series``: ``tune`` or
``validation``, never a series the bundle or the other split uses), each with a procedural
metal mask (``mar_rt.ct.masks.generate_metal_mask``, size groups in turn) simulated with
settings drawn by ``SimulationRanges.sample`` (finer grid, aperture, spectrum, BHC, scatter,
kernel, metal and density vary), so the cases do not carry the simulator's default signature.

Routes: ``sinogram`` (the simulated ma_sinogram, measured, and the true mask) and
``image_only`` (ma_CT alone: Y_ma = FP(ma_CT), mask segmented at μ > 0.672), as
``mar-rt eval`` / ``mar-rt eval --image-only`` run them. LI and NMAR run on the same inputs.

Grid. The pipeline runs once per (μ source, DuDoCLIP on/off, OSRO fidelity) with α = 1 and
Norm² off, keeping
X_p, X'_p and X̂_p = X'_p + R̂; every (residual on/off, Norm² on/off, α) variant is then the
pipeline's own steps 4–6 on those tensors (``mar_rt.runtime.osro``), exactly what the
pipeline would output with those switches (residual off: X̂_p = X'_p).

Scores: PSNR / SSIM against the clean slice, metal excluded (the SynDeepLesion convention,
``mar_rt.ct.metrics``), per size group. ``--reference scanner`` scores against each case's own
metal-free, noise-free scan instead (``mar_rt.ct.simulate.metal_free_scan``: Ram-Lak on the
measured route, the case's kernel on the image-only route), so only what a method does to the
metal artifact and the noise counts, not the simulator's calibration and resolution.

    python benchmarks/tune_route.py tune --cases 35 \
        --out benchmarks/results/tune_route_2026-12-03.json
    python benchmarks/tune_route.py validate --cases 30 \
        --choice benchmarks/results/tune_route_2026-12-03.json \
        --out benchmarks/results/validate_route_2026-12-03.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mar_rt.ct import metrics
from mar_rt.ct.masks import SIZE_GROUPS, body_outline, generate_metal_mask, size_limits
from mar_rt.ct.sim_settings import TRAINING_RANGES, SimulationRanges
from mar_rt.ct.simulate import metal_free_scan, simulate_metal_artifact
from mar_rt.runtime import osro
from mar_rt.runtime.config import ROUTES, PipelineConfig
from mar_rt.runtime.evaluate import group_key, method_output, seen_mask
from mar_rt.runtime.pipeline import DuDoCROPPipeline
from mar_rt.train.sources import CleanSlice, read_ct_volume, series_id, shared_data_slices
from mar_rt.train.split import series_split, split_by_series

log = logging.getLogger("tune_route")

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
MU_SOURCES = ("nmar", "li")
USE_CLIP = (True, False)
FIDELITY = (True, False)
RESIDUAL = (True, False)
NORM2 = (False, True)
SWITCHES = ("mu_source", "use_clip", "osro_fidelity", "osro_residual", "norm2")
"""The pipeline switches the grid varies besides α (``PipelineConfig`` fields)."""
KEY_FIELDS = (*SWITCHES, "alpha")


def variant_key(v: dict[str, Any]) -> str:
    return (
        f"mu={v['mu_source']} clip={int(v['use_clip'])} fid={int(v['osro_fidelity'])} "
        f"res={int(v['osro_residual'])} norm2={int(v['norm2'])} a={v['alpha']:.2f}"
    )


def grid() -> list[dict[str, Any]]:
    return [
        {
            "mu_source": m,
            "use_clip": c,
            "osro_fidelity": f,
            "osro_residual": r,
            "norm2": n,
            "alpha": a,
        }  # fmt: skip
        for m in MU_SOURCES
        for c in USE_CLIP
        for f in FIDELITY
        for r in RESIDUAL
        for n in NORM2
        for a in ALPHAS
    ]


# ------------------------------------------------------------------------------ cases
def split_slices(data: Path, split: str) -> list[CleanSlice]:
    """Every clean slice of ``split``: the ct-volumes series assigned to it, and the shared
    slices (DeepLesion patients) assigned to it."""
    vols = data / "ct-volumes"
    files = [f for f in sorted(vols.glob("*.npz")) if series_split(f"ctvol_{f.stem}") == split]
    slices: list[CleanSlice] = []
    for f in files:
        slices += read_ct_volume(f)
    slices += shared_data_slices(data)
    return split_by_series(slices)[split]


def make_cases(
    slices: list[CleanSlice],
    n: int,
    seed: int,
    proj: Any,
    ranges: SimulationRanges = TRAINING_RANGES,
    reference: str = "clean",
) -> list[dict[str, Any]]:
    """``n`` simulated cases, slices spread evenly, size groups in turn, settings drawn from
    ``ranges``; ``targets`` per route: the clean slice, or with ``reference="scanner"`` the
    case's metal-free scan (module docstring)."""
    picks = np.linspace(0, len(slices) - 1, n).round().astype(int)
    cases = []
    for i, j in enumerate(picks):
        s = slices[int(j)]
        rng = np.random.default_rng([seed, i])
        settings = ranges.sample(rng)
        group = SIZE_GROUPS[i % len(SIZE_GROUPS)]
        lo_lim, hi_lim = size_limits(s.image_mu.shape)
        lo, hi = max(group.lo, lo_lim, 30), min(group.hi, hi_lim, 2500)
        size = int(np.exp(rng.uniform(np.log(lo), np.log(hi - 1))))
        body = body_outline(s.image_mu)
        mask = None
        for attempt in range(20):
            try:
                mask = generate_metal_mask(
                    s.image_mu.shape, seed=[seed, i, attempt], body_mask=body, size_px=size
                )
                break
            except ValueError:
                continue
        if mask is None:
            log.warning("%s: no %d px mask fits; case skipped", s.slice_id, size)
            continue
        target = torch.from_numpy(s.image_mu)
        sim = simulate_metal_artifact(
            target, torch.from_numpy(mask), settings=settings, seed=seed * 1000 + i, projector=proj
        )
        targets = {"sinogram": target, "image_only": target}
        if reference == "scanner":
            scan = metal_free_scan(
                target, torch.from_numpy(mask), settings=settings, projector=proj,
                filter="ram-lak",
            )  # fmt: skip
            targets = {"sinogram": scan["image"].cpu(), "image_only": scan["poly_CT"].cpu()}
        cases.append(
            {
                "name": f"{s.slice_id}_m{i:02d}",
                "slice_id": s.slice_id,
                "series": series_id(s),
                "settings": settings.to_dict(),
                "mask": torch.from_numpy(mask),
                "target": target,
                "targets": targets,
                "ma_ct": sim["ma_CT"].float().cpu(),
                "ma_sino": sim["ma_sinogram"].float().cpu(),
                "li_sino": sim["LI_sinogram"].float().cpu(),
                "sim": sim,
            }
        )
    return cases


# ------------------------------------------------------------------------------ scoring
def score(img: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [float(metrics.psnr(img, target, mask)), float(metrics.ssim(img, target, mask))]


def variants_from(inter: dict[str, torch.Tensor], method_mask: torch.Tensor, wanted):
    """(variant, output) for the (residual, Norm², α) variants in ``wanted`` from one run's
    intermediates (the pipeline's steps 4–6, ``mar_rt.runtime.osro``)."""
    x_p, x_pp, x_hat = inter["x_p"], inter["x_p_prime"], inter["x_hat_p"]
    valid = ~inter["mask"]
    if not bool(inter["mask"].any()):  # nothing segmented: the pipeline passes X_ma through
        for v in wanted:
            yield v, inter["x_ma"][0]
        return
    for v in wanted:
        xh = x_hat if v["osro_residual"] else x_pp
        xh = osro.match_stats(xh, x_p, valid) if v["norm2"] else xh
        yield v, osro.fuse(xh, x_p, v["alpha"])[0]


def osro_without_fidelity(
    pipe: DuDoCROPPipeline, inter: dict[str, torch.Tensor], seed: int
) -> dict[str, torch.Tensor]:
    """OSRO with ``osro_fidelity`` off on the priors X_p, Y_p of a finished call (the DAPG loops
    do not depend on OSRO's switches, so they are not run again): the pipeline's own ``osro``
    step on a one-slice batch seeded as the call seeded it (``slice_seed(seed, 0)``)."""
    from mar_rt.runtime.pipeline import _Batch, slice_seed  # the pipeline's batch record

    off = pipe.with_config(pipe.config.replace(osro_fidelity=False))
    b = _Batch(
        index=[0], x_ma=inter["x_ma"], y_ma=inter["y_ma"], mask=inter["mask"],
        trace=inter["trace"], x_li=inter["x_li"], y_li=inter["y_li"], seed=slice_seed(seed, 0),
    )  # fmt: skip
    emb = off.embed(off.graphs, b.x_ma, b.y_ma)
    off.osro(b, emb, inter["x_p"], inter["y_p"], off.config.steps, None)
    return b.out


def run_case(
    base: DuDoCROPPipeline,
    case: dict[str, Any],
    route: str,
    wanted: list[dict[str, Any]],
    seed: int,
) -> dict[str, Any]:
    target, mask, ma_ct = case["targets"][route], case["mask"], case["ma_ct"]
    image_only = route == "image_only"
    method_mask = seen_mask(ma_ct, mask, image_only)
    sino = None if image_only else case["ma_sino"]
    data = {
        "ma_CT": ma_ct.numpy(), "ma_sinogram": case["ma_sino"].numpy(),
        "LI_sinogram": case["li_sino"].numpy(),
    }  # fmt: skip
    proj = base.operators.ct_view()
    row: dict[str, Any] = {
        m: score(
            method_output(
                m, data, method_mask, image_only=image_only, projector=proj,
                filter=base.config.fbp_filter,
            ),
            target, mask,
        )
        for m in ("input", "li", "nmar")
    }  # fmt: skip
    row["segmented_px"] = int(method_mask.sum())
    scores: dict[str, list[float]] = {}
    for mu, clip in ((m, c) for m in MU_SOURCES for c in USE_CLIP):
        sub = [v for v in wanted if (v["mu_source"], v["use_clip"]) == (mu, clip)]
        if not sub:
            continue
        cfg = base.config.replace(
            mu_source=mu, use_clip=clip, osro_fidelity=True, osro_residual=True, norm2=False,
            alpha=1.0, image_only=None,
        )  # fmt: skip
        pipe = base.with_config(cfg)
        out = pipe(
            ma_ct, sinogram=sino, sinogram_is_measured=not image_only, mask=method_mask, seed=seed
        )
        assert out.qa.route == route
        inter = out.intermediates
        for fid in FIDELITY:
            fsub = [v for v in sub if v["osro_fidelity"] == fid]
            if fsub and not fid and bool(inter["mask"].any()):
                inter = {**inter, **osro_without_fidelity(pipe, inter, seed)}
            for v, img in variants_from(inter, method_mask, fsub):
                scores[variant_key(v)] = score(img.cpu(), target, mask)
    row["dudocrop"] = scores
    return row


# ------------------------------------------------------------------------------ summary
def summarise(rows: list[dict[str, Any]], route: str) -> dict[str, Any]:
    """method/variant → {"psnr", "ssim", "groups": {range: {"psnr", "ssim", "n"}}}."""
    names = ["input", "li", "nmar"] + list(rows[0][route]["dudocrop"])
    out = {}
    for name in names:
        vals = []
        for r in rows:
            cell = (
                r[route]["dudocrop"][name]
                if name not in ("input", "li", "nmar")
                else r[route][name]
            )
            vals.append((group_key(r["metal_px"]), cell))
        groups: dict[str, dict[str, float]] = {}
        for g, (p, s) in vals:
            e = groups.setdefault(g, {"psnr": 0.0, "ssim": 0.0, "n": 0})
            e["psnr"] += p
            e["ssim"] += s
            e["n"] += 1
        for e in groups.values():
            e["psnr"] /= e["n"]
            e["ssim"] /= e["n"]
        order = sorted(groups, key=lambda k: -int(k.rstrip("+").split("-")[0]))
        out[name] = {
            "psnr": float(np.mean([c[0] for _, c in vals])),
            "ssim": float(np.mean([c[1] for _, c in vals])),
            "groups": {k: groups[k] for k in order},
        }
    return out


def table(summary: dict[str, Any], names: list[str], title: str) -> str:
    groups = list(next(iter(summary.values()))["groups"])
    head = f"{'method':<44}" + "".join(f"{g + ' px':>17}" for g in groups) + f"{'mean':>17}"
    lines = [title, head]
    for n in names:
        s = summary[n]
        cells = "".join(
            f"{s['groups'][g]['psnr']:>8.2f} / {s['groups'][g]['ssim']:.4f}"
            if g in s["groups"]
            else f"{'-':>17}"
            for g in groups
        )
        lines.append(f"{n:<44}{cells}{s['psnr']:>8.2f} / {s['ssim']:.4f}")
    return "\n".join(lines)


def best(summary: dict[str, Any]) -> str:
    """The variant of highest mean PSNR among those whose mean SSIM beats both LI's and
    NMAR's (issue 21's SSIM target); among all variants when none does."""
    keys = [k for k in summary if k.startswith("mu=")]
    floor = max(summary["li"]["ssim"], summary["nmar"]["ssim"])
    keys = [k for k in keys if summary[k]["ssim"] > floor] or keys
    return max(keys, key=lambda k: (round(summary[k]["psnr"], 3), summary[k]["ssim"]))


def parse_key(key: str) -> dict[str, Any]:
    parts = dict(p.split("=") for p in key.split())
    return {
        "mu_source": parts["mu"],
        "use_clip": parts.get("clip", "1") == "1",  # keys written before DuDoCLIP was a switch
        "osro_fidelity": parts["fid"] == "1",
        "osro_residual": parts["res"] == "1",
        "norm2": parts["norm2"] == "1",
        "alpha": float(parts["a"]),
    }


def overrides(key: str, base: PipelineConfig) -> dict[str, Any]:
    """The switches of ``key`` that differ from ``base`` (what ``image_only`` would hold)."""
    v = parse_key(key)
    return {k: val for k, val in v.items() if getattr(base, k) != val}


# ------------------------------------------------------------------------------ main
def check_reuse(base: DuDoCROPPipeline, case: dict[str, Any], seed: int) -> float:
    """max |X_out| difference between ``osro_without_fidelity`` and a full call with the
    fidelity step off (measured route, μ = NMAR, α = 1): the reuse must be the pipeline."""
    cfg = base.config.replace(mu_source="nmar", alpha=1.0, norm2=False, image_only=None)
    kw = {"sinogram": case["ma_sino"], "sinogram_is_measured": True, "mask": case["mask"]}
    on = base.with_config(cfg)(case["ma_ct"], seed=seed, **kw).intermediates
    full = base.with_config(cfg.replace(osro_fidelity=False))(case["ma_ct"], seed=seed, **kw)
    reuse = osro_without_fidelity(base.with_config(cfg), on, seed)
    return float((reuse["x_out"] - full.intermediates["x_out"]).abs().max())


def report(tune: dict[str, Any], val: dict[str, Any]) -> str:
    """The tune split's choice per route, scored on the validation split beside the current
    config, LI and NMAR."""
    out = []
    for route in ROUTES:
        cur = tune["current"]
        pick, cur = tune["chosen"][route], cur[route] if isinstance(cur, dict) else cur
        names = ["input", "li", "nmar", cur] + ([pick] if pick != cur else [])
        for split, res in (("tune", tune), ("validation", val)):
            title = f"\n{route} route, {split} split ({res['n_cases']} cases, {res['series']})"
            out.append(table(res["summary"][route], names, title))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("tune", "validate", "report"))
    ap.add_argument("--bundle", default="mar_rt/assets/demo_bundle")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mu", nargs="+", default=["nmar"], choices=MU_SOURCES)
    ap.add_argument("--clip", nargs="+", type=int, default=[1, 0], choices=(1, 0))
    ap.add_argument("--check", action="store_true", help="verify the fidelity-off reuse first")
    ap.add_argument("--reference", choices=("clean", "scanner"), default="clean")
    ap.add_argument("--tune", type=Path, help="report: the tune JSON")
    ap.add_argument("--validation", type=Path, help="report: the validate JSON")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.mode == "report":
        tune = json.loads(args.tune.read_text())
        val = json.loads(args.validation.read_text())
        print(report(tune, val))
        print("\nimage_only overrides chosen on the tune split:", tune["image_only_overrides"])
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()

    split = "tune" if args.mode == "tune" else "validation"
    seed = args.seed if args.mode == "tune" else args.seed + 100  # other masks and settings
    base = DuDoCROPPipeline.from_bundle(args.bundle)
    current = {  # the bundle's own choice on each route (its image-only overrides applied)
        route: variant_key({k: getattr(base.config.for_route(route), k) for k in KEY_FIELDS})
        for route in ROUTES
    }
    wanted = [v for v in grid() if v["mu_source"] in args.mu and int(v["use_clip"]) in args.clip]
    slices = split_slices(args.data, split)
    names = sorted({series_id(s) for s in slices})
    log.info("%s split: %d slices from %s", split, len(slices), names)
    cases = make_cases(slices, args.cases, seed, base.operators.ct_view(), reference=args.reference)
    log.info("%d cases simulated (%.0f s)", len(cases), time.perf_counter() - t0)
    if args.check:
        diff = check_reuse(base, cases[0], args.seed)
        log.info("fidelity-off reuse vs a full call: max |ΔX_out| = %.3g cm⁻¹", diff)
        assert diff < 1e-5, diff
    rows = []
    for i, case in enumerate(cases):
        row = {
            "case": case["name"],
            "series": case["series"],
            "metal_px": int(case["mask"].sum()),
            "settings": case["settings"],
        }
        for route in ROUTES:
            row[route] = run_case(base, case, route, wanted, args.seed)
        rows.append(row)
        log.info(
            "case %d/%d %s (%d px): %s  [%.0f s]",
            i + 1,
            len(cases),
            case["name"],
            row["metal_px"],
            "  ".join(
                f"{r}: NMAR {row[r]['nmar'][0]:.2f} best "
                f"{max(v[0] for v in row[r]['dudocrop'].values()):.2f}"
                for r in ROUTES
            ),
            time.perf_counter() - t0,
        )
        write(args, split, seed, cases, rows, current, base.config, t0)
    base.close()
    text = []
    for route in ROUTES:
        summ = summarise(rows, route)
        ranked = sorted((k for k in summ if k.startswith("mu=")), key=lambda k: -summ[k]["psnr"])
        cur = current[route]
        names = ["input", "li", "nmar"] + [cur] * (cur in summ)
        names += [k for k in ranked[:8] if k != cur]
        text.append(table(summ, names, f"\n{route} route ({len(rows)} {split} cases)"))
    print("\n".join(text))
    result = json.loads(args.out.read_text())
    print("\nbest per route on this split:", json.dumps(result["chosen"], indent=1))
    print("image_only overrides:", result["image_only_overrides"])
    print(f"\n{time.perf_counter() - t0:.0f} s; JSON: {args.out}")


def write(args, split, seed, cases, rows, current, config, t0) -> None:  # noqa: ANN001
    """The JSON so far (rewritten after every case, so a stopped run keeps its cases)."""
    summary = {route: summarise(rows, route) for route in ROUTES}
    chosen = {route: best(summary[route]) for route in ROUTES}
    result = {
        "mode": args.mode,
        "split": split,
        "series": sorted({r["series"] for r in rows}),
        "bundle": args.bundle,
        "seed": seed,
        "mu_sources": args.mu,
        "use_clip": args.clip,
        "reference": args.reference,
        "n_cases": len(rows),
        "n_cases_planned": len(cases),
        "current": current,
        "chosen": chosen,
        "image_only_overrides": overrides(chosen["image_only"], config),
        "sinogram_overrides": overrides(chosen["sinogram"], config),
        "summary": summary,
        "cases": rows,
        "seconds": time.perf_counter() - t0,
        "command": "python benchmarks/tune_route.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
