"""ONNX export of a bundle's graphs, with verification and ``onnx/manifest.json`` (DESIGN §10).

Every graph of ``mar_rt.export.graphs`` (``clip_*``, ``unet_*_cond``, ``unet_*_step``) is
exported to ``<out>/onnx/<graph>.onnx`` with the fixed IO names, opset 18, H and W fixed to the
bundle's geometry and a dynamic batch axis ``B`` (1 … ``max_batch``), then checked:

1. structure — IO names and order, every input consumed, the opset, static non-batch dims;
2. numbers — ONNX Runtime CPU against the torch module on random and real feeds
   (``mar_rt.export.verify``), max |Δ| ≤ 1e-4.

``onnx/manifest.json`` records per graph the file's sha256 (and its external-data file's),
the sha256 of the bundle weights it came from, the IO shapes, op counts and the verification
report.  A graph is re-exported only when its file is missing or changed, its weights changed,
or the export settings changed; loaders check each file's sha256 against this manifest.

Exporter choice: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), not the
TorchScript exporter (``dynamo=False``).  Measured on these networks (torch 2.14): both emit
single LayerNormalization and Softmax ops and the same GroupNorm pattern (Reshape →
InstanceNormalization → affine), and both match torch to ~2e-7; but torch.export *proves* the
batch axis symbolic (it raises if the model specialises on B, where tracing silently bakes the
example's shape), the graph comes out with static, fully inferred shapes (the TorchScript one
left ``eps`` as (B, 1, ?, ?) and carried ~460 Constant and 64 Shape nodes), node metadata keeps
the module scope (the fp16 pass uses it), and the TorchScript exporter is deprecated.  The cost
is export time (about 10–20 s CPU per U-Net graph instead of 2–5 s), paid once per bundle.

Batch: one dynamic-batch file per graph rather than a set of static-batch files — ONNX Runtime
CPU ran the tiny U-Net step (416², B = 1) in the same time from both (2644 vs 2673 ms median, 7
runs), and TensorRT gets its static "opt" shape from the optimisation profile anyway.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import datetime as _dt
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mar_rt.errors import BundleError, MarRtError
from mar_rt.export.cache import read_json, sha256_file, write_json_atomic
from mar_rt.export.graphs import (
    NETWORK_OF_GRAPH,
    bundle_graph_module,
    bundle_graph_names,
    bundle_graph_specs,
)
from mar_rt.export.verify import (
    FP32_ATOL,
    VerifyReport,
    ort_cpu_session,
    random_feed,
    real_feeds,
    verify_graph,
)

__all__ = [
    "ONNX_DIR",
    "ONNX_FORMAT",
    "ONNX_MANIFEST",
    "OPSET",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "OnnxEntry",
    "check_onnx_structure",
    "export_bundle",
    "export_graph",
    "onnx_entry",
    "read_onnx_manifest",
]

log = logging.getLogger(__name__)

OPSET = 18
ONNX_DIR = "onnx"
ONNX_MANIFEST = "manifest.json"
ONNX_FORMAT = 1
EXPORTER = "torch.onnx.export(dynamo=True)"
POST_PASSES = "sorted-initializers,optimize,canonical-names/1"  # bump when they change
# Protobuf's hard limit is 2 GiB; above this many bytes of weights the data goes external.
EXTERNAL_DATA_BYTES = 2**31 - 2**26
# Node metadata the exporter writes that we drop: stack traces hold absolute source paths,
# the others the process-dependent FX node names.
_DROP_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "namespace")
_NAMES_KEY = "pkg.torch.onnx.name_scopes"

ProgressFn = Callable[[str, str], None]


class ExportError(MarRtError):
    """A graph failed to export, or its export failed the structural or numerical checks."""


@dataclass(frozen=True)
class ExportOptions:
    """Export settings; any change re-exports (they are stored in the manifest).

    opset: ONNX opset (≥ 17 keeps LayerNormalization a single op).
    max_batch: upper bound of the dynamic batch axis B.
    example_batch: batch of the tracing example (≥ 2, so torch.export keeps B symbolic).
    atol: verification bound on max |ONNX − torch| (fp32).
    verify: run the ONNX Runtime vs torch check after each export.
    """

    opset: int = OPSET
    max_batch: int = 8
    example_batch: int = 2
    atol: float = FP32_ATOL
    verify: bool = True

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ValueError(
                f"ExportOptions: opset must be ≥ 17 (LayerNormalization), got {self.opset}"
            )
        if not 2 <= self.example_batch <= self.max_batch:
            raise ValueError(
                f"ExportOptions: need 2 ≤ example_batch ≤ max_batch, got {self.example_batch}, "
                f"{self.max_batch}"
            )

    def settings(self) -> dict[str, Any]:
        """What an existing export must match to be reused."""
        return {
            "exporter": EXPORTER,
            "post": POST_PASSES,
            "opset": self.opset,
            "max_batch": self.max_batch,
        }


@dataclass(frozen=True)
class OnnxEntry:
    """One graph's ONNX file as the manifest lists it."""

    graph: str
    path: Path
    sha256: str
    data_path: Path | None = None
    data_sha256: str | None = None
    precision: str = "fp32"


