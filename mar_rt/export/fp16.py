"""fp16 variants of exported graphs, with the numerically fragile parts kept in fp32.

TensorRT 11 builds strongly typed networks only (no precision flags), so fp16 engines come from
an fp16 ONNX file (DESIGN §10).  The conversion is ONNX Runtime's maintained offline pass,
``onnxruntime.transformers.float16.convert_float_to_float16`` (the same algorithm as
onnxconverter-common's, shipped with the onnxruntime we already depend on): initializers and
node types go to fp16 except for blocked nodes, around which Cast nodes are inserted.

What stays fp32 (``Fp16Policy``), and why:

- the graph IO (``keep_io_types``): callers always exchange float32;
- LayerNormalization, InstanceNormalization / GroupNormalization (GroupNorm exports as
  Reshape → InstanceNormalization → affine): mean/variance over thousands of values;
- Softmax: exp overflows fp16 at logits > 11;
- the time-embedding subgraph: every node that depends on the input ``t`` and not on the image
  inputs (sinusoid of t up to 100 rad, the time MLP, each ResBlock's scale/shift projection);
  fp16 would quantise sin(t·f) for t ≈ 100 to ~0.05;
- the linear-attention core of ``mar_rt.models.unet.LinearAttention`` (found through the module
  scope the exporter records on each node), except its ``to_qkv`` convolution: its softmax runs
  over n = H·W positions (173 056 at 416²) and v is divided by n, so its values are ≈ 1/n,
  below fp16's smallest normal 2⁻¹⁴ (6.1e-5) once n > 16 384.

``convert_graph_to_fp16`` returns a ``Fp16Report`` counting fp16/fp32 nodes and initializers.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mar_rt.errors import MarRtError

__all__ = [
    "Fp16Policy",
    "Fp16Report",
    "blocked_nodes",
    "convert_graph_to_fp16",
    "precision_census",
]

log = logging.getLogger(__name__)

_IMAGE_INPUTS = ("x_t", "mu", "image")
_TIME_INPUT = "t"
_SCOPE_KEY = "pkg.torch.onnx.class_hierarchy"
_NAMES_KEY = "pkg.torch.onnx.name_scopes"


class Fp16Error(MarRtError):
    """The fp16 conversion failed or produced an unusable graph."""


@dataclass(frozen=True)
class Fp16Policy:
    """What stays fp32 in an fp16 graph (see the module docstring).  Stored in the manifest,
    so a changed policy reconverts."""

    keep_op_types: tuple[str, ...] = (
        "LayerNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "Softmax",
    )
    keep_time_embedding: bool = True
    keep_module_classes: tuple[str, ...] = ("LinearAttention",)
    fp16_submodules: tuple[str, ...] = ("to_qkv",)
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "keep_op_types": list(self.keep_op_types),
            "keep_time_embedding": self.keep_time_embedding,
            "keep_module_classes": list(self.keep_module_classes),
            "fp16_submodules": list(self.fp16_submodules),
            "version": self.version,
        }


@dataclass(frozen=True)
class Fp16Report:
    """Census of a converted graph: nodes kept in fp32 by reason, and dtype counts."""

    graph: str
    kept: dict[str, int] = field(default_factory=dict)
    nodes_fp16: int = 0
    nodes_fp32: int = 0
    casts: int = 0
    initializers: dict[str, int] = field(default_factory=dict)
    io_types: dict[str, str] = field(default_factory=dict)
    max_abs_err_vs_fp32: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept_fp32": dict(self.kept),
            "nodes_fp16": self.nodes_fp16,
            "nodes_fp32": self.nodes_fp32,
            "casts": self.casts,
            "initializers": dict(self.initializers),
            "io_types": dict(self.io_types),
            "max_abs_err_vs_fp32": self.max_abs_err_vs_fp32,
        }


# --------------------------------------------------------------------------- node selection
def _consumers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                out[name].append(node)
    return out


def _reachable(graph: Any, sources: Iterable[str]) -> set[str]:
    """Names of nodes downstream of the tensors ``sources``."""
    consumers = _consumers(graph)
    seen: set[str] = set()
    frontier = [s for s in sources]
    visited_tensors = set(frontier)
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, ()):
            if node.name in seen:
                continue
            seen.add(node.name)
            for out in node.output:
                if out not in visited_tensors:
                    visited_tensors.add(out)
                    frontier.append(out)
    return seen


def _meta(node: Any, key: str) -> str:
    for prop in node.metadata_props:
        if prop.key == key:
            return prop.value
    return ""


def blocked_nodes(model: Any, policy: Fp16Policy) -> dict[str, str]:
    """Node name → reason for every node the policy keeps in fp32."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    reasons: dict[str, str] = {}
    for node in graph.node:
        if node.op_type in policy.keep_op_types:
            reasons[node.name] = node.op_type
    if policy.keep_time_embedding and _TIME_INPUT in inputs:
        from_t = _reachable(graph, [_TIME_INPUT])
        from_image = _reachable(graph, [n for n in _IMAGE_INPUTS if n in inputs])
        for name in from_t - from_image:
            reasons.setdefault(name, "time embedding")
    if policy.keep_module_classes:
        scoped = 0
        for node in graph.node:
            hierarchy = _meta(node, _SCOPE_KEY)
            if not hierarchy:
                continue
            classes = {c.rsplit(".", 1)[-1].strip("'\" []") for c in hierarchy.split(",")}
            if not classes & set(policy.keep_module_classes):
                continue
            scopes = _meta(node, _NAMES_KEY)
            if any(f".{sub}'" in scopes or f'.{sub}"' in scopes for sub in policy.fp16_submodules):
                continue
            scoped += 1
            reasons.setdefault(node.name, "/".join(policy.keep_module_classes))
        if not scoped and any(not _meta(n, _SCOPE_KEY) for n in graph.node[:1]):
            log.warning(
                "fp16: the ONNX carries no module-scope metadata; %s cores cannot be kept in fp32",
                policy.keep_module_classes,
            )
    return reasons


