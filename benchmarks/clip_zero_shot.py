"""DuDoCLIP zero-shot artifact accuracy (PI_s, DESIGN §9) of a bundle's two CLIP networks on
held-out cases: the validation slices of ``--data`` × ``--masks`` training-style implants each
(every size bin, every material), simulated with the recipe's seed and cached in ``--work``.

Prints, per domain, the accuracy over the 21 zero-shot labels, how often the predicted
label's size class and severity are right, uniform chance and the majority-class rate (the
accuracy of always answering the most common label).

    python benchmarks/clip_zero_shot.py --bundle mar_rt/assets/demo_bundle \\
        --data ../shared/data --work W [--masks 60] [--config tiny-cpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, help="clean-slice sources (mar-rt train --data)")
    p.add_argument("--work", required=True, help="folder for the cached cases")
    p.add_argument("--masks", type=int, default=60, help="implants per validation slice")
    p.add_argument("--config", default="tiny-cpu", help="recipe whose seed and split to use")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from mar_rt.models.bundle import load_bundle
    from mar_rt.train.clip_set import ClipSet, clip_set
    from mar_rt.train.clip_trainer import zero_shot_report
    from mar_rt.train.data_config import training_jobs
    from mar_rt.train.presets import recipe_config
    from mar_rt.train.sources import load_clean_slices
    from mar_rt.train.split import split_slices

    recipe = recipe_config(args.config)
    bundle = load_bundle(args.bundle, verify=True)
    _, val_slices = split_slices(load_clean_slices(args.data), recipe.data.val_ids)
    if not val_slices:
        raise SystemExit(f"{args.data}: none of the validation slices {recipe.data.val_ids}")
    jobs = training_jobs(val_slices, dataclasses.replace(recipe.data, masks_per_slice=args.masks))
    results = {"bundle": str(Path(args.bundle)), "cases": len(jobs), "domains": {}}
    cases_at: dict[int, ClipSet] = {}  # tower size → the cases (both domains)
    for domain in ("image", "sinogram"):
        model = bundle.build(f"clip_{domain}").eval()
        size = model.cfg.image_size
        if size not in cases_at:
            cases_at[size] = clip_set(
                val_slices, jobs, seed=recipe.data.seed, size=size,
                cache_file=Path(args.work) / "cache" / "clip_val.pt",  # the recipe's file
            )  # fmt: skip
        cases = cases_at[size]
        report = zero_shot_report(model, cases.inputs[domain], cases.metas)
        results["domains"][domain] = report
        print(
            f"{domain:9s} accuracy {report['accuracy']:.3f}  size {report['size_accuracy']:.3f}"
            f"  severity {report['severity_accuracy']:.3f}  (n {report['n']}, chance "
            f"{report['chance_uniform']:.3f}, majority {report['majority_rate']:.3f})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
