"""The graphs every backend runs: fixed names and IO (docs/interfaces.md "Graphs", DESIGN §10).

A bundle holds five networks; each U-Net is split in two graphs so that conditioning runs
once per image:

    clip_image, clip_sinogram   image (B,1,H,W) in [0,1]          → content_emb, artifact_emb (B,D)
    unet_<domain>_cond          content_emb, artifact_emb (B,D)   → cond (B,C)
    unet_<domain>_step          x_t, mu (B,1,H,W), t (B,), cond   → eps (B,1,H,W)

with <domain> ∈ image, sinogram, residual (the residual net runs on the image grid and takes
the image-domain embeddings). Shapes are symbolic in the batch ``"B"`` only; H, W, D, C are
fixed by the bundle, as static-shape engines need.

``graph_module(network, graph)`` gives the plain ``nn.Module`` whose ``forward`` takes the
graph inputs in order and returns its outputs in order; the torch backend runs it and the
ONNX exporter can trace it. ``bundle_graph_specs`` / ``bundle_graph_module`` read both from a
loaded ``mar_rt.models.bundle.Bundle``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from mar_rt.errors import MarRtError

DOMAINS = ("image", "sinogram", "residual")
CLIP_DOMAINS = ("image", "sinogram")


def clip_graph(domain: str) -> str:
    """``clip_image`` / ``clip_sinogram``."""
    return f"clip_{domain}"


def cond_graph(domain: str) -> str:
    """``unet_<domain>_cond``."""
    return f"unet_{domain}_cond"


def step_graph(domain: str) -> str:
    """``unet_<domain>_step``."""
    return f"unet_{domain}_step"


GRAPH_NAMES = (
    *(clip_graph(d) for d in CLIP_DOMAINS),
    *(g for d in DOMAINS for g in (cond_graph(d), step_graph(d))),
)

NETWORK_OF_GRAPH = MappingProxyType(
    {
        **{clip_graph(d): f"clip_{d}" for d in CLIP_DOMAINS},
        **{cond_graph(d): f"unet_{d}" for d in DOMAINS},
        **{step_graph(d): f"unet_{d}" for d in DOMAINS},
    }
)
"""Graph name → name of the bundle network it runs."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape (int = fixed, str = named free dim) and dtype of one graph tensor."""

    shape: tuple[int | str, ...]
    dtype: torch.dtype = torch.float32

    def shape_str(self) -> str:
        return "(" + ", ".join(str(d) for d in self.shape) + ")"

    def resolve(self, dims: Mapping[str, int], graph: str, name: str) -> tuple[int, ...]:
        """Concrete shape given the free dims' values."""
        try:
            return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)
        except KeyError as exc:
            raise MarRtError(
                f"graph {graph}: output {name!r} needs dim {exc.args[0]!r}, which no input sets"
            ) from None


@dataclass(frozen=True)
class GraphSpec:
    """One graph: name, ordered inputs and outputs."""

    name: str
    inputs: Mapping[str, TensorSpec] = field(default_factory=dict)
    outputs: Mapping[str, TensorSpec] = field(default_factory=dict)


def graph_specs(
    *,
    image_shape: tuple[int, int],
    sino_shape: tuple[int, int],
    embed_dims: Mapping[str, int],
    cond_dims: Mapping[str, int],
    clip_inputs: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, GraphSpec]:
    """All graph specs of a bundle.

    Args:
        image_shape: (H, W) of the image grid (image and residual domains).
        sino_shape: (V, D) of the sinogram (views, detector bins).
        embed_dims: CLIP embedding width per CLIP domain (``image``, ``sinogram``).
        cond_dims: U-Net conditioning width per domain (``image``, ``sinogram``, ``residual``).
        clip_inputs: (S, S) per CLIP domain whose graph takes host-preprocessed pixels instead
            of the domain grid (DuDoCLIP ``preprocess="daclip"``: the PIL step runs on the
            host, ``mar_rt.models.dudoclip.daclip_pixels``).
    """
    grids = {"image": image_shape, "sinogram": sino_shape, "residual": image_shape}
    clip_of = {"image": "image", "sinogram": "sinogram", "residual": "image"}
    specs: dict[str, GraphSpec] = {}
    for d in CLIP_DOMAINS:
        h, w = (clip_inputs or {}).get(d, grids[d])
        e = int(embed_dims[d])
        specs[clip_graph(d)] = GraphSpec(
            clip_graph(d),
            MappingProxyType({"image": TensorSpec(("B", 1, h, w))}),
            MappingProxyType(
                {"content_emb": TensorSpec(("B", e)), "artifact_emb": TensorSpec(("B", e))}
            ),
        )
    for d in DOMAINS:
        h, w = grids[d]
        e = int(embed_dims[clip_of[d]])
        c = int(cond_dims[d])
        specs[cond_graph(d)] = GraphSpec(
            cond_graph(d),
            MappingProxyType(
                {"content_emb": TensorSpec(("B", e)), "artifact_emb": TensorSpec(("B", e))}
            ),
            MappingProxyType({"cond": TensorSpec(("B", c))}),
        )
        specs[step_graph(d)] = GraphSpec(
            step_graph(d),
            MappingProxyType(
                {
                    "x_t": TensorSpec(("B", 1, h, w)),
                    "mu": TensorSpec(("B", 1, h, w)),
                    "t": TensorSpec(("B",)),
                    "cond": TensorSpec(("B", c)),
                }
            ),
            MappingProxyType({"eps": TensorSpec(("B", 1, h, w))}),
        )
    return specs


