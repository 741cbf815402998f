"""Parameter counts and GFLOP per network call of the conditional U-Nets (DESIGN §7.2).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per
multiply-add; convolutions, matmuls and attention; elementwise ops and norms are not
counted), on the meta device so that no memory is used.  Attention runs through the math
SDPA backend while counting, because the fused CPU kernel is not registered with the counter.

The reference 3-channel DA-CLIP network is quoted as 49 M parameters / 266 GFLOP at 256²
(DESIGN §7.2); the ``paper-3ch`` row is our network with 3 input/output channels for
comparison (ours omits the cross-attention to_q/to_k, which cannot change the output with one
context token).

Usage::

    python benchmarks/model_table.py            # table
    python benchmarks/model_table.py --json -   # JSON to stdout (or a file path)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mar_rt.models.unet import ConditionalUNet, UNetConfig

SIZES = ((256, 256), (416, 416), (640, 641))
REFERENCE = {"params_M": 49.0, "gflop_256": 266.0}


def configs() -> dict[str, UNetConfig]:
    paper = UNetConfig.paper()
    return {
        "tiny": UNetConfig.tiny(),
        "paper": paper,
        "paper-3ch": dataclasses.replace(paper, in_channels=3, out_channels=3),
    }


def count(cfg: UNetConfig, sizes=SIZES) -> dict:
    """Parameters and per-call GFLOP (forward with precomputed cond, batch 1) of one config."""
    with torch.device("meta"):
        net = ConditionalUNet(cfg).eval()
    params = sum(p.numel() for p in net.parameters())
    row: dict = {"params": params, "cond_dim": cfg.cond_dim, "gflop": {}, "cond_gflop": 0.0}
    emb = torch.zeros(1, cfg.context_dim, device="meta")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        counter = FlopCounterMode(display=False)
        with counter:
            cond = net.condition(emb, emb)
        row["cond_gflop"] = counter.get_total_flops() / 1e9
        for h, w in sizes:
            x = torch.zeros(1, cfg.in_channels, h, w, device="meta")
            t = torch.zeros(1, device="meta")
            counter = FlopCounterMode(display=False)
            with counter:
                net(x, x, t, cond)
            row["gflop"][f"{h}x{w}"] = counter.get_total_flops() / 1e9
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON ('-' = stdout)")
    args = parser.parse_args(argv)

    rows = {name: count(cfg) for name, cfg in configs().items()}
    result = {"reference_3ch": REFERENCE, "networks": rows, "flop_convention": "2 per MAC"}

    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
            return 0
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    sizes = [f"{h}x{w}" for h, w in SIZES]
    header = f"{'network':<10} {'params':>10} {'cond_dim':>8} " + " ".join(
        f"{'GFLOP@' + s:>14}" for s in sizes
    )
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        cells = " ".join(f"{row['gflop'][s]:>14.1f}" for s in sizes)
        print(f"{name:<10} {row['params'] / 1e6:>9.2f}M {row['cond_dim']:>8} {cells}")
    print(
        f"{'reference':<10} {REFERENCE['params_M']:>9.2f}M {'':>8} "
        f"{REFERENCE['gflop_256']:>14.1f}   (DA-CLIP 3-channel network, DESIGN §7.2)"
    )
    print(
        "conditioning (once per image): "
        + ", ".join(f"{n} {r['cond_gflop'] * 1e3:.2f} MFLOP" for n, r in rows.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
