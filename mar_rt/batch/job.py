"""The batch job on Ray Data: one row per series, one warm pipeline per worker.

    series ─ ledger.plan ─► todo ─► ray.data.from_items (one block per series)
           ─► map_batches(SeriesWorker, batch_size=1, concurrency=workers) ─► driver:
              ledger.append (fsync) · progress · report

- ``SeriesWorker`` opens the pipeline once per actor (``open_pipeline``) and calls
  ``run_study`` per row inside a try/except: a bad series becomes a 'failed' record with its
  reason, the job goes on.  The output is written by ``run_study`` atomically into the
  series' own folder ``DIR/<label>-<hash>/``; what an interrupted attempt left there is
  removed before the series runs again, so a killed job leaves no half-written or duplicate
  output once resumed.
- With GPUs each actor takes ``num_gpus=1`` (one actor per GPU); on CPU it takes a fraction
  of a CPU, so Ray Data's own tasks always find a free CPU and actors never starve them.
- A worker process that dies (out of memory, a crash) has its series retried twice on a
  restarted actor, then recorded as failed; the job goes on.
- Only the driver writes the ledger.  Ray is imported inside the functions: ``mar_rt.batch``
  imports without it (it is the ``scale`` extra).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mar_rt.batch.inputs import Series, input_sha256
from mar_rt.batch.ledger import DONE, FAILED, Ledger, LedgerError, job_lock
from mar_rt.errors import BundleError, MarRtError

log = logging.getLogger(__name__)

OBJECT_STORE_MAX_BYTES = 1_000_000_000
"""The embedded Ray's object store: at most 1 GB (rows are small; images never enter it)."""
OBJECT_STORE_MIN_BYTES = 100_000_000
DATA_STAGE_CPUS = 0.5
"""CPUs left free for Ray Data's own tasks when the actors share out the rest."""
TASK_RETRIES = 2
"""Retries of a series whose worker process died (not of a series that raised)."""
ACTOR_START_TIMEOUT_S = 600
"""How long the job waits for every worker to open its pipeline before any series starts."""
_DATA_CONTEXT = {
    "max_errored_blocks": -1,  # a block whose worker died must not abort the others
    "enable_progress_bars": False,  # the command draws one bar, per series
    "print_on_execution_start": False,
    # all workers up before the first series: otherwise the first one to start takes every
    # series while the others still load (short jobs, a slow node)
    "wait_for_min_actors_s": ACTOR_START_TIMEOUT_S,
}


@dataclass(frozen=True)
class BatchConfig:
    """What a batch job runs with.

    Attributes:
        out: the output folder (ledger, report and one folder per series).
        bundle: the model bundle folder; None: the shipped demo bundle.  On a cluster it must
            be on storage every node sees, at the same path.
        backend: 'auto' | 'tensorrt' | 'onnxruntime' | 'torch' (each worker falls back).
        device: 'cpu' or 'cuda'; None: a GPU when the cluster has one.
        workers: number of actors; None: one per GPU, or one per CPU.
        torch_threads: torch intra-op threads per worker; None: 1 on CPU, 2 with a GPU.
        preview: write each series' preview.png.
    """

    out: Path
    bundle: Path | None = None
    backend: str = "auto"
    device: str | None = None
    workers: int | None = None
    torch_threads: int | None = None
    preview: bool = True


@dataclass(frozen=True)
class WorkerPlan:
    """How many actors, and what each one reserves."""

    workers: int
    num_cpus: float
    num_gpus: float
    torch_threads: int
    device: str | None


@dataclass
class BatchSummary:
    """What one ``run_batch`` call did (its records are also in the ledger)."""

    out: Path
    job_id: str
    started_utc: str
    wall_s: float
    found: int
    skipped: int
    retried: int
    records: list[dict[str, Any]] = field(default_factory=list)
    plan: WorkerPlan | None = None
    address: str = ""
    report_json: Path | None = None
    report_png: Path | None = None

    @property
    def done(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == DONE]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == FAILED]

    @property
    def series_per_minute(self) -> float:
        """Series done by this job per minute of its wall time (0 when nothing ran)."""
        return 60.0 * len(self.done) / self.wall_s if self.done and self.wall_s > 0 else 0.0

    def nodes(self) -> dict[str, int]:
        """Ray node id → series this job ran there."""
        counts: dict[str, int] = {}
        for r in self.records:
            if r.get("node_id"):
                counts[r["node_id"]] = counts.get(r["node_id"], 0) + 1
        return counts