# ------------------------------------------------------------------ torch graph modules
def graph_module(network: nn.Module, graph: str) -> nn.Module:
    """The ``nn.Module`` of ``graph`` over a bundle network (inputs and outputs in order).

    ``clip_*``: the DuDoCLIP itself (``image`` → content, artifact); ``unet_*_cond``:
    ``mar_rt.models.unet.UNetConditioner``; ``unet_*_step``: the ``ConditionalUNet`` itself,
    whose ``forward(x_t, mu, t, cond)`` is the step graph.
    """
    if graph not in NETWORK_OF_GRAPH:
        raise MarRtError(f"unknown graph {graph!r}; expected one of {GRAPH_NAMES}")
    if graph.endswith("_cond"):
        from mar_rt.models.unet import UNetConditioner

        return UNetConditioner(network)
    return network


# ------------------------------------------------------------------ bundle access
def bundle_graph_names(bundle: Any) -> tuple[str, ...]:
    """The graphs whose network the bundle holds (all of ``GRAPH_NAMES`` for a full bundle)."""
    have = set(bundle.network_names)
    return tuple(g for g in GRAPH_NAMES if NETWORK_OF_GRAPH[g] in have)


def bundle_graph_specs(bundle: Any) -> dict[str, GraphSpec]:
    """Graph specs from a loaded ``mar_rt.models.bundle.Bundle``: grids from its geometry,
    D from each DuDoCLIP's ``embed_dim`` (or the U-Net's ``context_dim`` without CLIP), C from
    each U-Net's ``cond_dim``."""
    from mar_rt.ct.geometry import FanBeamGeometry

    geometry = FanBeamGeometry(**bundle.config["geometry"])
    names = set(bundle.network_names)
    embed: dict[str, int] = {}
    cond: dict[str, int] = {}
    clip_inputs: dict[str, tuple[int, int]] = {}
    for d in DOMAINS:
        net = f"unet_{d}"
        if net not in names:
            raise MarRtError(f"bundle {bundle.folder}: network {net!r} is missing")
        cfg = bundle.network_config(net)
        cond[d] = int(cfg.cond_dim)
        if d in CLIP_DOMAINS:
            clip = f"clip_{d}"
            embed[d] = (
                int(bundle.network_config(clip).embed_dim)
                if clip in names
                else int(cfg.context_dim)
            )
            if clip in names and getattr(bundle.network_config(clip), "preprocess", "") == "daclip":
                size = int(bundle.network_config(clip).image_size)
                clip_inputs[d] = (size, size)
    return graph_specs(
        image_shape=geometry.image_shape,
        sino_shape=geometry.sino_shape,
        embed_dims=embed,
        cond_dims=cond,
        clip_inputs=clip_inputs,
    )


def bundle_graph_module(
    bundle: Any, graph: str, *, shared: dict[str, Any] | None = None
) -> nn.Module:
    """The ``nn.Module`` of ``graph``, its network built from the bundle (on CPU).

    ``shared`` caches built networks by name, so a network's ``_cond`` and ``_step`` graphs
    share one module (and its weights) within a graph set.
    """
    if graph not in NETWORK_OF_GRAPH:
        raise MarRtError(f"unknown graph {graph!r}; expected one of {GRAPH_NAMES}")
    name = NETWORK_OF_GRAPH[graph]
    cache = {} if shared is None else shared
    key = f"network:{name}"
    if key not in cache:
        cache[key] = bundle.build(name)
    return graph_module(cache[key], graph)
