"""What ``mar-rt node status`` shows: is the node running, the queue, the last series and
their timings, read from the spool alone (works while the node runs, or after)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mar_rt.node.queue import STATES, RunQueue
from mar_rt.node.spool import Spool


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect_status(spool_root: Path, last: int = 10) -> dict[str, Any]:
    """The node's state as a JSON-able dict (see :func:`format_status`)."""
    root = Path(spool_root)
    info: dict[str, Any] = {}
    try:
        info = json.loads((root / "node.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    running = bool(info) and _alive(int(info.get("pid", 0)))
    queue = RunQueue(root)
    runs = queue.runs()
    spool = Spool(root)
    incoming = list(spool.keys())
    quarantined = [p for p in spool.quarantine_dir.iterdir() if p.is_dir()]
    counts = Counter(r.state for r in runs)
    return {
        "running": running,
        "node": info,
        "incoming_series": len(incoming),
        "quarantined": len(quarantined),
        "queue": {s: counts.get(s, 0) for s in STATES},
        "waiting": [
            {
                "run": r.run_id,
                "state": r.state,
                "attempts": r.attempts,
                "next_try_in_s": round(max(r.next_try - time.time(), 0.0), 1),
                "last_error": r.last_error,
            }
            for r in runs
            if r.state in ("ready", "processing", "to_send", "failed")
        ],
        "last": [
            {
                "run": r.run_id,
                "state": r.state,
                "calling_ae": r.key.calling_ae,
                "series_uid": r.key.series_uid,
                "instances": r.n_instances,
                "metal_slices": r.n_metal_slices,
                "reason": r.reason,
                "timings_s": r.timings(),
            }
            for r in runs[-last:]
        ],
    }


def format_status(status: dict[str, Any]) -> str:
    """A plain-text table of :func:`collect_status`."""
    node = status["node"]
    head = (
        f"node: running (pid {node.get('pid')}, {node.get('aet')} port {node.get('port')} → "
        f"{node.get('dest')})"
        if status["running"]
        else "node: not running"
    )
    q = status["queue"]
    lines = [
        head,
        f"incoming series: {status['incoming_series']}   quarantined: {status['quarantined']}",
        "queue: " + "  ".join(f"{s} {q[s]}" for s in STATES),
    ]
    for w in status["waiting"]:
        if w["state"] in ("to_send", "failed"):
            extra = f" attempts {w['attempts']}, next try in {w['next_try_in_s']} s"
            lines.append(
                f"  {w['run']} {w['state']}{extra if w['state'] == 'to_send' else ''}"
                f"{': ' + w['last_error'] if w['last_error'] else ''}"
            )
    cols = ("receive", "quiet", "wait", "compute", "send", "total")
    lines.append("last series:")
    lines.append(
        f"  {'run':<36}{'state':<10}{'from':<17}{'inst':>5}{'metal':>6}"
        + "".join(f"{c + ' s':>10}" for c in cols)
    )
    for r in status["last"]:
        t = r["timings_s"]
        cells = "".join(f"{'-' if t[c] is None else f'{t[c]:.2f}':>10}" for c in cols)
        metal = "-" if r["metal_slices"] is None else str(r["metal_slices"])
        lines.append(
            f"  {r['run']:<36}{r['state']:<10}{r['calling_ae']:<17}"
            f"{r['instances']:>5}{metal:>6}{cells}" + (f"  ({r['reason']})" if r["reason"] else "")
        )
    return "\n".join(lines)