# --- helpers shared by driver and worker -----------------------------------------------------
def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def series_folder(out: Path, series: Series) -> Path:
    """``out/<label>-<8 hex of the key>``: the folder ``run_study`` writes this series into."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", series.label).strip("._-")[:48] or "series"
    return out / f"{stem}-{hashlib.sha256(series.key.encode()).hexdigest()[:8]}"


def bundle_settings(bundle: Path | None) -> dict[str, Any]:
    """The settings a done record must match: the bundle's ``bundle.json`` sha256 (16 hex).

    Raises BundleError when the bundle folder or its ``bundle.json`` is missing.
    """
    from mar_rt.runtime.bundle_access import DEMO_BUNDLE

    folder = Path(bundle) if bundle is not None else DEMO_BUNDLE
    manifest = folder / "bundle.json"
    if not manifest.is_file():
        raise BundleError(f"bundle {folder}: no bundle.json (is this a mar-rt bundle folder?)")
    return {"bundle_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]}


def _failed_record(series: Series, error: str, **extra: Any) -> dict[str, Any]:
    now = _utc_now()
    return {
        "key": series.key,
        "label": series.label,
        "kind": series.kind,
        "status": FAILED,
        "fingerprint": series.fingerprint(),
        "options": series.options.to_dict(),
        "output": None,
        "kept": None,
        "error": error,
        "started_utc": now,
        "finished_utc": now,
        **extra,
    }


# --- the worker ------------------------------------------------------------------------------
class SeriesWorker:
    """Ray Data callable class: one warm pipeline per actor, one ``run_study`` per row.

    Rows carry one column ``task`` (a JSON object: the series, its options and folder); the
    result has one column ``record`` (the JSON ledger record).  Nothing a series raises
    escapes ``__call__``: it becomes a 'failed' record naming the exception.
    """

    def __init__(
        self, bundle: str | None, backend: str, device: str | None, torch_threads: int
    ) -> None:
        import torch

        torch.set_num_threads(max(1, int(torch_threads)))
        self._node_id = _node_id()
        self._host = socket.gethostname()
        self._pipe: Any = None
        self._open_error: str | None = None
        t0 = time.perf_counter()
        try:
            from mar_rt.runtime.study import open_pipeline

            self._pipe = open_pipeline(
                Path(bundle) if bundle else None, backend=backend, device=device
            )
        except Exception as exc:  # every series of this worker then fails with this reason
            self._open_error = f"could not open the pipeline: {type(exc).__name__}: {exc}"
            log.error("node %s: %s", self._node_id, self._open_error)
        self._open_s = time.perf_counter() - t0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        records = [self.run_one(json.loads(str(task))) for task in batch["task"]]
        return {"record": np.array([json.dumps(r, default=str) for r in records], dtype=object)}

    def run_one(self, task: dict[str, Any]) -> dict[str, Any]:
        """Run one series described by ``task``; always return its ledger record."""
        options = task["options"]
        record: dict[str, Any] = {
            "key": task["key"],
            "label": task["label"],
            "kind": task["kind"],
            "fingerprint": task["fingerprint"],
            "settings": task["settings"],
            "options": options,
            "node_id": self._node_id,
            "host": self._host,
            "pid": os.getpid(),
            "pipeline_open_s": round(self._open_s, 4),
            "started_utc": _utc_now(),
            "input_sha256": None,
            "output": None,
            "kept": None,
            "error": None,
        }
        t0 = time.perf_counter()
        try:
            if self._open_error is not None:
                raise MarRtError(self._open_error)
            from mar_rt.runtime.study import run_study

            files = [Path(f) for f in task["files"]]
            record["input_sha256"] = input_sha256(files)
            source: Path | list[Path] = files if task["kind"] == "dicom" else files[0]
            result = run_study(
                source,
                self._pipe,
                Path(task["folder"]),
                units=options["units"],
                skip_bad=options["skip_bad"],
                steps=options["steps"],
                seed=options["seed"],
                preview=task["preview"],
            )
            record.update(
                status=DONE,
                output=str(result.folder),
                n_files=len(result.files),
                n_slices=result.n_slices,
                n_metal_slices=result.n_metal_slices,
                series_uid=result.series_uid,
                timings_s=dict(result.timings_s),
            )
        except Exception as exc:  # one bad series fails alone; the job goes on
            record.update(status=FAILED, error=f"{type(exc).__name__}: {exc}")
            kept = getattr(exc, "kept", None)
            record["kept"] = str(kept) if kept is not None else None
            log.warning("%s failed: %s", task["label"], record["error"])
        worker_s = time.perf_counter() - t0
        record["timings_s"] = {**record.get("timings_s", {}), "worker": round(worker_s, 4)}
        record["finished_utc"] = _utc_now()
        return record


def _node_id() -> str | None:
    """This process's Ray node id (hex), or None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


