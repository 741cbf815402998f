"""The durable queue: one folder per *run* (one received series to correct and send).

::

    runs/<run-id>/state.json      the run's record (rewritten atomically on every change)
    runs/<run-id>/input/*.dcm     the received instances (moved here from the spool)
    runs/<run-id>/derived/...     the derived series written by ``run_study``

Run ids sort in arrival order (``<ms since epoch>-<series key>``).  States::

    ready ──worker──▶ processing ──▶ to_send ──sender──▶ sent
                           │  └────▶ skipped   (loop guard, or no metal: nothing is sent)
                           └───────▶ failed    (the input could not be corrected; kept)

A failed send keeps ``to_send`` with ``attempts`` + 1 and a ``next_try`` after an exponential
backoff.  After a restart, ``processing`` goes back to ``ready`` (the worker died mid-series;
``run_study`` writes its output folder atomically, so nothing half-written is left).

Received files are deleted only with their run, and a run only ``keep_hours`` after it became
``sent`` or ``skipped``.  Processes share the queue through the files only; each state has one
owner (the node creates ``ready`` runs, the worker moves ``ready`` on, the sender ``to_send``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mar_rt.atomic import atomic_file
from mar_rt.node.events import emit
from mar_rt.node.spool import SeriesKey, Spool, instance_files

READY, PROCESSING, TO_SEND, SENT, SKIPPED, FAILED = (
    "ready",
    "processing",
    "to_send",
    "sent",
    "skipped",
    "failed",
)
STATES = (READY, PROCESSING, TO_SEND, SENT, SKIPPED, FAILED)
DONE_STATES = (SENT, SKIPPED)


@dataclass(frozen=True)
class Run:
    """One run's record, as ``state.json`` holds it.  Times are epoch seconds."""

    run_id: str
    key: SeriesKey
    state: str
    n_instances: int
    first_instance: float
    last_instance: float
    ready_at: float
    late_after: tuple[str, ...] = ()  # earlier runs of the same series (late instances)
    attempts: int = 0  # failed sends so far
    next_try: float = 0.0
    last_error: str | None = None
    reason: str | None = None  # why skipped / failed
    processing_started: float | None = None
    processed_at: float | None = None
    send_started: float | None = None
    sent_at: float | None = None
    derived_series_uid: str | None = None
    derived_files: tuple[str, ...] = ()  # relative to the run folder
    n_metal_slices: int | None = None
    compute_timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["key"] = self.key.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Run:
        data = dict(data)
        data["key"] = SeriesKey.from_dict(data["key"])
        data["late_after"] = tuple(data.get("late_after", ()))
        data["derived_files"] = tuple(data.get("derived_files", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def timings(self) -> dict[str, float | None]:
        """receive (first → last instance), quiet (last instance → ready), wait (ready → worker
        start), compute, send, total (first instance → acknowledged), in seconds."""

        def span(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round(b - a, 3)

        return {
            "receive": span(self.first_instance, self.last_instance),
            "quiet": span(self.last_instance, self.ready_at),
            "wait": span(self.ready_at, self.processing_started),
            "compute": span(self.processing_started, self.processed_at),
            "send": span(self.send_started, self.sent_at),
            "total": span(self.first_instance, self.sent_at or self.processed_at),
        }


class RunQueue:
    """The runs under ``<spool>/runs``."""

    def __init__(self, spool_root: Path) -> None:
        self.root = Path(spool_root) / "runs"
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, tuple[tuple[int, int, int], Run]] = {}  # id → (stat stamp, run)

    def folder(self, run: Run | str) -> Path:
        return self.root / (run if isinstance(run, str) else run.run_id)

    def input_files(self, run: Run) -> list[Path]:
        return instance_files(self.folder(run) / "input")

    # --- reading -------------------------------------------------------------------------------
    def load(self, run_id: str) -> Run:
        """The run's record as on disk now (parsed again only when state.json changed)."""
        path = self.folder(run_id) / "state.json"
        st = path.stat()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cache.get(run_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        run = Run.from_dict(json.loads(path.read_text(encoding="utf-8")))
        self._cache[run_id] = (stamp, run)
        return run

    def runs(self, *states: str) -> list[Run]:
        """The runs (in arrival order), only those in ``states`` if any are given."""
        out = []
        folders = sorted(self.root.iterdir())
        for gone in set(self._cache) - {f.name for f in folders}:
            del self._cache[gone]
        for folder in folders:
            if folder.name.startswith(".") or not (folder / "state.json").is_file():
                continue
            try:
                run = self.load(folder.name)
            except FileNotFoundError:  # deleted (cleanup) while we listed
                continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                emit("run_unreadable", level=logging.ERROR, folder=folder, error=str(exc))
                continue
            if not states or run.state in states:
                out.append(run)
        return out

    def next_ready(self) -> Run | None:
        ready = self.runs(READY)
        return ready[0] if ready else None

    def due_to_send(self, now: float | None = None) -> list[Run]:
        now = time.time() if now is None else now
        return [r for r in self.runs(TO_SEND) if r.next_try <= now]

    # --- writing -------------------------------------------------------------------------------
    def save(self, run: Run) -> Run:
        path = self.folder(run) / "state.json"
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(run.to_dict(), indent=1), encoding="utf-8")
        st = path.stat()
        self._cache[run.run_id] = ((st.st_ino, st.st_mtime_ns, st.st_size), run)
        return run

    def update(self, run: Run, **changes: Any) -> Run:
        return self.save(dataclasses.replace(run, **changes))

    def create(
        self, spool: Spool, key: SeriesKey, first_instance: float, last_instance: float
    ) -> Run | None:
        """Move the released instances of ``key`` from the spool into a new ``ready`` run.

        The run folder is built under a hidden name and renamed when complete; a folder left
        half-built by a crash is finished by :meth:`recover`.  Returns None when no instance
        was there to take.
        """
        now = time.time()
        run_id = f"{int(now * 1000):013d}-{key.digest}"
        while self.folder(run_id).exists():
            run_id += "x"
        earlier = tuple(r.run_id for r in self.runs() if r.key == key)
        run = Run(
            run_id=run_id,
            key=key,
            state=READY,
            n_instances=0,
            first_instance=first_instance,
            last_instance=last_instance,
            ready_at=now,
            late_after=earlier,
        )
        building = self.root / f".build-{run_id}"
        building.mkdir()
        with atomic_file(building / "state.json") as tmp:  # first, so recover() can finish it
            tmp.write_text(json.dumps(run.to_dict(), indent=1), encoding="utf-8")
        n = spool.take(key, building / "input")
        if n == 0:
            shutil.rmtree(building, ignore_errors=True)
            return None
        run = dataclasses.replace(run, n_instances=n)
        with atomic_file(building / "state.json") as tmp:
            tmp.write_text(json.dumps(run.to_dict(), indent=1), encoding="utf-8")
        os.rename(building, self.folder(run_id))
        emit(
            "series_ready",
            run=run_id,
            series=key.to_dict(),
            instances=n,
            receive_s=round(last_instance - first_instance, 3),
            quiet_s=round(now - last_instance, 3),
        )
        if earlier:
            emit(
                "late_instances",
                level=logging.WARNING,
                run=run_id,
                series=key.to_dict(),
                instances=n,
                earlier_runs=list(earlier),
                note="instances arrived after the series was taken; a new derived series follows",
            )
        return run

    def recover(self) -> None:
        """After a restart: finish half-built runs; ``processing`` goes back to ``ready``."""
        for building in self.root.glob(".build-*"):
            if instance_files(building / "input") and (building / "state.json").is_file():
                final = self.root / building.name.removeprefix(".build-")
                run = Run.from_dict(json.loads((building / "state.json").read_text("utf-8")))
                run = dataclasses.replace(run, n_instances=len(instance_files(building / "input")))
                with atomic_file(building / "state.json") as tmp:
                    tmp.write_text(json.dumps(run.to_dict(), indent=1), encoding="utf-8")
                os.rename(building, final)
                emit("run_recovered", run=final.name, instances=run.n_instances)
            else:
                shutil.rmtree(building, ignore_errors=True)
        for run in self.runs(PROCESSING):
            derived = self.folder(run) / "derived"
            if derived.exists():
                shutil.rmtree(derived)  # only a folder run_study never finished can be here
            self.update(run, state=READY, processing_started=None)
            emit(
                "requeued",
                level=logging.WARNING,
                run=run.run_id,
                series=run.key.to_dict(),
                reason="was processing when the node stopped",
            )

    def cleanup(self, keep_hours: float, now: float | None = None) -> list[str]:
        """Delete runs that were sent or skipped more than ``keep_hours`` ago."""
        now = time.time() if now is None else now
        removed = []
        for run in self.runs(*DONE_STATES):
            done = run.sent_at if run.state == SENT else run.processed_at
            if done is not None and now - done > keep_hours * 3600.0:
                shutil.rmtree(self.folder(run), ignore_errors=True)
                removed.append(run.run_id)
                emit("run_deleted", run=run.run_id, state=run.state, keep_hours=keep_hours)
        return removed
