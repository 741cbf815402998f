"""Parameter counts and GFLOP per network call of the conditional U-Nets (DESIGN §7.2).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per
multiply-add; convolutions, matmuls and attention; elementwise ops and norms are not
counted), on the meta device so that no memory is used.  Attention runs through the math
SDPA backend while counting, because the fused CPU kernel is not registered with the counter.

The reference 3-channel DA-CLIP network is quoted as 49 M parameters / 266 GFLOP at 256²
(DESIGN §7.2).  ``paper()`` has the reference structure (every attention block wrapped as
x + attn(LN_g(x)), reflect padding to 2^L; ``ConditionalUNet.from_irsde_checkpoint`` loads the
reference's checkpoints into it); the ``paper-3ch`` row is it with 3 input/output channels.
Ours omits the cross-attention to_q/to_k and its LayerNorm (norm2), which cannot change the
output with one context token; ``ref_params`` adds them back, for the count the reference's own
module reports.

``--ort-parity N`` also exports the ``paper()`` step graph (x_t, mu, t, cond → eps) at N²
with ``mar_rt.export.onnx_export.export_graph`` (torch.export → ONNX, opset 17) and reports
max |ONNX Runtime − torch| on two random batch-2 feeds (``mar_rt.export.verify``).  The weights
are seeded random with the zero-initialised transformer output projections randomised (std
0.05), so every path reaches ε̂.  Minutes on one CPU thread.

Usage::

    python benchmarks/model_table.py                      # table
    python benchmarks/model_table.py --json -             # JSON to stdout (or a file path)
    python benchmarks/model_table.py --ort-parity 256     # + ONNX Runtime parity at 256²
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
    widths = [w for name, w in cfg.cond_layout if name != "time"]
    unused = sum(w * w + cfg.context_dim * w + 2 * w for w in widths)  # to_q, to_k, norm2
    row: dict = {
        "params": params,
        "ref_params": params + unused,
        "cond_dim": cfg.cond_dim,
        "gflop": {},
        "cond_gflop": 0.0,
        "transformer_prenorm": cfg.transformer_prenorm,
        "size_multiple": cfg.size_multiple,
    }
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


def ort_parity(size: int, seed: int = 0) -> dict:
    """Export the paper() step graph at size² and compare ONNX Runtime with torch."""
    import tempfile
    import time
    from pathlib import Path

    from mar_rt.export.onnx_export import ExportOptions, export_graph
    from mar_rt.export.verify import ort_cpu_session, random_feed, verify_graph
    from mar_rt.models.unet import SpatialTransformer

    try:
        from mar_rt.export.graphs import GraphSpec, TensorSpec
    except ImportError:  # before the graphs module moved to mar_rt.export
        from mar_rt.runtime.graphs import GraphSpec, TensorSpec

    cfg = UNetConfig.paper()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ConditionalUNet(cfg).eval()
        for m in net.modules():
            if isinstance(m, SpatialTransformer):
                torch.nn.init.normal_(m.proj_out.weight, std=0.05)
    spec = GraphSpec(
        "unet_image_step",
        {
            "x_t": TensorSpec(("B", 1, size, size)),
            "mu": TensorSpec(("B", 1, size, size)),
            "t": TensorSpec(("B",)),
            "cond": TensorSpec(("B", cfg.cond_dim)),
        },
        {"eps": TensorSpec(("B", 1, size, size))},
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet_image_step.onnx"
        t0 = time.perf_counter()
        export_graph(net, spec, path, ExportOptions())
        export_s = time.perf_counter() - t0
        session = ort_cpu_session(path)
        feeds = {f"random{k}": random_feed(spec, 2, seed=k) for k in (1, 2)}
        report = verify_graph(net, spec, session, feeds, onnx_name=path.name)
    errors = [e for case in report.cases for e in case.errors]
    return {
        "size": size,
        "max_abs_err": max(e.max_abs_err for e in errors),
        "max_abs_ref": max(e.max_ref for e in errors),
        "passed_1e-4": report.passed,
        "export_s": round(export_s, 1),
        "summary": report.summary(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON ('-' = stdout)")
    parser.add_argument(
        "--ort-parity", type=int, metavar="N", help="export paper() at N² and compare ORT"
    )
    args = parser.parse_args(argv)

    rows = {name: count(cfg) for name, cfg in configs().items()}
    result = {"reference_3ch": REFERENCE, "networks": rows, "flop_convention": "2 per MAC"}
    if args.ort_parity:
        result["ort_parity_paper"] = ort_parity(args.ort_parity)

    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
            return 0
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    sizes = [f"{h}x{w}" for h, w in SIZES]
    header = f"{'network':<10} {'params':>10} {'ref_params':>10} {'cond_dim':>8} " + " ".join(
        f"{'GFLOP@' + s:>14}" for s in sizes
    )
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        cells = " ".join(f"{row['gflop'][s]:>14.1f}" for s in sizes)
        print(
            f"{name:<10} {row['params'] / 1e6:>9.2f}M {row['ref_params'] / 1e6:>9.2f}M "
            f"{row['cond_dim']:>8} {cells}"
        )
    print(
        f"{'reference':<10} {'':>10} {REFERENCE['params_M']:>9.2f}M {'':>8} "
        f"{REFERENCE['gflop_256']:>14.1f}   (DA-CLIP 3-channel network, DESIGN §7.2)"
    )
    print(
        "conditioning (once per image): "
        + ", ".join(f"{n} {r['cond_gflop'] * 1e3:.2f} MFLOP" for n, r in rows.items())
    )
    if args.ort_parity:
        p = result["ort_parity_paper"]
        print(
            f"paper() step graph at {p['size']}²: max|ORT − torch| {p['max_abs_err']:.2e} "
            f"(max|eps| {p['max_abs_ref']:.2f}; export {p['export_s']} s): {p['summary']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