# --- Ray --------------------------------------------------------------------------------------
def local_ray_args() -> dict[str, Any]:
    """``ray.init`` arguments for the embedded Ray: this machine's CPUs (and GPUs, detected by
    Ray), an object store of at most 1 GB, no dashboard."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * OBJECT_STORE_MAX_BYTES
    store = int(min(OBJECT_STORE_MAX_BYTES, max(OBJECT_STORE_MIN_BYTES, 0.1 * total)))
    return {"num_cpus": cpus, "object_store_memory": store, "include_dashboard": False}


def resolve_address(address: str | None) -> str | None:
    """The cluster to join: ``address``, else ``$RAY_ADDRESS``, else None (start Ray here).

    A Ray Client address (``ray://``) is refused: Ray Data, which runs the series, does not
    work through Ray Client (its workers fail with "'Worker' object has no attribute
    'core_worker'", Ray 2.60).
    """
    source = "--address" if address else "$RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and address.strip().lower().startswith("ray://"):
        raise MarRtError(
            f"{source} {address}: a Ray Client address; mar-rt batch runs on Ray Data, which "
            "Ray Client cannot drive. Run it on a node of the cluster with --address auto (or "
            "the head's HOST:6379), or submit it with 'ray job submit'"
        )
    return address


@contextlib.contextmanager
def ray_session(address: str | None = None, *, log_to_driver: bool = False) -> Iterator[str]:
    """Connect to Ray for one job and yield a description of where it runs.

    - Ray already initialised in this process (tests, notebooks): use it, leave it running.
    - ``address`` ('auto', 'host:6379') or ``$RAY_ADDRESS``: connect (not Ray Client's
      'ray://', see ``resolve_address``).
    - Neither: start Ray inside this process, sized to the machine; shut it down afterwards.
    """
    import ray

    if ray.is_initialized():
        yield "the Ray already running in this process"
        return
    address = resolve_address(address)
    quiet = logging.WARNING if log_to_driver else logging.ERROR
    common: dict[str, Any] = {"log_to_driver": log_to_driver, "logging_level": quiet}
    if address is None:
        args = local_ray_args()
        ray.init(**args, **common)
        store_mb = args["object_store_memory"] / 1e6
        where = f"a local Ray ({args['num_cpus']} CPUs, object store {store_mb:.0f} MB)"
    else:
        ray.init(address=address, **common)
        where = f"the Ray cluster at {address}"
    try:
        yield where
    finally:
        ray.shutdown()


def plan_workers(config: BatchConfig, n_series: int, resources: dict[str, float]) -> WorkerPlan:
    """Actors and their reservations for ``resources`` (``ray.cluster_resources()``).

    GPU: one actor per GPU (``num_gpus=1``, one CPU each when there are enough).  CPU: one
    actor per CPU by default, each reserving (CPUs − 0.5) / workers ≤ 1 CPU, so that at least
    half a CPU stays free for Ray Data's tasks.  Never more actors than series.
    """
    cpus = float(resources.get("CPU", 1.0))
    gpus = int(resources.get("GPU", 0.0))
    use_gpu = gpus > 0 and config.device != "cpu"
    if config.device is not None and config.device.startswith("cuda") and gpus == 0:
        raise MarRtError("device 'cuda' was asked for, but the Ray cluster has no GPU")
    if use_gpu:
        workers = config.workers or gpus
        num_gpus, num_cpus = 1.0, min(1.0, cpus / workers)
        threads = config.torch_threads or 2
    else:
        workers = config.workers or max(1, int(cpus))
        num_gpus = 0.0
        num_cpus = max(0.05, min(1.0, (cpus - DATA_STAGE_CPUS) / workers))
        num_cpus = float(f"{num_cpus:.3f}")
        threads = config.torch_threads or 1
    workers = max(1, min(workers, n_series))
    device = config.device or ("cuda" if use_gpu else "cpu")
    return WorkerPlan(workers, num_cpus, num_gpus, threads, device)


# --- the job ----------------------------------------------------------------------------------
def _clean_leftovers(out: Path, series: Sequence[Series], ledger: Ledger) -> None:
    """Remove from each series' folder what an unfinished attempt left there (anything no
    ledger record names)."""
    keep = ledger.outputs_in_use()
    for s in series:
        folder = series_folder(out, s)
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.resolve() in keep:
                continue
            log.info("removing %s: left by an attempt the ledger does not record", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _task(series: Series, config: BatchConfig, settings: dict[str, Any]) -> str:
    return json.dumps(
        {
            "key": series.key,
            "label": series.label,
            "kind": series.kind,
            "files": [str(f) for f in series.files],
            "options": series.options.to_dict(),
            "fingerprint": series.fingerprint(),
            "settings": settings,
            "folder": str(series_folder(config.out, series)),
            "preview": config.preview,
        }
    )


def _execute(
    todo: Sequence[Series],
    config: BatchConfig,
    settings: dict[str, Any],
    plan: WorkerPlan,
    emit: Callable[[dict[str, Any]], None],
) -> None:
    """Run ``todo`` on the connected Ray; ``emit`` every record as it comes back."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx_before = {name: getattr(ctx, name) for name in _DATA_CONTEXT if hasattr(ctx, name)}
    for name in ctx_before:
        setattr(ctx, name, _DATA_CONTEXT[name])
    data_logger = logging.getLogger("ray.data")
    level_before = data_logger.level
    if not log.isEnabledFor(logging.DEBUG):
        data_logger.setLevel(logging.ERROR)
    pending = {s.key: s for s in todo}
    try:
        rows = [{"task": _task(s, config, settings)} for s in todo]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        with warnings.catch_warnings():
            # max_task_retries has no named parameter yet: Ray 2.60 warns on ray_remote_args
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ds.map_batches(
                SeriesWorker,
                fn_constructor_kwargs={
                    "bundle": str(config.bundle) if config.bundle is not None else None,
                    "backend": config.backend,
                    "device": plan.device,
                    "torch_threads": plan.torch_threads,
                },
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=plan.workers),
                num_cpus=plan.num_cpus,
                num_gpus=plan.num_gpus or None,
                max_task_retries=TASK_RETRIES,
            )
        for row in ds.iter_rows():
            record = json.loads(str(row["record"]))
            pending.pop(record["key"], None)
            emit(record)
    except LedgerError:
        raise  # the ledger cannot be written: stop, a rerun resumes from what it holds
    except Exception as exc:  # Ray itself failed: what did not come back is recorded failed
        log.error("the Ray job stopped: %s: %s", type(exc).__name__, exc)
        for s in list(pending.values()):
            emit(_failed_record(s, f"the Ray job stopped: {type(exc).__name__}: {exc}"))
        pending.clear()
    finally:
        for name, value in ctx_before.items():
            setattr(ctx, name, value)
        data_logger.setLevel(level_before)
    for s in pending.values():
        emit(_failed_record(s, "no result came back: its worker process died (see Ray's logs)"))


