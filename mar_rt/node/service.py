"""The node: SCP + completion ticker + worker process + sender, started and stopped together.

Threads in the node process::

    pynetdicom        one per association: C-STORE → spool, nothing else
    ticker            ready series → new runs; worker supervision; hourly cleanup
    sender            runs ``to_send`` → C-STORE SCU; failures back off and stay queued

and one worker process (spawn) that corrects runs.  :meth:`MarNode.stop` (SIGTERM) stops
listening, lets the worker finish the current series for up to ``shutdown_grace_s`` (else
stops it and puts the series back to ``ready``), and lets a send in progress finish.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time
from typing import Any

from mar_rt.atomic import atomic_file
from mar_rt.node.completion import CompletionTracker
from mar_rt.node.config import NodeConfig
from mar_rt.node.events import emit
from mar_rt.node.queue import SENT, TO_SEND, Run, RunQueue
from mar_rt.node.scp import StorageSCP
from mar_rt.node.sender import SendError, send_series
from mar_rt.node.spool import Spool
from mar_rt.node.worker import worker_main

CLEANUP_EVERY_S = 600.0
WORKER_RESTART_MAX_S = 60.0


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds before the next try after ``attempts`` failed ones: base·2^(attempts−1), capped."""
    return min(max_s, base_s * 2.0 ** max(attempts - 1, 0))


