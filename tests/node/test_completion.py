"""The series-completion rules (completion.py), on a fake clock."""

from __future__ import annotations

from mar_rt.node.completion import CompletionTracker
from mar_rt.node.spool import SeriesKey

A = SeriesKey("CT1", "1.2.3", "1.2.3.4")
B = SeriesKey("CT1", "1.2.3", "1.2.3.5")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_ready_only_after_release_and_quiet_period():
    clock = Clock()
    tr = CompletionTracker(quiet_s=10, clock=clock)
    tr.instance(A, "a1")
    clock.t += 5
    tr.instance(A, "a1")
    clock.t += 60
    assert tr.pop_ready() == []  # quiet for 60 s, but the association is still open
    assert tr.released("a1") == [A]
    ready = tr.pop_ready()
    assert [s.key for s in ready] == [A] and ready[0].n_instances == 2
    assert ready[0].last_instance - ready[0].first_instance == 5
    assert tr.pop_ready() == []  # handed out once


def test_quiet_period_counts_from_the_last_instance():
    clock = Clock()
    tr = CompletionTracker(quiet_s=10, clock=clock)
    tr.instance(A, "a1")
    tr.released("a1")
    clock.t += 9.9
    tr.instance(A, "a2")  # a second association delivers more of the same series
    tr.released("a2")
    clock.t += 9.9
    assert tr.pop_ready() == []
    clock.t += 0.2
    assert [s.key for s in tr.pop_ready()] == [A]


def test_every_delivering_association_must_be_released():
    clock = Clock()
    tr = CompletionTracker(quiet_s=1, clock=clock)
    tr.instance(A, "a1")
    tr.instance(A, "a2")
    tr.released("a1")
    clock.t += 100
    assert tr.pop_ready() == []
    tr.released("a2")
    assert [s.key for s in tr.pop_ready()] == [A]


def test_aborted_association_is_dropped_and_others_still_complete():
    clock = Clock()
    tr = CompletionTracker(quiet_s=1, clock=clock)
    tr.instance(A, "a1")
    tr.instance(B, "a1")
    assert tr.aborted("a1") == [A, B]  # the caller quarantines these
    clock.t += 100
    assert tr.pop_ready() == [] and tr.pending() == []
    tr.instance(A, "a2")
    tr.released("a2")
    tr.instance(A, "a3")
    tr.aborted("a3")
    clock.t += 100
    ready = tr.pop_ready()
    assert [s.key for s in ready] == [A]


def test_ready_series_come_in_arrival_order_and_adopted_ones_wait_a_full_quiet_period():
    clock = Clock()
    tr = CompletionTracker(quiet_s=5, clock=clock)
    tr.instance(B, "b")
    clock.t += 1
    tr.instance(A, "a")
    tr.released("a")
    tr.released("b")
    clock.t += 1
    tr.adopt(SeriesKey("X", "9", "9.1"), last_instance=clock.t - 3600)
    clock.t += 4
    assert [s.key for s in tr.pop_ready()] == [B, A]  # adopted: 5 s from now, not from 1 h ago
    clock.t += 1
    assert [s.key.calling_ae for s in tr.pop_ready()] == ["X"]