def _ensure_node_names(model: Any) -> None:
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"mar_rt_node_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


# --------------------------------------------------------------------------- clean-up passes
def _drop_cast_round_trips(graph: Any, fp32_nodes: set[str]) -> int:
    """Bypass Cast(fp32→fp16) → Cast(fp16→fp32) pairs between two fp32-kept nodes.

    The converter casts every kept node's output down and every kept node's input up, so two
    adjacent kept nodes exchange a value rounded to fp16 for nothing; the pair is removed (the
    value stays fp32, which is what both nodes are kept for).  Returns the pairs removed.
    """
    import onnx

    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}

    def cast_to(node: Any) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    removed: set[str] = set()
    count = 0
    for up in graph.node:
        if cast_to(up) != onnx.TensorProto.FLOAT or up.output[0] in outputs:
            continue
        down = producer.get(up.input[0])
        if down is None or cast_to(down) != onnx.TensorProto.FLOAT16:
            continue
        source = producer.get(down.input[0])
        if source is None or source.name not in fp32_nodes:
            continue
        for node in consumers.get(up.output[0], ()):
            node.input[:] = [down.input[0] if i == up.output[0] else i for i in node.input]
        removed.add(up.name)
        count += 1
    keep = [n for n in graph.node if n.name not in removed]
    # a down-cast left without consumers goes too
    used = {i for n in keep for i in n.input} | outputs
    keep = [
        n for n in keep if not (cast_to(n) == onnx.TensorProto.FLOAT16 and n.output[0] not in used)
    ]
    del graph.node[:]
    graph.node.extend(keep)
    return count


def _topological_sort(graph: Any) -> None:
    """Reorder nodes so every input is produced before use (the converter appends the IO
    casts at the end; shape inference and TensorRT's parser need a sorted graph)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        progress = False
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
                progress = True
            else:
                rest.append(node)
        if not progress:
            names = [n.name for n in rest[:5]]
            raise Fp16Error(f"fp16 graph has a cycle or dangling inputs at nodes {names}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


# --------------------------------------------------------------------------- census
def precision_census(model: Any) -> tuple[int, int, int, dict[str, int], dict[str, str]]:
    """(fp16 nodes, fp32 nodes, casts, initializer dtype counts, IO dtypes) of a model.

    A node counts as fp16 / fp32 by the element type of its first float output, from shape
    inference (nodes whose outputs are not float are not counted).
    """
    import onnx

    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]  # stale entries from before the conversion would conflict
    inferred = onnx.shape_inference.infer_shapes(bare)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for v in [*inferred.graph.input, *inferred.graph.output]:
        types[v.name] = v.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    fp16 = fp32 = casts = 0
    for node in inferred.graph.node:
        if node.op_type == "Cast":
            casts += 1
            continue
        kinds = [types.get(o) for o in node.output]
        if onnx.TensorProto.FLOAT16 in kinds:
            fp16 += 1
        elif onnx.TensorProto.FLOAT in kinds:
            fp32 += 1
    inits = collections.Counter(
        onnx.TensorProto.DataType.Name(i.data_type) for i in inferred.graph.initializer
    )
    io = {
        v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)
        for v in [*inferred.graph.input, *inferred.graph.output]
    }
    return fp16, fp32, casts, dict(inits), io


# --------------------------------------------------------------------------- conversion
def convert_graph_to_fp16(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    policy: Fp16Policy = Fp16Policy(),
    *,
    graph: str = "",
) -> Fp16Report:
    """Write the fp16 variant of ``src`` to ``dst`` (atomically) and return its census.

    The IO stays float32; nodes chosen by :func:`blocked_nodes` stay fp32.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    _ensure_node_names(model)
    reasons = blocked_nodes(model, policy)
    converter_log = logging.getLogger("onnxruntime.transformers.float16")
    level = converter_log.level
    converter_log.setLevel(logging.WARNING)  # it logs every shared initializer at INFO
    try:
        converted = convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=list(policy.keep_op_types),
            node_block_list=sorted(reasons),
            disable_shape_infer=False,
        )
    except Exception as exc:
        raise Fp16Error(
            f"graph {graph or src.name}: fp16 conversion of {src} failed: {exc}"
        ) from exc
    finally:
        converter_log.setLevel(level)
    _topological_sort(converted.graph)
    fp32_nodes = set(reasons) | {
        n.name for n in converted.graph.node if n.op_type in policy.keep_op_types
    }
    pairs = _drop_cast_round_trips(converted.graph, fp32_nodes)
    converted.metadata_props.add(key="mar_rt.precision", value="fp16")
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        onnx.save_model(converted, str(tmp))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    fp16, fp32, casts, inits, io = precision_census(converted)
    if any(t != "FLOAT" for t in io.values()):
        raise Fp16Error(f"graph {graph or src.name}: fp16 variant {dst} changed IO types: {io}")
    kept = dict(collections.Counter(reasons.values()))
    log.info(
        "fp16 %s: %d fp16 nodes, %d fp32 nodes (%s), %d casts (%d fp16 round trips removed)",
        dst.name,
        fp16,
        fp32,
        kept,
        casts,
        pairs,
    )
    return Fp16Report(graph or src.stem, kept, fp16, fp32, casts, inits, io)