@dataclass(frozen=True)
class ExportResult:
    """What ``export_bundle`` did: the manifest path, per-graph action and reports."""

    manifest: Path
    exported: tuple[str, ...]
    reused: tuple[str, ...]
    reports: Mapping[str, VerifyReport] = field(default_factory=dict)


# --------------------------------------------------------------------------- manifest
def read_onnx_manifest(onnx_dir: str | os.PathLike) -> dict[str, Any]:
    """``onnx/manifest.json`` as a dict (an empty skeleton when absent)."""
    path = Path(onnx_dir) / ONNX_MANIFEST
    if not path.is_file():
        return {"format": ONNX_FORMAT, "graphs": {}, "fp16": {}}
    manifest = read_json(path, what="ONNX manifest")
    if manifest.get("format") != ONNX_FORMAT:
        raise BundleError(
            f"{path}: ONNX manifest format {manifest.get('format')!r}, expected {ONNX_FORMAT}"
        )
    manifest.setdefault("graphs", {})
    manifest.setdefault("fp16", {})
    return manifest


def onnx_entry(onnx_dir: str | os.PathLike, graph: str, precision: str = "fp32") -> OnnxEntry:
    """The manifest entry of ``graph`` (``fp32`` or ``fp16`` variant); BundleError naming the
    folder and the command to run when it is not there."""
    onnx_dir = Path(onnx_dir)
    manifest = read_onnx_manifest(onnx_dir)
    section = manifest["graphs" if precision == "fp32" else "fp16"]
    if graph not in section:
        raise BundleError(
            f"{onnx_dir}: no {precision} ONNX export of graph {graph!r}; run "
            f"mar-rt build-engines --bundle {onnx_dir.parent} --precision {precision}"
        )
    entry = section[graph]
    data = entry.get("data_file")
    return OnnxEntry(
        graph,
        onnx_dir / entry["file"],
        entry["sha256"],
        onnx_dir / data if data else None,
        entry.get("data_sha256"),
        precision,
    )


