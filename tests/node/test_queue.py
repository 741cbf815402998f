"""The durable run queue: arrival order, restart recovery, backoff, keep-hours cleanup."""

from __future__ import annotations

import os

from mar_rt.node.queue import PROCESSING, READY, SENT, SKIPPED, TO_SEND, RunQueue
from mar_rt.node.service import backoff_s
from mar_rt.node.spool import SeriesKey, Spool


def _ready_run(spool, queue, name, n=2):
    key = SeriesKey("CT1", "1.2", name)
    for i in range(n):
        spool.store(key, "a1", f"{name}.{i}", b"DICM" * 10)
    spool.mark_released(key, "a1")
    return queue.create(spool, key, 0.0, 1.0)


def test_runs_come_back_in_arrival_order_after_a_restart(tmp_path):
    spool, queue = Spool(tmp_path), RunQueue(tmp_path)
    a = _ready_run(spool, queue, "a")
    b = _ready_run(spool, queue, "b")
    queue.update(a, state=PROCESSING, processing_started=5.0)
    (queue.folder(a) / "derived" / ".tmp-half").mkdir(parents=True)  # run_study was killed
    fresh = RunQueue(tmp_path)  # a new process reads the same folder
    fresh.recover()
    runs = fresh.runs()
    assert [r.run_id for r in runs] == [a.run_id, b.run_id]
    assert [r.state for r in runs] == [READY, READY] and runs[0].processing_started is None
    assert not (queue.folder(a) / "derived").exists()
    assert fresh.next_ready().run_id == a.run_id
    assert len(fresh.input_files(runs[0])) == 2


def test_a_half_built_run_is_finished_on_recovery(tmp_path):
    spool, queue = Spool(tmp_path), RunQueue(tmp_path)
    run = _ready_run(spool, queue, "a", n=3)
    os.rename(queue.folder(run), queue.root / f".build-{run.run_id}")  # crash before rename
    assert queue.runs() == []
    queue.recover()
    (back,) = queue.runs()
    assert back.run_id == run.run_id and back.n_instances == 3 and back.state == READY


def test_sends_back_off_and_done_runs_are_kept_for_keep_hours(tmp_path):
    assert [backoff_s(n, 5.0, 300.0) for n in (1, 2, 3, 7, 8)] == [5, 10, 20, 300, 300]
    spool, queue = Spool(tmp_path), RunQueue(tmp_path)
    a = queue.update(_ready_run(spool, queue, "a"), state=TO_SEND, next_try=100.0)
    assert queue.due_to_send(now=99.0) == [] and queue.due_to_send(now=100.0) == [a]
    queue.update(a, state=SENT, sent_at=1000.0)
    b = queue.update(_ready_run(spool, queue, "b"), state=SKIPPED, processed_at=1000.0)
    assert queue.cleanup(keep_hours=1, now=1000.0 + 3599) == []
    assert sorted(queue.cleanup(keep_hours=1, now=1000.0 + 3601)) == sorted([a.run_id, b.run_id])
    assert queue.runs() == [] and not queue.folder(a).exists()