# --------------------------------------------------------------------------- a bundle's graphs
def export_fp16(
    onnx_dir: str | os.PathLike,
    graphs: Iterable[str],
    policy: Fp16Policy = Fp16Policy(),
    *,
    force: bool = False,
    check: bool = True,
    progress: Any = None,
) -> dict[str, Fp16Report]:
    """fp16 variants ``<graph>.fp16.onnx`` of already exported fp32 graphs, recorded in the
    ``fp16`` section of ``onnx/manifest.json``; current ones (same fp32 source sha256, same
    policy, unchanged file) are reused.

    With ``check``, each new variant runs in ONNX Runtime CPU beside its fp32 source on one
    random batch-1 feed and the max |fp16 − fp32| is recorded (a NaN/inf output raises).
    Returns the reports of the graphs converted now.
    """
    import numpy as np

    from mar_rt.export.cache import sha256_file
    from mar_rt.export.onnx_export import _write_manifest, read_onnx_manifest
    from mar_rt.export.verify import ort_cpu_session

    onnx_dir = Path(onnx_dir)
    say = progress or (lambda g, m: log.info("%s: %s", g, m))
    manifest = read_onnx_manifest(onnx_dir)
    reports = {}
    for graph in graphs:
        source = manifest["graphs"].get(graph)
        if source is None:
            raise Fp16Error(f"{onnx_dir}: graph {graph!r} has no fp32 export to convert")
        src = onnx_dir / source["file"]
        dst = onnx_dir / f"{graph}.fp16.onnx"
        entry = manifest["fp16"].get(graph)
        if (
            not force
            and entry is not None
            and entry.get("source_sha256") == source["sha256"]
            and entry.get("policy") == policy.to_dict()
            and dst.is_file()
            and sha256_file(dst) == entry["sha256"]
        ):
            say(graph, "fp16 ONNX up to date")
            continue
        say(graph, "converting to fp16")
        report = convert_graph_to_fp16(src, dst, policy, graph=graph)
        if check:
            s32, s16 = ort_cpu_session(src), ort_cpu_session(dst)
            rng = np.random.default_rng(3)
            feed = {}
            for inp in s32.get_inputs():
                shape = [1 if not isinstance(d, int) else d for d in inp.shape]
                if inp.name in ("image", "x_t", "mu"):
                    feed[inp.name] = rng.random(shape, dtype=np.float32)
                elif inp.name == "t":
                    feed[inp.name] = np.full(shape, 50.0, np.float32)
                else:
                    feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
            ref = s32.run(None, feed)
            got = s16.run(None, feed)
            if not all(np.all(np.isfinite(g)) for g in got):
                raise Fp16Error(f"{dst}: the fp16 graph gives NaN/inf on a random feed")
            err = max(float(np.abs(g - r).max()) for g, r in zip(got, ref, strict=True))
            report = Fp16Report(**{**report.__dict__, "max_abs_err_vs_fp32": err})
            say(
                graph,
                f"fp16: {report.nodes_fp16} fp16 / {report.nodes_fp32} fp32 nodes, "
                f"max|fp16 − fp32| {err:.2e}",
            )
        manifest["fp16"][graph] = {
            "file": dst.name,
            "sha256": sha256_file(dst),
            "source_sha256": source["sha256"],
            "policy": policy.to_dict(),
            "census": report.to_dict(),
        }
        _write_manifest(onnx_dir, manifest)
        reports[graph] = report
    return reports