def run_batch(
    series: Sequence[Series],
    config: BatchConfig,
    *,
    address: str | None = None,
    progress: Callable[[dict[str, Any], int, int], None] | None = None,
    log_to_driver: bool = False,
) -> BatchSummary:
    """Run every series not done yet; record each in the ledger; write the report.

    ``progress(record, i, n)`` is called after each record is in the ledger (i of n to run).
    Series with a scan ``problem`` are recorded failed without running.  Ray is started or
    joined only when something needs running (see ``ray_session`` for ``address``).
    """
    from mar_rt.batch.report import write_report

    address = resolve_address(address)  # refused before anything is written
    out = Path(config.out).resolve()
    config = dataclasses.replace(config, out=out)
    settings = bundle_settings(config.bundle)
    t0 = time.perf_counter()
    summary = BatchSummary(
        out=out,
        job_id=uuid.uuid4().hex[:12],
        started_utc=_utc_now(),
        wall_s=0.0,
        found=len(series),
        skipped=0,
        retried=0,
    )
    with job_lock(out):
        ledger = Ledger(out)
        decided = ledger.plan(series, settings)
        summary.skipped, summary.retried = len(decided.skipped), len(decided.retried)
        runnable = [s for s in decided.todo if s.problem is None]
        n_total = len(decided.todo)

        def emit(record: dict[str, Any]) -> None:
            record["job_id"] = summary.job_id
            record.setdefault("settings", settings)
            ledger.append(record)
            summary.records.append(record)
            if progress is not None:
                progress(record, len(summary.records), n_total)

        for s in decided.todo:
            if s.problem is not None:
                emit(_failed_record(s, f"BadInputError: {s.problem}"))
        if runnable:
            _clean_leftovers(out, runnable, ledger)  # what a killed job left
            try:
                import ray
            except ImportError as exc:
                raise MarRtError("mar-rt batch needs Ray: pip install 'mar-rt[scale]'") from exc

            with ray_session(address, log_to_driver=log_to_driver) as where:
                summary.address = where
                summary.plan = plan_workers(config, len(runnable), ray.cluster_resources())
                log.info("running %d series on %s: %s", len(runnable), where, summary.plan)
                _execute(runnable, config, settings, summary.plan, emit)
            # a worker that died after writing a series' output and before its record left
            # that output behind, and Ray ran the series again under a new name
            _clean_leftovers(out, runnable, ledger)
        summary.wall_s = time.perf_counter() - t0
        summary.report_json, summary.report_png = write_report(out, summary, ledger)
    return summary