def _write_manifest(onnx_dir: Path, manifest: dict[str, Any]) -> Path:
    manifest["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    path = onnx_dir / ONNX_MANIFEST
    write_json_atomic(path, manifest)
    return path


# --------------------------------------------------------------------------- one graph
def _example_inputs(spec: Any, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    # Distinct tensor objects per input: the exporter wires two graph inputs fed the *same*
    # example tensor to one of them (measured: `mu` lost its consumers when x_t is mu).
    feed = random_feed(spec, batch, seed=seed)
    return tuple(feed[name].clone() for name in spec.inputs)


def _param_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _canonical_names(graph: Any) -> None:
    """Name nodes and intermediate values by their position (``Conv_12``, ``Conv_12_o0``).

    torch.export numbers its FX nodes with counters that depend on what was traced before in
    the process, and the exporter names ONNX nodes and values after them: the same network
    then gives different bytes.  Graph IO and initializer (weight) names are kept; the
    per-node module scope stays in the metadata (``class_hierarchy``, ``name_scopes`` without
    its last, counter-named entry), which the fp16 pass reads.
    """
    for index, node in enumerate(graph):
        node.name = f"{node.op_type}_{index}"
        for j, value in enumerate(node.outputs):
            if not value.is_graph_output() and not value.is_initializer():
                value.name = f"{node.op_type}_{index}_o{j}"
        for key in _DROP_METADATA:
            node.metadata_props.pop(key, None)
        scopes = node.metadata_props.get(_NAMES_KEY)
        if scopes:
            try:
                parts = ast.literal_eval(scopes)
                node.metadata_props[_NAMES_KEY] = repr(list(parts[:-1]))
            except (ValueError, SyntaxError):
                node.metadata_props.pop(_NAMES_KEY, None)


def export_graph(
    module: torch.nn.Module,
    spec: Any,
    path: str | os.PathLike,
    options: ExportOptions = ExportOptions(),
    *,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Export one graph module to ``path`` (plus ``path.data`` when weights exceed ~2 GB).

    The files are written in a temporary folder beside ``path`` and renamed into place.
    Returns the written files (the .onnx first).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    args = _example_inputs(spec, options.example_batch, seed=1234)
    batch = torch.export.Dim("B", min=1, max=options.max_batch)
    dynamic = tuple({0: batch} for _ in spec.inputs)
    external = _param_bytes(module) > EXTERNAL_DATA_BYTES
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}.export-"))
    try:
        with warnings.catch_warnings():
            # every input shares the one Dim "B"; the exporter says so once per input
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                opset_version=options.opset,
                dynamic_shapes=dynamic,
                external_data=external,
                optimize=False,
                verbose=False,
            )
        if program is None:
            raise ExportError(f"graph {spec.name}: torch.onnx.export returned no program")
        ir_model = program.model
        # The lifted weights come in an order that depends on what ran in the process
        # before (measured: a torch forward first puts the controller's copies ahead);
        # the optimiser keeps the first of identical initializers, so sort them by name
        # first — the same weights then always give the same bytes (and engine keys).
        initializers = ir_model.graph.initializers
        for name, value in sorted(initializers.items()):
            initializers.pop(name)
            initializers[name] = value
        with _quiet("onnx_ir", "onnxscript"):  # they log every folded constant at INFO
            program.optimize()
        _canonical_names(ir_model.graph)
        # The exporter's graph-level notes (the ExportedProgram's signature) vary with what
        # else was traced in the process; only the graph itself should decide the bytes.
        for key in [k for k in ir_model.graph.metadata_props if k.startswith("pkg.torch")]:
            del ir_model.graph.metadata_props[key]
        for key, value in {"mar_rt.graph": spec.name, **(metadata or {})}.items():
            ir_model.metadata_props[key] = str(value)
        target = tmp / path.name
        program.save(target, external_data=external)
        written = [path]
        if external:
            os.replace(tmp / f"{path.name}.data", path.parent / f"{path.name}.data")
            written.append(path.parent / f"{path.name}.data")
        os.replace(target, path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"graph {spec.name}: ONNX export to {path} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def check_onnx_structure(path: str | os.PathLike, spec: Any, opset: int = OPSET) -> dict[str, int]:
    """Structural checks of an exported file; returns its op-type counts.

    Raises ExportError when: the opset differs; IO names/order differ from ``spec``; an input
    has no consumer; a non-batch dim is not the spec's static size or the batch dim is static.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    where = f"graph {spec.name} ({path})"
    version = {o.domain: o.version for o in model.opset_import}.get("", None)
    if version != opset:
        raise ExportError(f"{where}: opset {version}, expected {opset}")
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != list(spec.inputs) or outputs != list(spec.outputs):
        raise ExportError(
            f"{where}: IO {inputs} → {outputs}, expected {list(spec.inputs)} → {list(spec.outputs)}"
        )
    consumed = {name for node in model.graph.node for name in node.input}
    unused = [name for name in inputs if name not in consumed]
    if unused:
        raise ExportError(f"{where}: inputs {unused} feed no node (aliased example inputs?)")
    for value, tspec in [
        *zip(model.graph.input, spec.inputs.values(), strict=True),
        *zip(model.graph.output, spec.outputs.values(), strict=True),
    ]:
        dims = value.type.tensor_type.shape.dim
        got = [d.dim_param if d.dim_param else d.dim_value for d in dims]
        ok = len(got) == len(tspec.shape) and all(
            (isinstance(w, str) and isinstance(g, str) and g) or (isinstance(w, int) and g == w)
            for w, g in zip(tspec.shape, got, strict=False)
        )
        if not ok:
            raise ExportError(
                f"{where}: {value.name} has shape {got}, expected {tspec.shape_str()}"
            )
    return dict(collections.Counter(node.op_type for node in model.graph.node).most_common())


# --------------------------------------------------------------------------- a bundle
def _current(
    entry: Mapping[str, Any] | None, onnx_dir: Path, weights_sha: str, settings: dict
) -> str | None:
    """None when the recorded export can be reused, else why not."""
    if entry is None:
        return "not exported yet"
    path = onnx_dir / entry["file"]
    if not path.is_file():
        return f"{path.name} is missing"
    if entry.get("weights_sha256") != weights_sha:
        return "the network weights changed"
    if entry.get("settings") != settings:
        return f"export settings changed ({entry.get('settings')} → {settings})"
    if sha256_file(path) != entry["sha256"]:
        return f"{path.name} was modified since export"
    data = entry.get("data_file")
    if data and (
        not (onnx_dir / data).is_file() or sha256_file(onnx_dir / data) != entry.get("data_sha256")
    ):
        return f"{data} is missing or was modified"
    return None


def export_bundle(
    bundle: Any,
    out: str | os.PathLike | None = None,
    *,
    graphs: Sequence[str] | None = None,
    options: ExportOptions = ExportOptions(),
    force: bool = False,
    real_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: ProgressFn | None = None,
) -> ExportResult:
    """Export (what is missing or stale of) a bundle's graphs to ``<out>/onnx/`` and verify.

    Args:
        bundle: a loaded ``mar_rt.models.bundle.Bundle``.
        out: folder that receives ``onnx/`` (default: the bundle folder).
        graphs: which graphs (default: all the bundle holds).
        force: re-export even when the recorded export is current.
        real_inputs: (image01 (1,1,H,W), sino01 (1,1,V,D)) for the ``real`` verification feed;
            default: the shipped demo slice projected in the bundle's geometry.
        progress: called as ``progress(graph, message)``.

    Raises:
        ExportError: a graph failed to export, or failed its structural or numerical check
            (the failing file is removed; the others stay recorded).
    """
    say = progress or (lambda g, m: log.info("%s: %s", g, m))
    onnx_dir = Path(out if out is not None else bundle.folder) / ONNX_DIR
    onnx_dir.mkdir(parents=True, exist_ok=True)
    specs = bundle_graph_specs(bundle)
    wanted = list(graphs) if graphs is not None else list(bundle_graph_names(bundle))
    unknown = [g for g in wanted if g not in specs]
    if unknown:
        raise ExportError(
            f"bundle {bundle.folder}: unknown graphs {unknown}; it has {sorted(specs)}"
        )
    manifest = read_onnx_manifest(onnx_dir)
    settings = options.settings()
    networks = bundle.config["networks"]

    todo = {}
    reused = []
    for graph in wanted:
        net = graph_network(graph)
        why = (
            "--force"
            if force
            else _current(
                manifest["graphs"].get(graph), onnx_dir, networks[net]["sha256"], settings
            )
        )
        if why is None:
            reused.append(graph)
            say(graph, "ONNX up to date")
        else:
            todo[graph] = why
    if not todo:
        return ExportResult(onnx_dir / ONNX_MANIFEST, (), tuple(reused), {})

    shared: dict[str, Any] = {}

    def module(graph: str) -> torch.nn.Module:
        return bundle_graph_module(bundle, graph, shared=shared).eval()

    feeds_real: dict[str, dict[str, torch.Tensor]] = {}
    if options.verify:
        if real_inputs is None:
            from mar_rt.ct.geometry import FanBeamGeometry
            from mar_rt.export.verify import demo_real_slice

            real_inputs = demo_real_slice(FanBeamGeometry(**bundle.config["geometry"]))
        present = {g: specs[g] for g in bundle_graph_names(bundle)}
        feeds_real = real_feeds(present, module, *real_inputs)

    reports: dict[str, VerifyReport] = {}
    for graph, why in todo.items():
        spec = specs[graph]
        net = graph_network(graph)
        say(graph, f"exporting ({why})")
        path = onnx_dir / f"{graph}.onnx"
        files = export_graph(
            module(graph),
            spec,
            path,
            options,
            # No weights hash inside the file: the same weights re-saved (safetensors headers
            # are not byte-stable across processes) then export to the same bytes, so
            # engines keyed by the ONNX sha256 stay valid.
            metadata={"mar_rt.network": net},
        )
        try:
            ops = check_onnx_structure(path, spec, options.opset)
            report = None
            if options.verify:
                session = ort_cpu_session(path)
                feeds = {
                    "random": random_feed(spec, options.example_batch, seed=7),
                    "real": feeds_real[graph],
                }
                report = verify_graph(
                    module(graph), spec, session, feeds, onnx_name=path.name, atol=options.atol
                )
                reports[graph] = report
                say(graph, report.summary())
                if not report.passed:
                    raise ExportError(f"{path}: verification failed: {report.summary()}")
        except ExportError:
            for f in files:
                f.unlink(missing_ok=True)
            manifest["graphs"].pop(graph, None)
            _write_manifest(onnx_dir, manifest)
            raise
        entry = {
            "file": path.name,
            "sha256": sha256_file(path),
            "network": net,
            "weights_sha256": networks[net]["sha256"],
            "settings": settings,
            "torch_version": torch.__version__,
            "inputs": {k: list(v.shape) for k, v in spec.inputs.items()},
            "outputs": {k: list(v.shape) for k, v in spec.outputs.items()},
            "ops": ops,
            "verify": report.to_dict() if report else None,
        }
        if len(files) > 1:
            entry["data_file"] = files[1].name
            entry["data_sha256"] = sha256_file(files[1])
        manifest["graphs"][graph] = entry
        manifest["fp16"].pop(graph, None)  # its source changed
        _write_manifest(onnx_dir, manifest)
    return ExportResult(onnx_dir / ONNX_MANIFEST, tuple(todo), tuple(reused), reports)


def graph_network(graph: str) -> str:
    """The bundle network a graph runs (``unet_image_step`` → ``unet_image``)."""
    return NETWORK_OF_GRAPH[graph]
