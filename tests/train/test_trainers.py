"""IR-SDE and DuDoCLIP trainers: reproducible first steps, resume, loss falls, loss identities."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from mar_rt.models.sde import SDEConfig, forward_marginal, make_schedule
from mar_rt.models.unet import ConditionalUNet, UNetConfig
from mar_rt.train.augment import sample_batch
from mar_rt.train.domains import DomainData, focus_points
from mar_rt.train.pair_meta import PairMeta
from mar_rt.train.sde_trainer import SDETrainConfig, identity_init, train_sde, training_loss

TOY_UNET = UNetConfig(
    nf=8, ch_mult=(1, 2), num_res_blocks=1, context_dim=6, time_sin_dim=8, time_dim=16,
    prompt_len=8, attn_head_dim=8, linear_attn_heads=1, linear_attn_head_dim=8,
    transformer_levels=(1,), norm_groups=4,
)  # fmt: skip


def _toy_data(n: int = 6, size: int = 32) -> DomainData:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x0 = torch.stack(
        [0.4 + 0.2 * torch.sin((xx + 3 * i) / 5.0) * torch.cos(yy / 7.0) for i in range(n)]
    )[:, None].float()
    streaks = 0.1 * torch.sin(xx[None, None] * 0.9 + torch.rand(n, 1, 1, 1, generator=g) * 6)
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    mask[:, 14:17, 14:17] = True
    return DomainData(
        kind="image", x0=x0, mu=(x0 + streaks).clamp(0, 1), weight=(~mask).float()[:, None],
        points=focus_points(mask), content=torch.randn(n, 6, generator=g),
        artifact=torch.randn(n, 6, generator=g),
    )  # fmt: skip


def _unet(seed: int = 0) -> ConditionalUNet:
    torch.manual_seed(seed)
    return ConditionalUNet(TOY_UNET)


SCHEDULE = make_schedule(SDEConfig(T=100, max_sigma=10.0))
CFG = SDETrainConfig(steps=6, batch=3, patch=16, warmup=2, log_every=0, ckpt_every=3, seed=5)


def test_first_50_steps_are_reproducible():
    data = _toy_data()
    cfg = dataclasses.replace(CFG, steps=50, ckpt_every=10**6)
    _, a = train_sde(_unet(), data, SCHEDULE, cfg, progress=False)
    _, b = train_sde(_unet(), data, SCHEDULE, cfg, progress=False)
    assert len(a.losses) == 50
    assert a.losses == b.losses
    _, c = train_sde(_unet(), data, SCHEDULE, dataclasses.replace(cfg, seed=6), progress=False)
    assert a.losses != c.losses


def test_resume_continues_the_same_run(tmp_path):
    data = _toy_data()
    _, straight = train_sde(_unet(), data, SCHEDULE, CFG, progress=False)
    ck = tmp_path / "u.pt"

    def crash(model, step):  # the run dies right after its step-3 checkpoint
        raise KeyboardInterrupt

    cfg = CFG.__class__(**{**CFG.__dict__, "val_every": 3})
    with pytest.raises(KeyboardInterrupt):
        train_sde(_unet(), data, SCHEDULE, cfg, checkpoint=ck, validate=crash, progress=False)
    # a fresh process rebuilds the network (other init), then resumes from the checkpoint
    _, resumed = train_sde(_unet(1), data, SCHEDULE, CFG, checkpoint=ck, resume=True,
                           progress=False)  # fmt: skip
    assert resumed.steps == 6
    assert resumed.losses == straight.losses


@pytest.mark.parametrize(
    ("loss_kind", "schedule"),
    [("ml", SCHEDULE), ("posterior", make_schedule(SDEConfig(T=2, schedule="constant")))],
)
def test_loss_falls_on_a_fixed_batch(loss_kind, schedule):
    data = _toy_data()
    unet = _unet()
    batch = sample_batch(data, 4, 16, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = training_loss(
            unet, batch, schedule, torch.Generator().manual_seed(1), loss=loss_kind
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_validate_callback_and_ema_copy():
    data = _toy_data()
    unet = _unet()
    seen = []

    def validate(model, step):
        assert model is not unet
        seen.append(step)
        return {"psnr": float(step)}

    cfg = CFG.__class__(**{**CFG.__dict__, "val_every": 2})
    ema, res = train_sde(unet, data, SCHEDULE, cfg, validate=validate, progress=False)
    assert seen == [2, 4, 6]
    assert [v["psnr"] for v in res.val] == [2.0, 4.0, 6.0]
    assert not any(p.requires_grad for p in ema.parameters())


def test_identity_init_predicts_the_marginal_noise_of_x0_equal_mu():
    lam = SCHEDULE.lam
    unet = identity_init(_unet(), lam)
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(2, 1, 24, 40, generator=g)
    z = torch.randn(2, 1, 24, 40, generator=g)
    t = torch.tensor([100, 100])
    x_t = forward_marginal(mu, mu, t, SCHEDULE, z)  # x0 = μ: x_t − μ = σ̄_T z and σ̄_T = λ
    with torch.no_grad():
        eps = unet(x_t, mu, t.float(), unet.condition(torch.randn(2, 6), torch.randn(2, 6)))
    assert torch.allclose(eps, z * float(SCHEDULE.sigma_bars[100]) / lam, atol=1e-4)


def test_identity_init_with_noise_skip_outputs_the_skip_alone():
    lam = SCHEDULE.lam
    torch.manual_seed(0)
    unet = identity_init(ConditionalUNet(dataclasses.replace(TOY_UNET, noise_skip=1 / lam)), lam)
    g = torch.Generator().manual_seed(1)
    x_t, mu = torch.rand(2, 1, 24, 40, generator=g), torch.rand(2, 1, 24, 40, generator=g)
    with torch.no_grad():
        cond = unet.condition(torch.randn(2, 6), torch.randn(2, 6))
        eps = unet(x_t, mu, torch.tensor([3.0, 70.0]), cond)
    torch.testing.assert_close(eps, (x_t - mu) / lam)
    with pytest.raises(ValueError, match="not 1/λ"):
        identity_init(ConditionalUNet(dataclasses.replace(TOY_UNET, noise_skip=2.0)), lam)


# --- DuDoCLIP ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_clip():
    pytest.importorskip("open_clip")
    from mar_rt.models.dudoclip import DuDoCLIP
    from mar_rt.train.presets import recipe_config

    return DuDoCLIP(recipe_config("smoke").clip, seed=0)


def test_multi_positive_info_nce_is_clip_loss_for_distinct_texts():
    from mar_rt.models.dudoclip import info_nce
    from mar_rt.train.clip_trainer import multi_positive_info_nce

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    scale = torch.tensor(2.0)
    ids = torch.tensor([4, 0, 6, 2, 1])
    got = multi_positive_info_nce(img, ids, txt, scale)
    # distinct ids: classes are the ids in sorted order; CLIP's loss pairs row i with its text
    order = torch.argsort(ids)
    assert torch.allclose(got, info_nce(img[order], txt[ids[order]], scale), atol=1e-6)


def test_multi_positive_info_nce_closed_form_with_duplicates():
    from mar_rt.train.clip_trainer import multi_positive_info_nce

    # images [e0, e0, e1] with texts (0, 0, 1) from the bank eye(3); scale s = e^4 (logits ±s)
    txt = torch.eye(3, dtype=torch.float64)
    img = torch.stack([txt[0], txt[0], txt[1]])
    got = multi_positive_info_nce(
        img, torch.tensor([0, 0, 1]), txt, torch.tensor(4.0, dtype=torch.float64)
    )
    s = np.exp(4.0)
    i2t = np.log1p(np.exp(-s))  # every row: −log(e^s / (e^s + 1))
    t2i_0 = np.log(2.0 + np.exp(-s))  # text 0, target ½ on each of its two images
    t2i_1 = np.log1p(2.0 * np.exp(-s))  # text 1, one image
    assert float(got) == pytest.approx(0.5 * (i2t + 0.5 * (t2i_0 + t2i_1)), rel=1e-9)


def test_text_projection_matches_open_clip(toy_clip):
    from mar_rt.train.clip_trainer import project_text, text_features

    texts = ["CT slice of the chest", "CT slice with large metal and severe streaks"]
    got = project_text(toy_clip, text_features(toy_clip, texts))
    want = toy_clip.encode_text(toy_clip.tokenize(texts))
    assert torch.allclose(got, want, atol=1e-5)
    assert toy_clip.clip.text_projection is not None


def test_clip_training_lowers_the_loss_and_only_moves_the_controller(toy_clip):
    from mar_rt.models import prompts
    from mar_rt.train.clip_trainer import ClipTrainConfig, train_clip

    model = copy.deepcopy(toy_clip)
    frozen = {k: v.clone() for k, v in model.clip.visual.state_dict().items()}
    metas, images = [], []
    for i, (size, sev) in enumerate(
        [(40, "mild"), (900, "severe"), (300, "moderate"), (60, "none")]
    ):
        mask = np.zeros((64, 64), bool)
        r = int(np.sqrt(size / np.pi) * 64 / 416) + 1
        mask[30 - r : 30 + r, 20 - r : 20 + r] = True
        facts = prompts.describe_metal(mask)
        metas.append(PairMeta(f"s{i}", 0, i, "Ti", int(mask.sum()), "disc", sev, "abdomen",
                                facts.to_dict()))  # fmt: skip
        images.append(torch.full((1, 64, 64), 0.1 * i) + torch.from_numpy(mask).float()[None])
    cfg = ClipTrainConfig(steps=25, batch=4, lr=2e-3, warmup=2, log_every=0, seed=0)
    res = train_clip(model, torch.stack(images), metas, cfg, domain="image",
                     val_inputs=torch.stack(images), val_metas=metas, progress=False)  # fmt: skip
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5])
    for k, v in model.clip.visual.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert "before" in res.zero_shot and "after" in res.zero_shot
    assert res.zero_shot["after"]["chance_uniform"] == pytest.approx(1 / 21)


def test_unknown_loss_is_refused_when_configured():
    with pytest.raises(ValueError, match="loss must be one of"):
        SDETrainConfig(loss="l2")


def test_zero_shot_report_scores_labels_and_their_factors(toy_clip, monkeypatch):
    from mar_rt.models import prompts
    from mar_rt.train import clip_trainer as C

    label_emb = C.project_text(toy_clip, C.text_features(toy_clip, prompts.zero_shot_labels()))
    predicted = [5, 7, 14]  # small/none, small/moderate, large/mild

    def embed_as_labels(model, inputs):  # artifact_emb = the predicted label's own embedding
        return label_emb[predicted], label_emb[predicted]

    monkeypatch.setattr(C, "embed", embed_as_labels)

    class Meta:
        def __init__(self, target):
            self.target = target

        def zero_shot_target(self):
            return self.target

    # truth: small/none, small/mild, medium/mild
    report = C.zero_shot_report(toy_clip, torch.zeros(3, 1, 8, 8), [Meta(5), Meta(6), Meta(10)])
    assert report["accuracy"] == pytest.approx(1 / 3)
    assert report["size_accuracy"] == pytest.approx(2 / 3)
    assert report["severity_accuracy"] == pytest.approx(2 / 3)
    assert (report["n"], report["classes_present"]) == (3, 3)
    assert report["majority_rate"] == pytest.approx(1 / 3)


def test_clip_training_is_reproducible_for_a_seed(toy_clip):
    from mar_rt.models import prompts
    from mar_rt.train.clip_trainer import ClipTrainConfig, train_clip

    metas, images = [], []
    for i, size in enumerate((40, 300, 900)):
        mask = np.zeros((64, 64), bool)
        r = int(np.sqrt(size / np.pi) * 64 / 416) + 1
        mask[20 - r : 20 + r, 30 - r : 30 + r] = True
        facts = prompts.describe_metal(mask)
        metas.append(PairMeta(f"s{i}", 0, i, "Ti", int(mask.sum()), "disc", "mild", "chest",
                                facts.to_dict()))  # fmt: skip
        images.append(torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(i)))
    cfg = ClipTrainConfig(steps=6, batch=2, lr=1e-3, warmup=2, log_every=0, seed=5)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(toy_clip)
        res = train_clip(model, torch.stack(images), metas, cfg, domain="sinogram", progress=False)
        runs.append((res.losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k
    other_cfg = dataclasses.replace(cfg, seed=6)
    other = train_clip(
        copy.deepcopy(toy_clip), torch.stack(images), metas, other_cfg, domain="sinogram",
        progress=False,
    )  # fmt: skip
    assert other.losses != runs[0][0]
