"""When is a received series complete?  DICOM has no "series complete" message, so:

A series (keyed by calling AE, Study and Series Instance UID) is **ready** when

1. every association that delivered part of it was released (none is still open), and
2. no instance of it has arrived for ``quiet_s`` seconds.

An aborted association's instances are quarantined by the caller and forgotten here; the
series is still ready later if released associations delivered other parts of it.

The tracker holds only state in memory and takes the clock as an argument, so the rules are
tested without a network or sleeping.  It is thread-safe (the SCP calls it from one thread
per association).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mar_rt.node.spool import SeriesKey


@dataclass
class SeriesArrival:
    """What the tracker knows about one series (times from ``time.time()``, seconds)."""

    key: SeriesKey
    first_instance: float
    last_instance: float
    n_instances: int = 0
    open_assocs: set[str] = field(default_factory=set)
    released_assocs: set[str] = field(default_factory=set)


class CompletionTracker:
    """Series arrival state; :meth:`pop_ready` hands out the series that are complete."""

    def __init__(self, quiet_s: float, clock: Callable[[], float] = time.time) -> None:
        self.quiet_s = float(quiet_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._series: dict[SeriesKey, SeriesArrival] = {}
        self._assoc_keys: dict[str, set[SeriesKey]] = {}

    def instance(self, key: SeriesKey, assoc_id: str) -> None:
        """One instance of ``key`` arrived on association ``assoc_id``."""
        now = self.clock()
        with self._lock:
            s = self._series.get(key)
            if s is None:
                s = self._series[key] = SeriesArrival(key, first_instance=now, last_instance=now)
            s.last_instance = now
            s.n_instances += 1
            s.open_assocs.add(assoc_id)
            self._assoc_keys.setdefault(assoc_id, set()).add(key)

    def keys_of(self, assoc_id: str) -> list[SeriesKey]:
        """The series ``assoc_id`` has delivered to so far."""
        with self._lock:
            return sorted(self._assoc_keys.get(assoc_id, set()))

    def released(self, assoc_id: str) -> list[SeriesKey]:
        """``assoc_id`` was released; returns the series it delivered to."""
        with self._lock:
            keys = sorted(self._assoc_keys.pop(assoc_id, set()))
            for key in keys:
                s = self._series[key]
                s.open_assocs.discard(assoc_id)
                s.released_assocs.add(assoc_id)
            return keys

    def aborted(self, assoc_id: str) -> list[SeriesKey]:
        """``assoc_id`` was aborted; returns the series whose files from it must be
        quarantined.  A series left with no association at all is forgotten."""
        with self._lock:
            keys = sorted(self._assoc_keys.pop(assoc_id, set()))
            for key in keys:
                s = self._series[key]
                s.open_assocs.discard(assoc_id)
                if not s.open_assocs and not s.released_assocs:
                    del self._series[key]
            return keys

    def adopt(self, key: SeriesKey, last_instance: float, n_instances: int = 0) -> None:
        """Take over a series found on disk at start-up (its associations all released); its
        quiet period counts from ``max(last_instance, now)`` so a restart never rushes it."""
        now = self.clock()
        with self._lock:
            if key not in self._series:
                self._series[key] = SeriesArrival(
                    key, first_instance=last_instance, last_instance=now, n_instances=n_instances
                )
            self._series[key].released_assocs.add("recovered")

    def pop_ready(self) -> list[SeriesArrival]:
        """Remove and return the ready series, in order of their first instance."""
        now = self.clock()
        with self._lock:
            ready = [
                s
                for s in self._series.values()
                if not s.open_assocs and s.released_assocs and now - s.last_instance >= self.quiet_s
            ]
            for s in ready:
                del self._series[s.key]
        return sorted(ready, key=lambda s: s.first_instance)

    def pending(self) -> list[SeriesArrival]:
        """The series still being received or in their quiet period (copies of the state)."""
        with self._lock:
            return [
                SeriesArrival(
                    s.key,
                    s.first_instance,
                    s.last_instance,
                    s.n_instances,
                    set(s.open_assocs),
                    set(s.released_assocs),
                )
                for s in self._series.values()
            ]
