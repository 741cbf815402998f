"""The pipeline on CUDA (skipped without a GPU): determinism, agreement with the CPU where no
noise is drawn, the two-stream DAPG path, and fp16 against fp32.

Per-stage timings at 416² are measured by ``benchmarks/device_check.py`` (section
``pipeline``), not here: a test asserts, a benchmark measures."""

from __future__ import annotations

import pytest
import torch

from mar_rt.ct import metrics
from mar_rt.runtime.pipeline import DuDoCROPPipeline
from tests.runtime._runtime_bundles import micro_bundle
from tests.runtime.test_pipeline import _slice

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return micro_bundle(tmp_path_factory)


def test_cuda_deterministic_and_streams(bundle):
    with DuDoCROPPipeline.from_bundle(bundle, device="cuda") as pipe:
        x = _slice().cuda()
        a = pipe(x, steps=3, seed=5)
        b = pipe(x, steps=3, seed=5)
        c = pipe(x, steps=3, seed=6)
        assert torch.equal(a.output, b.output)
        assert not torch.equal(a.output, c.output)
        assert torch.isfinite(a.output).all()
        assert a.timings["image_sde"] > 0 and a.timings["sinogram_sde"] > 0
        batch = pipe(torch.stack([x, x.flip(-1)]), steps=2, seed=0)
        assert batch.output.shape == (2, *x.shape)


def _without_noise(bundle, **changes) -> list[dict[str, torch.Tensor]]:
    """Intermediates and output (key ``out``) on the CPU, then on CUDA, with both DAPG loops and
    the residual loop off (nothing random is drawn) and ``changes`` to the bundle's config."""
    x = _slice()
    runs = []
    for device in ("cpu", "cuda"):
        with DuDoCROPPipeline.from_bundle(bundle, device=device) as pipe:
            cfg = pipe.config.replace(
                run_image_sde=False, run_sinogram_sde=False, osro_residual=False, **changes
            )
            out = pipe.with_config(cfg)(x.to(device), steps=1, seed=0)
            assert torch.isfinite(out.output).all()
            runs.append(
                {k: v.cpu() for k, v in out.intermediates.items()} | {"out": out.output.cpu()}
            )
    return runs


def test_cuda_matches_cpu_without_noise(bundle):
    """With both DAPG loops and the residual loop off, nothing is random: CPU ≈ CUDA."""
    cpu, cuda = _without_noise(bundle)
    for k in ("x_li", "y_li", "x_p_prime", "out"):
        torch.testing.assert_close(cuda[k], cpu[k], rtol=1e-3, atol=2e-4, msg=k)


def test_cuda_nmar_reversion_targets_match_cpu(bundle):
    """``mu_source="nmar"`` (the demo bundle's) on CUDA: the NMAR pair equals the CPU one."""
    cpu, cuda = _without_noise(bundle, mu_source="nmar")
    # with both loops off, X_p / Y_p are the loops' μ: the NMAR pair, not the LI one
    assert not torch.allclose(cpu["x_p"], cpu["x_li"])
    for k in ("x_p", "y_p", "out"):
        torch.testing.assert_close(cuda[k], cpu[k], rtol=1e-3, atol=2e-4, msg=k)


def test_cuda_fp16_matches_fp32(bundle):
    """fp16 (autocast) against the fp32 pipeline, same seed, same noise: the outputs differ
    (fp16 did run) by far less than any correction (≥ 50 dB apart; untrained tiny and paper
    bundles measured 71–75 dB, RESULTS run 4), and no stage fell back to fp32."""
    x = _slice().cuda()
    outputs = {}
    for precision in ("fp32", "fp16"):
        with DuDoCROPPipeline.from_bundle(bundle, device="cuda", precision=precision) as pipe:
            out = pipe(x, steps=2, seed=0)
            assert out.qa.slices[0].fp32_reruns == (), out.qa.slices[0].fp32_reruns
            outputs[precision] = out.output.cpu()
    assert not torch.equal(outputs["fp16"], outputs["fp32"])
    assert not torch.allclose(outputs["fp32"], x.cpu(), atol=1e-4)  # the pipeline did correct
    between = float(metrics.psnr(outputs["fp16"], outputs["fp32"]))
    assert between >= 50.0, between
