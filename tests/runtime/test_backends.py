"""The backend base (state and feed checks, buffers), the torch backend against the bundle's
own modules, the graph set, and backend resolution."""

from __future__ import annotations

import pytest
import torch

from mar_rt.errors import BackendUnavailableError, MarRtError
from mar_rt.export.graphs import GRAPH_NAMES, bundle_graph_specs
from mar_rt.models.bundle import load_bundle
from mar_rt.runtime.backends import (
    BackendStateError,
    FeedError,
    GraphSet,
    backend_class,
    resolve_backend,
)
from mar_rt.runtime.backends.base import Backend
from mar_rt.runtime.backends.torch_backend import TorchBackend
from tests.runtime._runtime_bundles import SMALL, micro_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(micro_bundle(tmp_path_factory))


def _feed(spec, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feed = {}
    for name, t in spec.inputs.items():
        shape = tuple(batch if d == "B" else d for d in t.shape)
        feed[name] = torch.rand(shape, generator=gen) * (100.0 if name == "t" else 1.0)
    return feed


def test_specs_follow_bundle_configs(bundle):
    specs = bundle_graph_specs(bundle)
    assert set(specs) == set(GRAPH_NAMES)
    d = bundle.network_config("clip_image").embed_dim
    c = bundle.network_config("unet_sinogram").cond_dim
    assert specs["clip_image"].inputs["image"].shape == ("B", 1, SMALL, SMALL)
    assert specs["clip_image"].outputs["content_emb"].shape == ("B", d)
    assert specs["unet_sinogram_step"].inputs["x_t"].shape == ("B", 1, 96, 97)
    assert specs["unet_sinogram_step"].inputs["cond"].shape == ("B", c)
    assert specs["unet_residual_step"].outputs["eps"].shape == ("B", 1, SMALL, SMALL)
    assert list(specs["unet_image_step"].inputs) == ["x_t", "mu", "t", "cond"]


def test_lifecycle_and_state_errors(bundle):
    backend = TorchBackend.from_bundle(bundle, "unet_image_cond")
    feed = _feed(backend.spec)
    with pytest.raises(BackendStateError, match="unet_image_cond.*before activate"):
        backend.infer(feed)
    with backend:
        assert backend.is_active
        with pytest.raises(BackendStateError, match="already active"):
            backend.activate()
        backend.infer(feed)
    assert not backend.is_active
    with pytest.raises(BackendStateError):
        backend.infer(feed)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda f: f.pop("t"), r"missing \['t'\]"),
        (lambda f: f.update(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
        (lambda f: f.update(mu=f["mu"].double()), r"input 'mu' has dtype torch.float64"),
        (lambda f: f.update(x_t=f["x_t"][..., :-1]), r"input 'x_t' has shape"),
        (lambda f: f.update(t=torch.zeros(2)), r"input 't' has B = 2"),
        (lambda f: f.update(cond=f["cond"][0]), r"input 'cond' has shape"),
        (lambda f: f.update(mu=f["mu"].numpy()), r"input 'mu' is ndarray"),
    ],
)
def test_feed_errors_name_graph_and_tensor(bundle, change, pattern):
    with TorchBackend.from_bundle(bundle, "unet_image_step") as backend:
        feed = _feed(backend.spec)
        change(feed)
        with pytest.raises(FeedError, match=pattern) as info:
            backend.infer(feed)
        assert "unet_image_step" in str(info.value)
        assert isinstance(info.value, MarRtError)


def test_outputs_alias_buffers_per_shape(bundle):
    with TorchBackend.from_bundle(bundle, "unet_image_step") as backend:
        a = backend.infer(_feed(backend.spec, seed=1))["eps"]
        a_copy = a.clone()
        b = backend.infer(_feed(backend.spec, seed=2))["eps"]
        assert a.data_ptr() == b.data_ptr()  # the same internal buffer, overwritten
        assert not torch.equal(a, a_copy)
        kept = backend.infer(_feed(backend.spec, seed=1), copy_outputs=True)["eps"]
        assert torch.equal(kept, a_copy) and kept.data_ptr() != b.data_ptr()
        two = backend.infer(_feed(backend.spec, batch=2))["eps"]
        assert two.shape == (2, 1, SMALL, SMALL) and two.data_ptr() != b.data_ptr()


