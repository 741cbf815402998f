"""The batch report: ``DIR/report.json`` and a one-page ``DIR/report.png``.

Both describe one job (the series it ran) and the folder's state after it (the last ledger
record of every series):

- counts: found, skipped as done, ran, done, failed, retried;
- throughput: series per minute of the job's wall time, slices per minute;
- the distribution of per-series seconds for each stage (``run_study``'s timings plus
  ``worker``, the worker's wall time per series): n, mean, median, p90, max;
- the series per Ray node;
- failures with their reasons.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mar_rt.batch.ledger import DONE, FAILED, Ledger
from mar_rt.runtime.io.common import atomic_file, write_qa_record

if TYPE_CHECKING:
    from mar_rt.batch.job import BatchSummary

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
STAGE_ORDER = ("read", "correct", "write", "total", "worker")
"""Stages shown first, in this order; any other timing key (pipeline stages) follows."""


def stage_distribution(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """stage → {n, mean, median, p90, max} of per-series seconds, over done ``records``."""
    values: dict[str, list[float]] = {}
    for r in records:
        if r.get("status") != DONE:
            continue
        for stage, seconds in (r.get("timings_s") or {}).items():
            if isinstance(seconds, (int, float)):
                values.setdefault(stage, []).append(float(seconds))
    order = [s for s in STAGE_ORDER if s in values] + sorted(set(values) - set(STAGE_ORDER))
    out = {}
    for stage in order:
        v = np.asarray(values[stage])
        out[stage] = {
            "n": int(v.size),
            "mean": round(float(v.mean()), 4),
            "median": round(float(np.median(v)), 4),
            "p90": round(float(np.percentile(v, 90)), 4),
            "max": round(float(v.max()), 4),
        }
    return out


def build_report(summary: BatchSummary, ledger: Ledger) -> dict[str, Any]:
    """The report as a JSON-ready dict."""
    done, failed = summary.done, summary.failed
    slices = sum(int(r.get("n_slices") or 0) for r in done)
    minutes = summary.wall_s / 60.0
    state = ledger.latest()
    plan = summary.plan
    return {
        "job": {
            "job_id": summary.job_id,
            "started_utc": summary.started_utc,
            "wall_s": round(summary.wall_s, 3),
            "ray": summary.address or None,
            "workers": plan.workers if plan else 0,
            "cpus_per_worker": plan.num_cpus if plan else None,
            "gpus_per_worker": plan.num_gpus if plan else None,
            "torch_threads": plan.torch_threads if plan else None,
            "device": plan.device if plan else None,
        },
        "counts": {
            "found": summary.found,
            "skipped_done": summary.skipped,
            "ran": len(summary.records),
            "done": len(done),
            "failed": len(failed),
            "retried": summary.retried,
        },
        "throughput": {
            "series_per_minute": round(summary.series_per_minute, 3),
            "slices_per_minute": round(slices / minutes, 3) if done and minutes > 0 else 0.0,
        },
        "stages_s": stage_distribution(summary.records),
        "nodes": summary.nodes(),
        "failures": [
            {"key": r["key"], "label": r.get("label"), "error": r.get("error")} for r in failed
        ],
        "folder": {
            "series": len(state),
            "done": sum(r.get("status") == DONE for r in state.values()),
            "failed": sum(r.get("status") == FAILED for r in state.values()),
        },
    }


def _completion_minutes(records: list[dict[str, Any]], started_utc: str) -> list[float]:
    """Minutes from the job's start to each done record's finish, sorted."""
    t0 = datetime.fromisoformat(started_utc)
    out = []
    for r in records:
        if r.get("status") == DONE and r.get("finished_utc"):
            out.append((datetime.fromisoformat(r["finished_utc"]) - t0).total_seconds() / 60)
    return sorted(out)


def _horizontal() -> dict[str, Any]:
    """``boxplot`` keywords for horizontal boxes (``vert`` is deprecated from matplotlib 3.10)."""
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def _shorten(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def write_png(path: Path, report: dict[str, Any], summary: BatchSummary) -> Path:
    """One A4 page: counts and throughput, completions over time, stage box plots, failures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.27, 11.69), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.16, right=0.95, top=0.96, bottom=0.04)
    grid = fig.add_gridspec(4, 1, height_ratios=[0.8, 1.3, 1.5, 1.4], hspace=0.45)
    c, t, j = report["counts"], report["throughput"], report["job"]

    head = fig.add_subplot(grid[0])
    head.axis("off")
    lines = [
        f"mar-rt batch  ·  job {j['job_id']}  ·  started {j['started_utc']}",
        f"found {c['found']}  ·  skipped (done before) {c['skipped_done']}  ·  ran {c['ran']}"
        f"  ·  done {c['done']}  ·  failed {c['failed']}  ·  retried {c['retried']}",
        f"wall {j['wall_s']:.1f} s  ·  {t['series_per_minute']:.2f} series/min  ·  "
        f"{t['slices_per_minute']:.1f} slices/min",
        f"{j['workers']} worker(s) on {j['ray'] or 'no Ray (nothing to run)'}  ·  "
        f"{len(report['nodes'])} node(s)",
    ]
    head.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8.5)

    ax = fig.add_subplot(grid[1])
    minutes = _completion_minutes(summary.records, summary.started_utc)
    if minutes:
        ax.step([0.0, *minutes], range(len(minutes) + 1), where="post")
    ax.set_xlabel("minutes since the job started")
    ax.set_ylabel("series done")
    ax.set_title("throughput", fontsize=10)
    ax.grid(alpha=0.3)

    ax = fig.add_subplot(grid[2])
    stages = report["stages_s"]
    data = []
    for stage in stages:
        v = [
            float(r["timings_s"][stage])
            for r in summary.records
            if r.get("status") == DONE and stage in (r.get("timings_s") or {})
        ]
        data.append(v)
    if data:
        ax.boxplot(data, **_horizontal())
        ax.set_yticks(range(1, len(stages) + 1), list(stages))
        ax.invert_yaxis()  # the first stage on top
    ax.set_xlabel("seconds per series")
    ax.set_title("time per stage (done series)", fontsize=10)
    ax.grid(alpha=0.3, axis="x")

    ax = fig.add_subplot(grid[3])
    ax.axis("off")
    failures = report["failures"]
    text = [f"failures ({len(failures)})"]
    for f in failures[:18]:
        text.append(_shorten(f"{f['label']}: {f['error']}", 110))
    if len(failures) > 18:
        text.append(f"… and {len(failures) - 18} more (report.json)")
    ax.text(0, 1, "\n".join(text), va="top", family="monospace", fontsize=7)

    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_report(out: Path, summary: BatchSummary, ledger: Ledger) -> tuple[Path, Path]:
    """Write ``out/report.json`` and ``out/report.png`` atomically; return both paths."""
    report = build_report(summary, ledger)
    json_path = write_qa_record(out / REPORT_JSON, report)
    png_path = write_png(out / REPORT_PNG, report, summary)
    return json_path, png_path
