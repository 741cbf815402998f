"""``runtime.operators``: the kernel builds' trace / LI / statistics / fusion stages against the
torch reference (``mar_rt.ct``, ``mar_rt.runtime.osro``) that the ``ct`` operators run.

The host build is compared here (needs nvcc); the CuPy build on a CUDA device (gpu marker).
The data are the shipped demo slice with a metal disc, on the 64² test geometry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mar_rt.ct import mar, projector
from mar_rt.kernels import build
from mar_rt.runtime import osro
from mar_rt.runtime.demo import load_demo_slice, small_geometry
from mar_rt.runtime.operators import select_operators

SIZE = 64


def _case(device: str) -> dict[str, torch.Tensor]:
    """A real slice (μ, cm⁻¹) with a titanium disc, its mask, sinogram and the torch-reference
    trace, LI and a second image (the LI reconstruction) to match statistics against."""
    g = small_geometry(SIZE)
    x = torch.from_numpy(load_demo_slice())[None, None]
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="area")[0, 0]
    r, c = np.ogrid[:SIZE, :SIZE]
    mask = torch.from_numpy((r - 30) ** 2 + (c - 38) ** 2 <= 9)
    x[mask] = 2.412
    ref = projector.get_projector(g, "cpu", torch.float32)
    y = ref.forward(x[None])
    trace = ref.forward(mask[None].to(torch.float32)) > 0
    y_li = mar.li_inpaint(y, trace)
    x_li = ref.fbp(y_li)
    out = {"x": x[None], "mask": mask[None], "y": y, "trace": trace, "y_li": y_li, "x_li": x_li}
    return {k: v.to(device) for k, v in out.items()}


def _kernel_operators(device: str):
    if device == "cpu" and build.find_nvcc() is None:
        pytest.skip("nvcc not found: the host build of the CUDA kernels needs it")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ops = select_operators(small_geometry(SIZE), device, prefer="kernels")
    assert ops.name == ("kernels-host" if device == "cpu" else "kernels-gpu")
    assert ops.kernels is not None
    return ops


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_trace_and_li_match_the_torch_reference(device):
    ops = _kernel_operators(device)
    case = _case(device)
    trace = ops.trace(case["mask"])
    assert trace.dtype == torch.bool and trace.device.type == device
    expected = case["trace"]
    assert int(expected.sum()) > 100
    # equal but for grazing rays, where FP(M) ≈ 0 and float rounding decides the sign
    fp = projector.get_projector(small_geometry(SIZE), "cpu", torch.float64).forward(
        case["mask"].cpu().to(torch.float64)
    )
    differ = (trace != expected).cpu()
    assert bool((fp[differ].abs() < 1e-4).all()) and int(differ.sum()) <= 2
    y_li = ops.li(case["y"], expected)
    assert y_li.device.type == device
    torch.testing.assert_close(y_li, case["y_li"], rtol=0, atol=2e-6)
    outside = ~expected
    assert torch.equal(y_li[outside], case["y"][outside])  # bins outside the trace untouched
    assert not torch.allclose(y_li, case["y"])  # and the trace was filled


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_match_stats_and_fuse_match_osro(device):
    ops = _kernel_operators(device)
    case = _case(device)
    valid = ~case["mask"]
    src, ref = case["x"] * 1.3 + 0.02, case["x_li"]
    got = ops.match_stats(src, ref, valid)
    expected = osro.match_stats(src, ref, valid)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    mean, std = osro.masked_mean_std(got, valid)
    ref_mean, ref_std = osro.masked_mean_std(ref, valid)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(std, ref_std, rtol=1e-5, atol=0)
    fused = ops.fuse(src, ref, 0.3)
    torch.testing.assert_close(fused, osro.fuse(src, ref, 0.3), rtol=0, atol=1e-6)


def test_ct_operators_are_the_torch_reference():
    """``prefer="ct"`` runs the reference functions themselves (bit for bit)."""
    ops = select_operators(small_geometry(SIZE), "cpu", prefer="ct")
    assert ops.name == "ct" and ops.kernels is None
    case = _case("cpu")
    assert torch.equal(ops.trace(case["mask"]), case["trace"])
    assert torch.equal(ops.li(case["y"], case["trace"]), case["y_li"])
    valid = ~case["mask"]
    assert torch.equal(
        ops.match_stats(case["x"], case["x_li"], valid),
        osro.match_stats(case["x"], case["x_li"], valid),
    )
    assert torch.equal(
        ops.fuse(case["x"], case["x_li"], 0.5), osro.fuse(case["x"], case["x_li"], 0.5)
    )
