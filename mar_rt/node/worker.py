"""The worker: one process (multiprocessing *spawn*) that corrects ready runs, in arrival order.

It opens the pipeline once (``open_pipeline``) and keeps it warm between series.  Per run:

1. loop guard: a series that is already DERIVED / SECONDARY, or that mar-rt wrote, is
   skipped (nothing is sent, the log says why);
2. ``run_study`` on the received files → a derived series in ``runs/<id>/derived``;
3. a series without metal is skipped (not sent; logged); otherwise the run becomes
   ``to_send`` for the sender.

The worker talks to the node only through the queue on disk and a stop event: on stop it
finishes the current series, then leaves.  It dies with its parent (``PR_SET_PDEATHSIG``
on Linux), so a killed node never leaves an orphan computing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from mar_rt.errors import MarRtError
from mar_rt.node.config import NodeConfig
from mar_rt.node.events import emit, install_handlers
from mar_rt.node.queue import FAILED, PROCESSING, SKIPPED, TO_SEND, Run, RunQueue


def loop_guard_reason(files: list[Path]) -> str | None:
    """Why this series must not be corrected again (None when it may be).

    A series is skipped when any instance is derived (ImageType value 1 DERIVED, or value 2
    SECONDARY) or was written by mar-rt (``is_mar_derived``: our ContributingEquipment).
    """
    import pydicom

    from mar_rt.runtime.io.dicom import is_mar_derived

    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # unreadable files are run_study's to report, per file
            continue
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if is_mar_derived(ds) or image_type[1:2] == ["SECONDARY"]:
            what = "\\".join(image_type[:2]) or "none"
            return f"derived or written by mar-rt (ImageType {what})"
    return None


def process_run(run: Run, pipe: Any, queue: RunQueue, config: NodeConfig) -> Run:
    """Correct one ``ready`` run; returns its new record (to_send, skipped or failed)."""
    from mar_rt.runtime.study import run_study

    folder = queue.folder(run)
    files = queue.input_files(run)
    run = queue.update(run, state=PROCESSING, processing_started=time.time())
    emit(
        "processing",
        run=run.run_id,
        instances=len(files),
        wait_s=round(run.processing_started - run.ready_at, 3),
    )
    reason = loop_guard_reason(files)
    if reason is not None:
        emit("skipped_loop_guard", run=run.run_id, series=run.key.to_dict(), reason=reason)
        return queue.update(
            run, state=SKIPPED, reason=f"loop guard: {reason}", processed_at=time.time()
        )
    out_dir = folder / "derived"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    try:
        result = run_study(files, pipe, out_dir, steps=config.steps, preview=False)
    except MarRtError as exc:
        emit(
            "failed", level=logging.ERROR, run=run.run_id, series=run.key.to_dict(), error=str(exc)
        )
        return queue.update(run, state=FAILED, reason=str(exc), processed_at=time.time())
    done = time.time()
    timings = {k: round(float(v), 4) for k, v in result.timings_s.items()}
    if not result.has_metal:
        shutil.rmtree(out_dir, ignore_errors=True)
        emit(
            "skipped_no_metal",
            run=run.run_id,
            series=run.key.to_dict(),
            slices=result.n_slices,
            note="no metal found: nothing sent",
        )
        return queue.update(
            run,
            state=SKIPPED,
            reason="no metal",
            processed_at=done,
            n_metal_slices=0,
            compute_timings_s=timings,
        )
    rel = tuple(str(Path(p).relative_to(folder)) for p in result.files)
    emit(
        "processed",
        run=run.run_id,
        slices=result.n_slices,
        metal_slices=result.n_metal_slices,
        derived_series=result.series_uid,
        compute_s=round(done - run.processing_started, 3),
    )
    return queue.update(
        run,
        state=TO_SEND,
        processed_at=done,
        derived_series_uid=result.series_uid,
        derived_files=rel,
        n_metal_slices=result.n_metal_slices,
        compute_timings_s=timings,
    )


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(
    config: NodeConfig, stop: Any, ready: Any, work: Any, sendable: Any, parent_pid: int
) -> None:
    """Entry point of the worker process (picklable arguments only: spawn).

    ``stop``, ``ready``, ``work`` and ``sendable`` are multiprocessing events: stop after the
    current series; set once the pipeline is open; set by the node when a run became ready;
    set here when a run became ``to_send``.  The queue is also rescanned every
    ``config.rescan_s`` seconds, so a lost wake-up only delays.
    """
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    install_handlers(config.spool / "logs" / "node.jsonl")
    from mar_rt.runtime.study import open_pipeline

    queue = RunQueue(config.spool)
    t0 = time.perf_counter()
    try:
        pipe_cm = open_pipeline(config.bundle, backend=config.backend, device=config.device)
    except MarRtError as exc:
        emit("worker_failed", level=logging.ERROR, error=str(exc))
        raise
    with pipe_cm as pipe:
        emit(
            "worker_ready",
            pid=os.getpid(),
            open_s=round(time.perf_counter() - t0, 3),
            bundle=getattr(pipe, "bundle_name", None),
        )
        ready.set()
        while not stop.is_set():
            work.clear()  # before looking: a run created after this wakes the wait below
            run = queue.next_ready()
            if run is None:
                work.wait(config.rescan_s)
                continue
            try:
                if process_run(run, pipe, queue, config).state == TO_SEND:
                    sendable.set()
            except Exception as exc:  # keep the worker alive; the run is kept as failed
                logging.getLogger(__name__).exception("worker: run %s", run.run_id)
                queue.update(
                    queue.load(run.run_id),
                    state=FAILED,
                    reason=f"{type(exc).__name__}: {exc}",
                    processed_at=time.time(),
                )
    emit("worker_stopped", pid=os.getpid())
    logging.shutdown()
    os._exit(0)  # skip the interpreter teardown (seconds with torch loaded); all state is on disk
