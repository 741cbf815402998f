"""Markdown tables from ``mar-rt eval --json`` files: PSNR / SSIM per metal-size group and mean,
one row per (file, method), and each network method's gain over NMAR and LI.

    python benchmarks/eval_tables.py new=val_sino.json old=old_val_sino.json \
        --methods li nmar dudocrop sde_only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(label: str, result: dict, methods: list[str]) -> list[str]:
    out = []
    for m in methods:
        if m not in result["methods"]:
            continue
        s = result["methods"][m]
        cells = [f"{g['psnr']:.2f} / {g['ssim']:.4f}" for g in s["groups"].values()]
        mean = f"{s['psnr']:.2f} / {s['ssim']:.4f}"
        out.append(f"| {label} | {m} | " + " | ".join(cells) + f" | {mean} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="LABEL=eval.json")
    ap.add_argument("--methods", nargs="+", default=["input", "li", "nmar", "dudocrop"])
    args = ap.parse_args()
    loaded = []
    for item in args.files:
        label, _, path = item.partition("=")
        loaded.append((label, json.loads(Path(path).read_text())))
    groups = list(next(iter(loaded[0][1]["methods"].values()))["groups"])
    print("| run | method | " + " | ".join(f"{g} px" for g in groups) + " | mean |")
    print("|---|---|" + "---|" * (len(groups) + 1))
    for label, result in loaded:
        print("\n".join(rows(label, result, args.methods)))
    print()
    for label, result in loaded:
        ms = result["methods"]
        n = len(result["cases"])
        for m in ("dudocrop", "sde_only"):
            if m in ms and "nmar" in ms and "li" in ms:
                print(
                    f"{label} {m} ({result['route']}, {n} cases): "
                    f"{ms[m]['psnr'] - ms['nmar']['psnr']:+.2f} dB over NMAR, "
                    f"{ms[m]['psnr'] - ms['li']['psnr']:+.2f} dB over LI; SSIM "
                    f"{ms[m]['ssim']:.4f} (NMAR {ms['nmar']['ssim']:.4f}, "
                    f"LI {ms['li']['ssim']:.4f})"
                )


if __name__ == "__main__":
    main()
