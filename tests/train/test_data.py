"""Training data: split, seeds, augmentation geometry (against the projector), batches, cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import mar_rt.train.clip_set as clip_set_module
from mar_rt.ct import units
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.mar import nmar_correct
from mar_rt.ct.masks import body_outline
from mar_rt.ct.projector import forward_project
from mar_rt.ct.syndeeplesion import read_case, read_gt
from mar_rt.errors import BadInputError
from mar_rt.train.augment import crop_origin, sample_batch, sino_roll_mirror
from mar_rt.train.clip_set import clip_inputs, clip_set
from mar_rt.train.data_config import DataConfig, training_jobs
from mar_rt.train.domains import DomainData, focus_points, image_domain, with_nmar
from mar_rt.train.implants import TRAIN_SIZE_BINS, draw_implant
from mar_rt.train.pair_meta import PairMeta, pair_seed
from mar_rt.train.pairs import generate_pairs, read_pair_folder, simulate_pair
from mar_rt.train.phantoms import ellipse_phantom
from mar_rt.train.sources import CleanSlice
from mar_rt.train.split import RESERVED_VAL_ID, check_no_validation, split_slices


def _slice(sid: str, seed: int = 0) -> CleanSlice:
    return CleanSlice(sid, np.zeros((4, 4), np.float32) + seed, "test")


def test_split_is_deterministic_and_keeps_reserved_out():
    ids = ["b", RESERVED_VAL_ID, "a", "cleanct_000374_06_01_278", "c"]
    slices = [_slice(i) for i in ids]
    train1, val1 = split_slices(slices)
    train2, val2 = split_slices(list(reversed(slices)))
    assert [s.slice_id for s in train1] == [s.slice_id for s in train2] == ["a", "b", "c"]
    assert {s.slice_id for s in val1} == {RESERVED_VAL_ID, "cleanct_000374_06_01_278"}
    assert [s.slice_id for s in val1] == [s.slice_id for s in val2]
    # the reserved slice is validation even when the caller names no validation ids
    train3, val3 = split_slices(slices, val_ids=())
    assert RESERVED_VAL_ID not in {s.slice_id for s in train3}
    assert [s.slice_id for s in val3] == [RESERVED_VAL_ID]


def test_check_no_validation():
    meta = PairMeta(RESERVED_VAL_ID, 0, 1, "Ti", 100, "disc", "mild", "chest")
    with pytest.raises(BadInputError):
        check_no_validation([meta])
    check_no_validation([dataclasses.replace(meta, slice_id="a")])


def test_pair_seed_and_jobs():
    assert pair_seed(0, "a", 1) == pair_seed(0, "a", 1)
    assert len({pair_seed(0, "a", k) for k in range(50)}) == 50
    assert pair_seed(0, "a", 1) != pair_seed(1, "a", 1)
    slices = [_slice("x"), _slice("phantom_0_000"), _slice("y")]
    jobs = training_jobs(slices, DataConfig(masks_per_slice=3, phantom_masks=1))
    # k-major: every slice gets its first pair before any slice gets a second
    assert jobs[:3] == [(0, 0, None), (1, 0, None), (2, 0, None)]
    assert sorted(jobs) == sorted([(0, 0, None), (0, 1, None), (0, 2, None), (1, 0, None),
                                   (2, 0, None), (2, 1, None), (2, 2, None)])  # fmt: skip


@pytest.fixture(scope="module")
def small_geometry() -> FanBeamGeometry:
    g = FanBeamGeometry.syndeeplesion().with_image_size(64)
    return dataclasses.replace(g, n_views=128, n_det=97, det_spacing=g.det_spacing * 641 / 97)


def test_sinogram_mirror_is_the_mirrored_object(small_geometry):
    img = torch.from_numpy(ellipse_phantom(5, (64, 64)))[None].double()
    img[..., 10:20, 40:44] += 0.3  # break the left-right symmetry
    y = forward_project(img, small_geometry)
    y_mirror = forward_project(torch.flip(img, dims=(-1,)), small_geometry)
    got = sino_roll_mirror(y, 0, True)
    assert torch.allclose(got, y_mirror, atol=1e-6 * float(y.abs().max()))


def test_sinogram_roll_is_the_rotated_object(small_geometry):
    img = torch.from_numpy(ellipse_phantom(6, (64, 64)))[None].double()
    img[..., 10:20, 40:44] += 0.3
    y = forward_project(img, small_geometry)
    y_rot = forward_project(torch.rot90(img, 1, dims=(-2, -1)), small_geometry)
    got = sino_roll_mirror(y, small_geometry.n_views // 4, False)
    assert torch.allclose(got, y_rot, atol=1e-6 * float(y.abs().max()))


def _domain(kind: str, n: int = 5, size: tuple[int, int] = (40, 48)) -> DomainData:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(n, 1, *size, generator=g)
    focus = torch.zeros(n, *size, dtype=torch.bool)
    focus[:, 5:8, 30:33] = True
    return DomainData(
        kind=kind, x0=x0, mu=x0 * 0.5, weight=torch.ones_like(x0),
        points=focus_points(focus), content=torch.arange(n * 3.0).reshape(n, 3),
        artifact=-torch.arange(n * 3.0).reshape(n, 3),
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["image", "sinogram", "residual"])
def test_sample_batch_is_seeded_and_consistent(kind):
    data = _domain(kind)
    a = sample_batch(data, 6, 16, torch.Generator().manual_seed(3), jitter=0.0)
    b = sample_batch(data, 6, 16, torch.Generator().manual_seed(3), jitter=0.0)
    for key in a:
        assert torch.equal(a[key], b[key])
    assert a["x0"].shape == (6, 1, 16, 16) and a["content"].shape == (6, 3)
    # without jitter the same transform hits target and μ (μ = x0 / 2 everywhere)
    assert torch.allclose(a["mu"], a["x0"] * 0.5)
    # the embeddings belong to the sampled items
    idx = (a["content"][:, 0] / 3).long()
    assert torch.equal(a["artifact"], data.artifact[idx])
    c = sample_batch(data, 6, 16, torch.Generator().manual_seed(4), jitter=0.0)
    assert not torch.equal(a["x0"], c["x0"])


def test_sample_batch_focus_and_wrap():
    data = _domain("sinogram")
    batch = sample_batch(data, 4, 8, torch.Generator().manual_seed(0), p_focus=1.0, augment=False)
    for x in batch["x0"]:
        # every focused crop is centred on the focus block, so it is a crop of the item
        assert any(
            torch.equal(x[0], data.x0[i, 0, r : r + 8, c : c + 8])
            for i in range(len(data)) for r in range(0, 33) for c in range(0, 41)
        )  # fmt: skip
    r, c = crop_origin((40, 48), 16, torch.tensor([[0, 0]], dtype=torch.int32), 1.0,
                         torch.Generator(), wrap_rows=True)  # fmt: skip
    assert (r, c) == (40 - 8, 0)


def test_generate_pairs_cache_round_trip(tmp_path):
    slices = [CleanSlice("toy_a", ellipse_phantom(11, region="pelvis"), "phantom", "generated")]
    first = generate_pairs(slices, [(0, 0, None)], seed=7, cache_dir=tmp_path)
    again = generate_pairs(slices, [(0, 0, None)], seed=7, cache_dir=tmp_path)
    for name, value in first.fields.items():
        assert torch.equal(value, again.fields[name]), name
    meta = first.metas[0]
    assert meta == again.metas[0]
    assert meta.metal_px == int(first.fields["mask"][0].sum())
    assert TRAIN_SIZE_BINS[0][0] * 0.9 <= meta.metal_px <= TRAIN_SIZE_BINS[0][1] * 1.1
    # the SynDeepLesion layout, readable by the official-layout readers
    gt = read_gt(tmp_path / "toy_a" / "gt.h5")
    case = read_case(tmp_path / "toy_a" / "0.h5")
    np.testing.assert_array_equal(gt["image"], slices[0].image_mu)
    np.testing.assert_array_equal(case["mask"] > 0, first.fields["mask"][0].numpy())
    # the metal raises ma_CT well above the clean image inside the implant
    m = first.fields["mask"][0]
    assert float(first.fields["ma_CT"][0][m].mean()) > 0.672
    assert meta.artifact_texts() and meta.content_texts()
    back = read_pair_folder(tmp_path)
    assert back.metas[0].to_dict() == meta.to_dict()
    # without a cache the same seed simulates the same pair (the GPU path keeps pairs in memory)
    mem = generate_pairs(slices, [(0, 0, None)], seed=7)
    for name, value in first.fields.items():
        assert torch.equal(value, mem.fields[name]), name
    assert mem.metas == first.metas
    # mu_source="nmar": the NMAR pair of each pair's measured sinogram, as nmar_correct makes it
    nm = with_nmar(first)
    f = first.fields
    ref = nmar_correct(f["ma_CT"][0], f["mask"][0], FanBeamGeometry.syndeeplesion(),
                       f["ma_sinogram"][0])  # fmt: skip
    torch.testing.assert_close(nm.fields["NMAR_CT"][0], ref["nmar_image"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nm.fields["NMAR_sinogram"][0], ref["nmar_sinogram"])
    dom = image_domain(nm, torch.zeros(1, 4), torch.zeros(1, 4), mu_source="nmar")
    torch.testing.assert_close(dom.mu[0, 0], units.image_to_net(ref["nmar_image"]))
    with pytest.raises(ValueError, match="NMAR_CT"):
        image_domain(first, torch.zeros(1, 4), torch.zeros(1, 4), mu_source="nmar")


def test_nmar_fields_cache_is_read_for_the_same_inputs_only(tmp_path, monkeypatch):
    import mar_rt.train.domains as domains

    slices = [CleanSlice("toy_a", ellipse_phantom(11, region="pelvis"), "phantom", "generated")]
    pairs = generate_pairs(slices, [(0, 0, None), (0, 2, None)], seed=7)
    fresh = with_nmar(pairs)
    cached = with_nmar(pairs, cache_dir=tmp_path / "nmar")
    (stored,) = (tmp_path / "nmar").glob("nmar-*.pt")
    for name in ("NMAR_CT", "NMAR_sinogram"):
        assert torch.equal(cached.fields[name], fresh.fields[name]), name

    def no_compute(*args, **kwargs):
        raise AssertionError("NMAR computed again")

    monkeypatch.setattr(domains, "_nmar_fields", no_compute)
    again = with_nmar(pairs, cache_dir=tmp_path / "nmar")  # read back, not computed
    for name in ("NMAR_CT", "NMAR_sinogram"):
        assert torch.equal(again.fields[name], fresh.fields[name]), name
    # other inputs (one sinogram value changed) miss the stored file
    f = dict(pairs.fields, ma_sinogram=pairs.fields["ma_sinogram"].clone())
    f["ma_sinogram"][1, 0, 0] += 1.0
    with pytest.raises(AssertionError, match="computed again"):
        with_nmar(type(pairs)(pairs.metas, f), cache_dir=tmp_path / "nmar")
    assert list((tmp_path / "nmar").glob("nmar-*.pt")) == [stored]


def test_clip_set_is_what_dudoclip_sees_of_the_pairs_and_caches(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    from mar_rt.models.dudoclip import DuDoCLIP, DuDoCLIPConfig

    cfg = DuDoCLIPConfig(
        embed_dim=16, image_size=32,
        vision_cfg={"layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
    )  # fmt: skip
    model = DuDoCLIP(cfg, seed=3).eval()
    slices = [CleanSlice("toy_a", ellipse_phantom(11, region="pelvis"), "phantom", "generated")]
    jobs = [(0, 0, None), (0, 3, None)]
    cache = tmp_path / "clip.pt"
    small = clip_set(slices, jobs, seed=7, size=32, cache_file=cache, chunk=1)
    pairs = generate_pairs(slices, jobs, seed=7)
    assert small.metas == pairs.metas
    with torch.no_grad():
        for domain in ("image", "sinogram"):
            full = clip_inputs(pairs, domain)
            assert small.inputs[domain].shape == (2, 1, 32, 32)
            # the tower-size input embeds exactly as the full-size one does
            for a, b in zip(model(small.inputs[domain]), model(full), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def no_simulation(*args, **kwargs):
        raise AssertionError("simulated although the cache holds these pairs")

    monkeypatch.setattr(clip_set_module, "generate_pairs", no_simulation)
    again = clip_set(slices, jobs, seed=7, size=32, cache_file=cache)
    assert again.metas == small.metas
    for domain, x in small.inputs.items():
        assert torch.equal(again.inputs[domain], x)
    # another seed is another set: the stale cache is not read
    with pytest.raises(AssertionError, match="simulated although"):
        clip_set(slices, jobs, seed=8, size=32, cache_file=cache)
    assert not list(tmp_path.glob(".*.tmp"))


def test_clip_set_stops_at_its_deadline_after_one_chunk(tmp_path):
    """A passed deadline leaves the first chunk (both slices, interleaved jobs); the cache
    holds that set, so the full job list simulates again instead of reading it."""
    slices = [
        CleanSlice("toy_a", ellipse_phantom(11, region="pelvis"), "phantom", "generated"),
        CleanSlice("toy_b", ellipse_phantom(12, region="chest"), "phantom", "generated"),
    ]
    cfg = DataConfig(masks_per_slice=2, phantoms=0, phantom_masks=2)
    jobs = training_jobs(slices, cfg)
    assert jobs == [(0, 0, None), (1, 0, None), (0, 1, None), (1, 1, None)]
    cache = tmp_path / "clip.pt"
    cut = clip_set(slices, jobs, seed=7, size=32, chunk=2, cache_file=cache, deadline=0.0)
    assert [m.case for m in cut.metas] == ["toy_a/0", "toy_b/0"]
    assert cut.inputs["image"].shape[0] == 2
    whole = clip_set(slices, jobs, seed=7, size=32, chunk=2, cache_file=cache)
    assert [m.case for m in whole.metas] == ["toy_a/0", "toy_b/0", "toy_a/1", "toy_b/1"]
    assert torch.equal(whole.inputs["image"][:2], cut.inputs["image"])


def test_clip_set_clean_scan_is_the_simulators_metal_free_scan():
    slices = [
        CleanSlice("toy_a", ellipse_phantom(11, region="pelvis"), "phantom", "generated"),
        CleanSlice("toy_b", ellipse_phantom(12, region="chest"), "phantom", "generated"),
    ]
    jobs = [(0, 0, None), (1, 0, None), (0, 1, None)]
    got = clip_set(slices, jobs, seed=7, size=416, chunk=2, clean=True)
    # chunk 1: a/0, b/0 and both clean scans; chunk 2: a/1 only (a's clean scan is made)
    assert [m.case for m in got.metas] == ["toy_a/0", "toy_b/0", "toy_a/-1", "toy_b/-1", "toy_a/1"]
    for j, (si, meta) in enumerate([(0, got.metas[2]), (1, got.metas[3])]):
        first = got.metas[j]
        sim = simulate_pair(
            slices[si].image_mu, draw_implant(body_outline(slices[si].image_mu), first.seed,
                                                bin_index=0)[0],
            material=first.material, seed=first.seed, device="cpu",
        )  # fmt: skip
        assert meta.zero_shot_target() == 0 and meta.metal_px == 0 and meta.severity == "none"
        torch.testing.assert_close(
            got.inputs["image"][2 + j, 0], units.image_to_net(sim["poly_CT"]), atol=1e-5, rtol=0
        )
        sino = units.sino_to_net(sim["poly_sinogram"])[None, None]
        torch.testing.assert_close(
            got.inputs["sinogram"][2 + j],
            torch.nn.functional.interpolate(sino, size=(416, 416), mode="bilinear")[0],
        )