def test_torch_backend_matches_the_bundle_modules(bundle):
    """Each graph equals a direct call of a freshly built bundle network."""
    clip = bundle.build("clip_sinogram")
    unet = bundle.build("unet_residual")
    specs = bundle_graph_specs(bundle)
    with torch.inference_mode():
        f = _feed(specs["clip_sinogram"], batch=2)
        with TorchBackend.from_bundle(bundle, "clip_sinogram") as b:
            got = b.infer(f)
        want = clip(f["image"])
        assert torch.equal(got["content_emb"], want[0])
        assert torch.equal(got["artifact_emb"], want[1])

        f = _feed(specs["unet_residual_cond"], batch=2)
        with TorchBackend.from_bundle(bundle, "unet_residual_cond") as b:
            cond = b.infer(f)["cond"]
        assert torch.equal(cond, unet.condition(f["content_emb"], f["artifact_emb"]))

        f = _feed(specs["unet_residual_step"], batch=2)
        with TorchBackend.from_bundle(bundle, "unet_residual_step") as b:
            eps = b.infer(f)["eps"]
        assert torch.equal(eps, unet(f["x_t"], f["mu"], f["t"], f["cond"]))


def test_graph_set_builds_activates_and_shares_modules(bundle):
    graphs = GraphSet.from_bundle(bundle, "torch", device="cpu")
    assert set(graphs) == set(GRAPH_NAMES) and len(graphs) == len(GRAPH_NAMES)
    assert graphs["unet_image_cond"]._source.unet is graphs["unet_image_step"]._source
    with graphs:
        assert all(b.is_active for b in graphs.values())
        out = graphs["clip_image"].infer(_feed(graphs["clip_image"].spec))
        assert set(out) == {"content_emb", "artifact_emb"}
    assert not any(b.is_active for b in graphs.values())
    with pytest.raises(BackendUnavailableError, match="graph 'nope'"):
        graphs["nope"]


def test_subclass_needs_only_impls(bundle):
    """A minimal backend: the base does the checks and buffers."""

    class Doubler(Backend):
        name = "doubler"

        def _activate_impl(self):
            self.calls = 0

        def _infer_impl(self, inputs, outputs):
            self.calls += 1
            outputs["eps"].copy_(2 * inputs["x_t"])

        def _deactivate_impl(self):
            pass

    spec = bundle_graph_specs(bundle)["unet_image_step"]
    with Doubler(spec) as b:
        f = _feed(spec)
        assert torch.equal(b.infer(f)["eps"], 2 * f["x_t"])
        with pytest.raises(FeedError):
            b.infer({"x_t": f["x_t"]})
        assert b.calls == 1


def test_backend_registry_and_resolution():
    assert backend_class("torch") is TorchBackend
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'"):
        backend_class("nope")
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        resolve_backend("nope")
    choice = resolve_backend("torch", device="cpu")
    assert (choice.backend, choice.device) == ("torch", "cpu")
    if torch.cuda.is_available():
        pytest.skip("the fallback check below assumes a CPU-only machine")
    choice = resolve_backend("tensorrt", device="cpu")
    assert choice.device == "cpu" and choice.backend in ("torch", "onnxruntime")
    assert "tensorrt" in choice.reason and "falling back" in choice.reason


def test_fp16_torch_needs_cuda(bundle):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(BackendUnavailableError, match="fp16 needs a CUDA device"):
        TorchBackend.from_bundle(bundle, "unet_image_step", precision="fp16")
