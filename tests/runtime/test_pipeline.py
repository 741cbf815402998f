"""The DuDoCROP pipeline on a micro untrained bundle at 64²: shapes, determinism, each switch,
bad input, pass-through, size policy, the fp16 rerun hook and the QA record."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mar_rt.ct import units
from mar_rt.ct.mar import li_inpaint, nmar_correct
from mar_rt.ct.projector import Projector
from mar_rt.errors import BadInputError, MarRtError
from mar_rt.runtime.backends import GraphSet
from mar_rt.runtime.backends.base import Backend
from mar_rt.runtime.config import PipelineConfig
from mar_rt.runtime.demo import load_demo_slice
from mar_rt.runtime.pipeline import STAGES, DuDoCROPPipeline
from tests.runtime._runtime_bundles import SMALL, micro_bundle


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    with DuDoCROPPipeline.from_bundle(micro_bundle(tmp_path_factory)) as p:
        yield p


@pytest.fixture(scope="module")
def full_run(pipe):
    """(input, output) of the default config, steps 1, seed 3."""
    x = _slice()
    return x, pipe(x, steps=1, seed=3)


def _slice(metal=True, size=SMALL):
    """The demo slice at ``size``² with a 13-px titanium-like disc right of the spine."""
    x = torch.from_numpy(load_demo_slice())[None, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")[0, 0]
    if metal:
        r, c = np.ogrid[:size, :size]
        disc = (r - size * 0.55) ** 2 + (c - size * 0.62) ** 2 <= (size / 32) ** 2 + 1
        x[torch.from_numpy(disc)] = 2.4
    return x


def _stats(x, valid):
    v = x[valid].double()
    return float(v.mean()), float(v.std(unbiased=False))


def test_shapes_timings_and_qa(pipe):
    x = _slice()
    out = pipe(x, steps=1, seed=0)
    assert out.output.shape == (SMALL, SMALL) and out.output.dtype == torch.float32
    assert torch.isfinite(out.output).all()
    inter = out.intermediates
    for k in ("x_ma", "x_li", "x_p", "x_p_prime", "x_p_tilde", "residual", "x_hat_p", "x_out"):
        assert inter[k].shape == (1, SMALL, SMALL), k
    for k in ("y_ma", "y_li", "y_p", "y_f", "trace"):
        assert inter[k].shape == (1, 96, 97), k
    assert set(out.timings) == set(STAGES) and out.timings["total"] > 0
    assert (out.seed, out.steps) == (0, 1)
    (qa,) = out.qa.slices
    assert qa.metal_found and qa.metal_px == int(inter["mask"].sum()) > 0
    assert qa.sinogram_synthetic and qa.steps == 1 and qa.fp32_reruns == ()
    batch = pipe(torch.stack([x, x.flip(-1)]), steps=1, seed=0)
    assert batch.output.shape == (2, SMALL, SMALL) and len(batch.qa) == 2


def test_determinism_same_seed_bit_identical(pipe):
    x = _slice()
    a = pipe(x, steps=2, seed=7).output
    b = pipe(x, steps=2, seed=7).output
    c = pipe(x, steps=2, seed=8).output
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_prepare_trace_and_li(pipe):
    """Y_ma = FP(X_ma) when no sinogram is given; Y_LI = LI(Y_ma) across Tr = FP(M) > 0."""
    x = _slice()
    out = pipe(x, steps=1, seed=0, mask=x > 0.672)
    inter = out.intermediates
    proj = Projector(pipe.geometry)  # the torch reference (the pipeline may run the kernels)
    y = proj.forward(x)
    torch.testing.assert_close(inter["y_ma"][0], y, rtol=1e-4, atol=1e-4)
    trace = proj.forward((x > 0.672).float()) > 0
    assert torch.equal(inter["trace"][0], trace)
    torch.testing.assert_close(inter["y_li"][0], li_inpaint(y, trace), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("changes", "check"),
    [
        ({"run_sinogram_sde": False}, lambda i, o: torch.equal(i["y_p"], i["y_li"])),
        ({"run_image_sde": False}, lambda i, o: torch.equal(i["x_p"], i["x_li"])),
        ({"run_osro": False}, lambda i, o: torch.equal(o, i["x_p"][0])),
        ({"osro_fidelity": False}, lambda i, o: torch.equal(i["y_f"], i["y_p"])),
        ({"norm1": False}, lambda i, o: torch.equal(i["x_p_tilde"], i["x_p"])),
        (
            {"osro_residual": False},
            lambda i, o: not i["residual_hat"].any() and torch.equal(i["x_hat_p"], i["x_p_prime"]),
        ),
        ({"alpha": 0.0}, lambda i, o: torch.equal(o, i["x_p"][0])),
    ],
)
def test_each_switch_changes_what_it_should(pipe, full_run, changes, check):
    x, full = full_run
    out = pipe.with_config(pipe.config.replace(**changes))(x, steps=1, seed=3)
    assert check(out.intermediates, out.output)
    assert not check(full.intermediates, full.output), "the switch must matter"


def test_osro_steps_against_an_independent_computation(pipe):
    x = _slice()
    out = pipe.with_config(pipe.config.replace(alpha=0.3))(x, steps=1, seed=4)
    i = {k: v[0] for k, v in out.intermediates.items()}
    valid = ~i["mask"]
    # step 1: measured data outside the trace, the prior inside
    tr = i["trace"]
    assert torch.equal(i["y_f"][~tr], i["y_ma"][~tr]) and torch.equal(i["y_f"][tr], i["y_p"][tr])
    torch.testing.assert_close(
        i["x_p_prime"], Projector(pipe.geometry).fbp(i["y_f"]), rtol=1e-4, atol=1e-5
    )
    # step 2: Norm¹ gives X̃_p the mean/std of X'_p over non-metal pixels
    for a, b in zip(_stats(i["x_p_tilde"], valid), _stats(i["x_p_prime"], valid), strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    # steps 3-4
    torch.testing.assert_close(i["residual"], i["x_p_tilde"] - i["x_p_prime"])
    torch.testing.assert_close(i["x_hat_p"], i["x_p_prime"] + i["residual_hat"])
    assert float(i["residual_hat"].abs().max()) <= pipe.config.residual_scale + 1e-6
    # steps 5-6 by hand in float64
    xh, xp = i["x_hat_p"].double(), i["x_p"].double()
    m_h, s_h = _stats(xh, valid)
    m_p, s_p = _stats(xp, valid)
    want = 0.3 * ((xh - m_h) / s_h * s_p + m_p) + 0.7 * xp
    torch.testing.assert_close(out.output.double(), want, rtol=1e-4, atol=1e-5)


def test_clip_switch_and_mu_source_reach_the_graphs(pipe):
    """use_clip=False never runs the CLIP graphs; mu_source picks what the loops revert to."""
    seen: dict[str, list] = {"clip": [], "mu": []}
    real_clip = pipe.graphs["clip_image"].infer
    real_step = pipe.graphs["unet_image_step"].infer

    def clip_spy(feed, **kw):
        seen["clip"].append(1)
        return real_clip(feed, **kw)

    def step_spy(feed, **kw):
        seen["mu"].append(feed["mu"].clone())
        return real_step(feed, **kw)

    pipe.graphs["clip_image"].infer = clip_spy
    pipe.graphs["unet_image_step"].infer = step_spy
    try:
        x = _slice()
        out = pipe.with_config(pipe.config.replace(use_clip=False))(x, steps=1, seed=0)
        assert seen["clip"] == []
        x_li = out.intermediates["x_li"]
        torch.testing.assert_close(seen["mu"][-1][:, 0], units.image_to_net(x_li))
        pipe.with_config(pipe.config.replace(mu_source="ma"))(x, steps=1, seed=0)
        assert seen["clip"] == [1]
        torch.testing.assert_close(seen["mu"][-1][0, 0], units.image_to_net(x))
    finally:
        del pipe.graphs["clip_image"].infer, pipe.graphs["unet_image_step"].infer
    a = pipe(x, steps=1, seed=0).output
    b = pipe.with_config(pipe.config.replace(use_clip=False))(x, steps=1, seed=0).output
    assert not torch.equal(a, b)


def test_nmar_mu_source_matches_nmar_correct(pipe):
    """mu_source="nmar": the image loop reverts to X_NMAR, and with both loops and OSRO off the
    output is X_NMAR itself, as ``mar_rt.ct.mar.nmar_correct`` computes it on its own."""
    x = _slice()
    mask = x > 0.672
    ref = nmar_correct(x, mask, pipe.geometry)
    seen = []
    real_step = pipe.graphs["unet_image_step"].infer

    def step_spy(feed, **kw):
        seen.append(feed["mu"].clone())
        return real_step(feed, **kw)

    pipe.graphs["unet_image_step"].infer = step_spy
    try:
        pipe.with_config(pipe.config.replace(mu_source="nmar"))(x, steps=1, seed=0, mask=mask)
    finally:
        del pipe.graphs["unet_image_step"].infer
    want = units.image_to_net(ref["nmar_image"])
    torch.testing.assert_close(seen[-1][0, 0], want, rtol=1e-4, atol=1e-4)
    off = pipe.config.replace(
        mu_source="nmar", run_image_sde=False, run_sinogram_sde=False, run_osro=False
    )
    out = pipe.with_config(off)(x, steps=1, seed=0, mask=mask)
    torch.testing.assert_close(out.output, ref["nmar_image"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.output, ref["li_image"], atol=1e-3), "NMAR must differ from LI"


def test_reinsert_metal(pipe):
    x = _slice()
    out = pipe.with_config(pipe.config.replace(reinsert_metal=True))(x, steps=1, seed=0)
    m = out.intermediates["mask"][0]
    assert torch.equal(out.output[m], x[m])
    assert torch.equal(out.output[~m], out.intermediates["x_out"][0][~m])


def test_no_metal_passes_through_with_qa_flag(pipe, caplog):
    clean, metal = _slice(metal=False), _slice()
    with caplog.at_level("WARNING"):
        out = pipe(torch.stack([metal, clean]), steps=1, seed=0)
    assert torch.equal(out.output[1], clean)
    assert not torch.equal(out.output[0], metal)
    s0, s1 = out.qa.slices
    assert s0.metal_found and not s0.passed_through and s0.dc_error_output is not None
    assert not s1.metal_found and s1.passed_through and s1.metal_px == 0
    assert s1.dc_error_output is None and "no metal" in s1.notes[0]
    assert "slice 1: no metal found" in caplog.text
    single = pipe(clean, steps=1)
    assert torch.equal(single.output, clean) and single.qa.n_passed_through == 1


@pytest.mark.parametrize("where", ["image_mu", "sinogram"])
def test_nan_input_is_refused_by_name(pipe, where):
    x = _slice()
    y = Projector(pipe.geometry).forward(x)
    if where == "image_mu":
        x[5, 7] = float("nan")
    else:
        y[3, 4] = float("inf")
    with pytest.raises(BadInputError, match=f"{where} holds 1 NaN/inf value"):
        pipe(x, sinogram=y, steps=1)


def test_bad_shapes_and_arguments(pipe):
    x = _slice()
    with pytest.raises(BadInputError, match="sinogram has shape .* 96 views × 97 detector"):
        pipe(x, sinogram=torch.zeros(90, 97), steps=1)
    with pytest.raises(BadInputError, match="mask has shape"):
        pipe(x, mask=torch.zeros(10, 10, dtype=torch.bool), steps=1)
    with pytest.raises(BadInputError, match="must have shape"):
        pipe(torch.zeros(2, 2, SMALL, SMALL), steps=1)
    with pytest.raises(BadInputError, match="steps must be a positive integer"):
        pipe(x, steps=0)


def test_wrong_size_per_config(pipe):
    x80 = _slice(size=80)
    out = pipe(x80, steps=1, seed=0)
    assert out.output.shape == (80, 80)
    assert out.qa.slices[0].resampled_from == (80, 80)
    assert out.intermediates["x_ma"].shape == (1, SMALL, SMALL)
    refusing = pipe.with_config(pipe.config.replace(on_size_mismatch="refuse"))
    with pytest.raises(BadInputError, match=f"80×80.*supports {SMALL}×{SMALL}"):
        refusing(x80, steps=1)
    clean80 = _slice(metal=False, size=80)
    assert torch.equal(pipe(clean80, steps=1).output, clean80)  # pass-through is exact


def test_measured_sinogram_and_qa_data_consistency(pipe):
    x = _slice()
    proj = pipe.projector  # the formula is under test here, not the projector
    y = proj.forward(x) + 0.01
    out = pipe(x, sinogram=y, sinogram_is_measured=True, steps=1, seed=0)
    (qa,) = out.qa.slices
    assert not qa.sinogram_synthetic
    assert torch.equal(out.intermediates["y_ma"][0], y)
    outside = ~out.intermediates["trace"][0]
    for img, got in (
        (out.output, qa.dc_error_output),
        (out.intermediates["x_li"][0], qa.dc_error_li),
    ):
        want = float((proj.forward(img) - y).abs()[outside].double().mean())
        assert got == pytest.approx(want, rel=1e-5)


class _NaNStep(Backend):
    """Wraps a step graph and returns NaN: an fp16 overflow stand-in."""

    def __init__(self, inner):
        super().__init__(inner.spec, device=inner.device, precision="fp16")

    def _activate_impl(self):
        pass

    def _deactivate_impl(self):
        pass

    def _infer_impl(self, inputs, outputs):
        outputs["eps"].fill_(float("nan"))


def test_fp16_overflow_reruns_the_stage_in_fp32(pipe):
    real = pipe.graphs
    backends = dict(real)
    backends["unet_image_step"] = _NaNStep(real["unet_image_step"])
    fake = GraphSet(backends, backend="torch", device="cpu", precision="fp16")
    fake._active = True  # the real backends are already active; the fake one needs nothing
    backends["unet_image_step"].activate()
    p = DuDoCROPPipeline(
        fake,
        sde=pipe.sde,
        geometry=pipe.geometry,
        config=pipe.config,
        fp32_graphs=lambda: real,
        operators=pipe.operators,
    )
    x = _slice()
    out = p(x, steps=1, seed=0)
    assert out.qa.slices[0].fp32_reruns == ("image_sde",)
    assert torch.isfinite(out.output).all()
    torch.testing.assert_close(out.output, pipe(x, steps=1, seed=0).output, rtol=0, atol=0)
    fake32 = GraphSet(backends, backend="torch", device="cpu", precision="fp32")
    fake32._active = True
    p32 = DuDoCROPPipeline(
        fake32, sde=pipe.sde, geometry=pipe.geometry, config=pipe.config, operators=pipe.operators
    )
    with pytest.raises(MarRtError, match="stage image_sde .*NaN/inf"):
        p32(x, steps=1, seed=0)


def test_config_round_trip_and_validation(pipe, tmp_path_factory):
    cfg = PipelineConfig(steps=7, alpha=0.25, mu_source="ma", residual_steps=2)
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg
    assert pipe.config == PipelineConfig(steps=2, image_size=SMALL)  # what the bundle stored
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        PipelineConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="alpha"):
        PipelineConfig(alpha=1.5)
    with pytest.raises(ValueError, match="mu_source"):
        PipelineConfig(mu_source="x")
    assert cfg.ablation("sde_only").use_clip is False
    assert cfg.ablation("dapg_only").run_osro is False
    assert cfg.ablation("full") == cfg


def test_progress_counts_the_steps_of_each_loop(pipe):
    x = _slice()
    for residual_steps, want_r in ((None, 3), (1, 1)):
        ticks: list[tuple] = []
        cfg = pipe.config.replace(residual_steps=residual_steps)
        pipe.with_config(cfg)(x, steps=3, seed=0, progress=lambda *a, t=ticks: t.append(a))
        for domain, n in (("image", 3), ("sinogram", 3), ("residual", want_r)):
            assert [a for a in ticks if a[0] == domain] == [(domain, k, n) for k in range(n)]
        assert [a[0] for a in ticks if a[0] not in ("image", "sinogram", "residual")] == [
            "prepare", "clip", "osro",
        ]  # fmt: skip


# ---------------------------------------------------------------------- per-route overrides
def test_old_bundle_runs_one_config_on_both_routes(pipe):
    """A bundle without ``image_only`` (this micro bundle, like every bundle before it) runs its
    own config on both routes: the route pipeline is the pipeline itself, and a config that
    overrides with the values it already has gives the same output bit for bit."""
    assert pipe.config.image_only is None
    assert pipe.for_route("image_only") is pipe and pipe.for_route("sinogram") is pipe
    x = _slice()
    out = pipe(x, steps=1, seed=4)
    assert out.qa.route == "image_only" and out.qa.to_dict()["route"] == "image_only"
    assert "image_only" not in out.qa.config
    same = pipe.with_config(pipe.config.replace(image_only={"alpha": pipe.config.alpha}))
    torch.testing.assert_close(same(x, steps=1, seed=4).output, out.output, rtol=0, atol=0)


def test_image_only_override_runs_on_the_image_only_route_only(pipe):
    """With ``image_only={"alpha": 0}``: the image-only call outputs X_p exactly (step 6 with
    α = 0 is X_p), the X_p of the old config's image-only call; the measured call is the old
    config's measured call, bit for bit (α = 0.5 there)."""
    x = _slice()
    y = pipe.projector.forward(x[None])  # a "measured" sinogram of the right shape
    tuned = pipe.with_config(pipe.config.replace(image_only={"alpha": 0.0}))
    assert tuned.config.alpha == 0.5 and tuned.for_route("image_only").config.alpha == 0.0

    io_old = pipe(x, steps=1, seed=5)
    io_new = tuned(x, steps=1, seed=5)
    assert not torch.equal(io_old.output, io_old.intermediates["x_p"][0])  # α = 0.5 mixes
    torch.testing.assert_close(io_new.output, io_new.intermediates["x_p"][0], rtol=0, atol=0)
    torch.testing.assert_close(io_new.output, io_old.intermediates["x_p"][0], rtol=0, atol=0)
    assert io_new.qa.route == "image_only" and io_new.qa.config["alpha"] == 0.0
    assert "image_only" not in io_new.qa.config  # the config that ran

    ms_old = pipe(x, sinogram=y, sinogram_is_measured=True, steps=1, seed=5)
    ms_new = tuned(x, sinogram=y, sinogram_is_measured=True, steps=1, seed=5)
    torch.testing.assert_close(ms_new.output, ms_old.output, rtol=0, atol=0)
    assert ms_new.qa.route == "sinogram" and ms_new.qa.config["image_only"] == {"alpha": 0.0}
    assert not any(s.sinogram_synthetic for s in ms_new.qa.slices)
    # a sinogram not marked measured is the image-only route (as the QA's synthetic flag says)
    assert tuned(x, sinogram=y, steps=1, seed=5).qa.route == "image_only"


