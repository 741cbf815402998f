"""The batch ledger: ``DIR/ledger.jsonl``, one JSON record per finished series, append-only.

Only the job's driver writes it, one line at a time, flushed and fsynced before the next
series is counted, so a killed job loses at most the series that were running.  The last
record of a key is its state.  A record holds:

    key, label, kind        the series (see ``mar_rt.batch.inputs``)
    status                  'done' | 'failed'
    fingerprint             the series' stat fingerprint when it ran (names, sizes, mtimes,
                            options); a rerun skips a done series only while it is unchanged
    settings                what else decides the output (the bundle's sha256)
    input_sha256            sha256 of the input files' bytes (computed by the worker)
    output                  the output folder (done), or None
    kept                    a computed volume kept after a failed write, or None
    n_slices, n_metal_slices
    timings_s               run_study's stages plus ``worker`` (the worker's wall time)
    node_id, host, pid      where it ran (the Ray node id)
    started_utc, finished_utc, job_id
    error                   'ExceptionType: message' for a failed series, else None

A torn last line (the job killed while writing it) is skipped with a warning, and the next
append starts on a fresh line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mar_rt.batch.inputs import Series
from mar_rt.errors import MarRtError

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"
LOCK_NAME = ".batch.lock"
DONE, FAILED = "done", "failed"


class LedgerError(MarRtError):
    """The ledger cannot be read or written, or another job holds the output folder."""


@dataclass(frozen=True)
class Plan:
    """What a job does with each series: run it, or skip it (done before, unchanged)."""

    todo: list[Series]
    skipped: list[Series]
    retried: list[Series]  # the subset of ``todo`` whose last record failed


class Ledger:
    """``out_dir/ledger.jsonl``: read the last state per series, append records durably."""

    def __init__(self, out_dir: Path | str) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LEDGER_NAME

    def records(self) -> list[dict[str, Any]]:
        """Every intact record, in file order."""
        if not self.path.exists():
            return []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot read the ledger ({exc})") from exc
        records = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping a torn or corrupt line", self.path, n)
                continue
            if isinstance(record, dict) and "key" in record and "status" in record:
                records.append(record)
            else:
                log.warning("%s:%d: skipping a line that is not a ledger record", self.path, n)
        return records

    def latest(self) -> dict[str, dict[str, Any]]:
        """key → the key's last record."""
        return {r["key"]: r for r in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as one line; flush and fsync before returning."""
        line = json.dumps(record, sort_keys=True, default=str)
        if "\n" in line:  # json.dumps escapes newlines; a raw one would split the record
            raise LedgerError(f"{self.path}: a record serialised to several lines")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        try:
            with open(self.path, "a+b") as f:
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a torn line from a killed job: start afresh
                        f.write(b"\n")
                f.write(line.encode("utf-8") + b"\n")
                f.flush()
                os.fsync(f.fileno())
            if new:
                _fsync_dir(self.out_dir)
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot append to the ledger ({exc})") from exc

    def plan(self, series: Sequence[Series], settings: dict[str, Any]) -> Plan:
        """Split ``series`` into what to run and what is done already.

        A series is done when its last record is 'done' with the same fingerprint and
        settings, and its output folder still exists; everything else runs (failed ones again).
        """
        latest = self.latest()
        todo, skipped, retried = [], [], []
        for s in series:
            last = latest.get(s.key)
            if (
                last is not None
                and last.get("status") == DONE
                and last.get("fingerprint") == s.fingerprint()
                and last.get("settings") == settings
                and last.get("output")
                and Path(last["output"]).is_dir()
            ):
                skipped.append(s)
                continue
            todo.append(s)
            if last is not None and last.get("status") == FAILED:
                retried.append(s)
        return Plan(todo=todo, skipped=skipped, retried=retried)

    def outputs_in_use(self) -> set[Path]:
        """Every output folder (and kept file) a record names; a cleanup must leave these."""
        used = set()
        for r in self.records():
            for name in ("output", "kept"):
                if r.get(name):
                    used.add(Path(r[name]).resolve())
        return used


@contextlib.contextmanager
def job_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir/.batch.lock`` (flock) for a job; refuse when another job holds it."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise LedgerError(
                f"{out_dir}: another mar-rt batch is writing to this folder ({path} is locked)"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _fsync_dir(folder: Path) -> None:
    """fsync a folder so a new entry in it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
