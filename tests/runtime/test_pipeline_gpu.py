"""The pipeline on CUDA (skipped without a GPU): determinism, agreement with the CPU where no
noise is drawn, the two-stream DAPG path, fp16, and a per-stage timing print at 416²."""

from __future__ import annotations

import pytest
import torch

from mar_rt.runtime.demo import make_untrained_bundle
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


def test_cuda_fp16_backend_runs(bundle):
    with DuDoCROPPipeline.from_bundle(bundle, device="cuda", precision="fp16") as pipe:
        out = pipe(_slice().cuda(), steps=2, seed=0)
        assert torch.isfinite(out.output).all()
        print("fp16 reruns:", out.qa.slices[0].fp32_reruns)


def test_cuda_timings_tiny_416(tmp_path_factory, capsys):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    folder = tmp_path_factory.getbasetemp() / "tiny-416"
    make_untrained_bundle(folder, config="tiny")
    x = torch.nn.functional.interpolate(_slice()[None, None], size=(416, 416), mode="bilinear")
    x = x[0, 0].cuda()
    with DuDoCROPPipeline.from_bundle(folder, device="cuda") as pipe:
        pipe(x, steps=2, seed=0)  # warm-up: projector tables, cuDNN plans
        for steps in (10, 50):
            out = pipe(x, steps=steps, seed=0)
            t = {k: round(v, 3) for k, v in out.timings.items()}
            with capsys.disabled():
                print(
                    f"\n[tiny 416² CUDA, {steps} steps, operators {pipe.operators.name}] "
                    f"{torch.cuda.get_device_name()}: {t}"
                )