def test_image_only_overrides_travel_in_bundle_json(tmp_path):
    from mar_rt.runtime.demo import make_untrained_bundle, small_geometry

    overrides = {"alpha": 0.25, "osro_fidelity": False, "mu_source": "li"}
    cfg = PipelineConfig(steps=1, image_size=SMALL, image_only=overrides)
    make_untrained_bundle(
        tmp_path / "b", config="micro", seed=0, geometry=small_geometry(SMALL), pipeline=cfg
    )
    import json

    stored = json.loads((tmp_path / "b" / "bundle.json").read_text())["pipeline"]
    assert stored["image_only"] == overrides
    with DuDoCROPPipeline.from_bundle(tmp_path / "b") as p:
        assert p.config == cfg
        assert p.for_route("image_only").config.osro_fidelity is False
        assert p.for_route("sinogram").config.osro_fidelity is True


def test_image_fidelity_prior_keeps_the_measurement_and_shapes_the_trace_by_x_p(pipe):
    """fidelity_prior="image": Y_f is Y_ma on every bin outside the trace, and inside it Y_f / P
    is the straight line between the trace's two edge values of Y_ma / P in each view, with
    P = FP(X_p, metal pixels as water) (NMAR's normalised interpolation, X_p as the prior)."""
    x = _slice()
    cfg = pipe.config.replace(fidelity_prior="image")
    out = pipe.with_config(cfg)(x, steps=1, seed=4)
    i = {k: v[0] for k, v in out.intermediates.items()}
    tr = i["trace"]
    assert torch.equal(i["y_f"][~tr], i["y_ma"][~tr])
    prior = torch.where(i["mask"], torch.full_like(i["x_p"], units.MU_WATER), i["x_p"])
    p = Projector(pipe.geometry).forward(prior.clamp(min=0)[None])[0].clamp(min=0) + 1e-6
    ratio_f, ratio_ma = (i["y_f"] / p).double(), (i["y_ma"] / p).double()
    checked = 0
    for v in range(tr.shape[0]):
        cols = torch.nonzero(tr[v]).flatten().tolist()
        if not cols or cols[0] == 0 or cols[-1] == tr.shape[1] - 1:
            continue
        runs = [[cols[0]]]
        for c in cols[1:]:
            (runs[-1].append(c) if c == runs[-1][-1] + 1 else runs.append([c]))
        for run in runs:
            left, right = run[0] - 1, run[-1] + 1
            t = (torch.tensor(run, dtype=torch.float64) - left) / (right - left)
            want = ratio_ma[v, left] + (ratio_ma[v, right] - ratio_ma[v, left]) * t
            torch.testing.assert_close(ratio_f[v, run], want, rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked > 10
    # X_p, not the sinogram IR-SDE, shaped the trace: the two fidelity priors differ there
    default = pipe(x, steps=1, seed=4).intermediates["y_f"][0]
    assert not torch.allclose(default[tr], i["y_f"][tr], atol=1e-3)
    with pytest.raises(ValueError, match="fidelity_prior"):
        pipe.config.replace(fidelity_prior="nmar")