class MarNode:
    """One running MAR node (see the module docstring)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        mb = 1024 * 1024
        self.spool = Spool(
            config.spool,
            max_bytes=None if config.spool_max_mb is None else int(config.spool_max_mb * mb),
            min_free_bytes=int(config.min_free_mb * mb),
        )
        self.queue = RunQueue(config.spool)
        self.tracker = CompletionTracker(config.quiet_seconds)
        self.scp = StorageSCP(config, self.spool, self.tracker)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ctx = multiprocessing.get_context("spawn")
        self._worker: Any = None
        self._worker_stop: Any = None
        self._work = self._ctx.Event()  # a run became ready (wakes the worker)
        self._sendable = self._ctx.Event()  # a run became to_send (wakes the sender)
        self.worker_ready: Any = None
        self._worker_restarts = 0
        self._next_worker_start = 0.0

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Recover what a previous run left, start the worker, listen, start the threads."""
        cfg = self.config
        self.queue.recover()
        for key, last in self.spool.recover():
            self.tracker.adopt(key, last)
            emit("series_recovered", series=key.to_dict())
        self._write_pid_file()
        self._start_worker()
        self.scp.start()
        for name, target in (("ticker", self._ticker), ("sender", self._sender)):
            thread = threading.Thread(target=target, name=f"mar-rt-node-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        emit(
            "node_started",
            pid=os.getpid(),
            aet=cfg.aet,
            port=cfg.port,
            dest=str(cfg.dest),
            spool=cfg.spool,
            quiet_seconds=cfg.quiet_seconds,
            keep_hours=cfg.keep_hours,
        )

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to return (safe from a signal handler)."""
        self._stop.set()

    def serve_forever(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        """Stop listening, finish or requeue the current series, stop the threads."""
        emit("node_stopping")
        deadline = time.monotonic() + self.config.shutdown_grace_s  # the grace starts now
        self._stop.set()
        self._sendable.set()
        if self._worker is not None:
            self._worker_stop.set()
        self.scp.stop()
        self._stop_worker(max(deadline - time.monotonic(), 0.0))
        for thread in self._threads:
            thread.join(timeout=self.config.network_timeout_s + 5.0)
        (self.config.spool / "node.json").unlink(missing_ok=True)
        emit("node_stopped")

    def __enter__(self) -> MarNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- worker --------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        self._worker_stop = self._ctx.Event()
        self.worker_ready = self._ctx.Event()
        self._worker = self._ctx.Process(
            target=worker_main,
            args=(
                self.config,
                self._worker_stop,
                self.worker_ready,
                self._work,
                self._sendable,
                os.getpid(),
            ),
            name="mar-rt-node-worker",
            daemon=True,
        )
        self._worker.start()
        emit("worker_started", pid=self._worker.pid)

    def _stop_worker(self, grace_s: float) -> None:
        if self._worker is None:
            return
        self._worker_stop.set()
        self._work.set()
        self._worker.join(timeout=grace_s)
        if self._worker.is_alive():
            emit(
                "worker_terminated",
                level=logging.WARNING,
                pid=self._worker.pid,
                reason=f"did not finish its series within {grace_s} s; it is requeued",
            )
            self._worker.terminate()
            self._worker.join(timeout=10.0)
            if self._worker.is_alive():
                self._worker.kill()
                self._worker.join(timeout=10.0)
            self.queue.recover()  # processing → ready
        self._worker = None

    def _supervise_worker(self) -> None:
        """Restart a worker that died (with a growing pause), requeueing its series."""
        if self._worker is None or self._worker.is_alive() or self._stop.is_set():
            return
        now = time.monotonic()
        if self._next_worker_start == 0.0:
            self._worker_restarts += 1
            pause = backoff_s(self._worker_restarts, 1.0, WORKER_RESTART_MAX_S)
            emit(
                "worker_exited",
                level=logging.ERROR,
                exitcode=self._worker.exitcode,
                restart_in_s=pause,
            )
            self.queue.recover()
            self._next_worker_start = now + pause
        if now >= self._next_worker_start:
            self._next_worker_start = 0.0
            self._start_worker()

    # --- threads -------------------------------------------------------------------------------
    def _ticker(self) -> None:
        last_cleanup = 0.0
        while not self._stop.wait(self.config.poll_s):
            try:
                for series in self.tracker.pop_ready():
                    run = self.queue.create(
                        self.spool, series.key, series.first_instance, series.last_instance
                    )
                    if run is not None:
                        self._work.set()
                self._supervise_worker()
                if time.monotonic() - last_cleanup > CLEANUP_EVERY_S:
                    last_cleanup = time.monotonic()
                    self.queue.cleanup(self.config.keep_hours)
                    self.spool.clean_quarantine(self.config.keep_hours * 3600.0)
            except Exception:  # the ticker must keep going; the error is logged
                logging.getLogger(__name__).exception("node ticker")

    def _sender(self) -> None:
        """Send due runs; sleep until the worker signals a new one, the next retry is due, or
        ``rescan_s`` passed."""
        while not self._stop.is_set():
            self._sendable.clear()
            try:
                for run in self.queue.due_to_send():
                    if self._stop.is_set():
                        return
                    self.send(run)
                waiting = [r.next_try - time.time() for r in self.queue.runs(TO_SEND)]
                pause = max(min([self.config.rescan_s, *waiting]), 0.01)
            except Exception:  # keep sending; logged
                logging.getLogger(__name__).exception("node sender")
                pause = self.config.rescan_s
            self._sendable.wait(pause)

    def send(self, run: Run) -> Run:
        """Send one ``to_send`` run; on failure keep it queued with a backoff."""
        cfg = self.config
        folder = self.queue.folder(run)
        files = [folder / rel for rel in run.derived_files]
        run = self.queue.update(run, send_started=time.time())
        try:
            report = send_series(
                files, cfg.dest, calling_aet=cfg.aet, timeout_s=cfg.network_timeout_s
            )
        except SendError as exc:
            attempts = run.attempts + 1
            pause = backoff_s(attempts, cfg.retry_base_s, cfg.retry_max_s)
            emit(
                "send_failed",
                level=logging.WARNING,
                run=run.run_id,
                dest=str(cfg.dest),
                attempts=attempts,
                retry_in_s=pause,
                error=str(exc),
            )
            return self.queue.update(
                run,
                state=TO_SEND,
                attempts=attempts,
                next_try=time.time() + pause,
                last_error=str(exc),
            )
        run = self.queue.update(run, state=SENT, sent_at=time.time(), last_error=None)
        emit(
            "sent",
            run=run.run_id,
            dest=str(cfg.dest),
            instances=report.n_instances,
            derived_series=run.derived_series_uid,
            send_s=round(report.seconds, 3),
            timings_s=run.timings(),
        )
        return run

    def _write_pid_file(self) -> None:
        cfg = self.config
        info = {
            "pid": os.getpid(),
            "started": time.time(),
            "aet": cfg.aet,
            "port": cfg.port,
            "dest": str(cfg.dest),
        }
        with atomic_file(cfg.spool / "node.json") as tmp:
            tmp.write_text(json.dumps(info), encoding="utf-8")
