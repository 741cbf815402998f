"""Untrained test bundles for the export and engine tests, built (and exported) once per
pytest session under the session's base temp dir, so every module asking for one shares it.

The networks' zero-initialised layers (DuDoCLIP's control Linears, the transformers'
``proj_out``) get small seeded random weights, so every path of every graph carries signal and
the export checks can fail where a path is exported wrongly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.export.onnx_export import export_bundle
from mar_rt.export.verify import demo_real_slice
from mar_rt.models.bundle import load_bundle, save_bundle
from mar_rt.runtime.config import PipelineConfig
from mar_rt.runtime.demo import make_untrained_bundle, small_geometry

SMALL = 64
"""Image size of the fast test geometry (96 views × 97 bins)."""


def perturb_zero_init(module: torch.nn.Module, seed: int) -> None:
    """Give zero-initialised Linear/Conv layers small seeded random weights (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.abs().max() == 0 and ("zero_modules" in name or "proj_out" in name):
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))


def make_live_bundle(
    folder: Path, *, config: str, geometry: FanBeamGeometry, seed: int = 0, steps: int = 2
) -> Path:
    """An untrained bundle whose zero-initialised layers were perturbed (see module doc)."""
    tmp = folder.with_name(folder.name + "-untrained")
    make_untrained_bundle(
        tmp,
        config=config,
        seed=seed,
        geometry=geometry,
        pipeline=PipelineConfig(steps=steps, image_size=geometry.n_rows),
        overwrite=True,
    )
    bundle = load_bundle(tmp)
    manifest = bundle.config
    modules = {}
    for k, name in enumerate(bundle.network_names):
        net = bundle.build(name)
        perturb_zero_init(net, seed + 17 * k)
        modules[name] = net
    sections = {key: manifest[key] for key in ("sde", "geometry", "normalisation", "pipeline")}
    sections["prompt_version"] = manifest["prompt_version"]
    save_bundle(folder, sections, modules, overwrite=True)
    return folder


def live_micro_bundle(factory: pytest.TempPathFactory) -> Path:
    """Micro networks (perturbed) on the 64² geometry, not exported."""
    folder = factory.getbasetemp() / "export-micro-64"
    if not (folder / "bundle.json").is_file():
        make_live_bundle(folder, config="micro", geometry=small_geometry(SMALL))
    return folder


def exported_micro_bundle(factory: pytest.TempPathFactory) -> Path:
    """``live_micro_bundle`` with every graph exported to ``onnx/`` and verified (real feed:
    the shipped demo slice, a real CT slice, projected in the 64² geometry)."""
    folder = live_micro_bundle(factory)
    if not (folder / "onnx" / "manifest.json").is_file():
        bundle = load_bundle(folder)
        export_bundle(bundle, real_inputs=demo_real_slice(small_geometry(SMALL)))
    return folder


def retrained_copy(src: Path, dst: Path, network: str, change) -> Path:
    """Copy bundle ``src`` (with its onnx/ and engines/) to ``dst`` and replace the weights of
    ``network`` by ``change(module)``'s edit, as a retrained network would: only that weights
    file and its sha256 in ``bundle.json`` change."""
    import json
    import shutil

    from safetensors.torch import save_file

    from mar_rt.models.bundle import sha256_file

    shutil.copytree(src, dst)
    bundle = load_bundle(dst)
    net = bundle.build(network)
    with torch.no_grad():
        change(net)
    entry = bundle.config["networks"][network]
    path = dst / entry["weights"]
    tensors = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    manifest = json.loads((dst / "bundle.json").read_text())
    manifest["networks"][network]["sha256"] = sha256_file(path)
    (dst / "bundle.json").write_text(json.dumps(manifest, indent=2))
    return dst
