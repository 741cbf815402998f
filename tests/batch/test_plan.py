"""Worker placement (one actor per GPU; fractional CPUs) and the report's figures, without Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mar_rt.batch.job import (
    BatchConfig,
    BatchSummary,
    local_ray_args,
    plan_workers,
    resolve_address,
)
from mar_rt.batch.ledger import Ledger
from mar_rt.batch.report import stage_distribution, write_report
from mar_rt.errors import MarRtError


def test_one_worker_per_gpu() -> None:
    plan = plan_workers(BatchConfig(out=Path("o")), 100, {"CPU": 32.0, "GPU": 4.0})
    assert (plan.workers, plan.num_gpus, plan.num_cpus, plan.device) == (4, 1.0, 1.0, "cuda")


def test_cpu_workers_leave_room_for_the_data_stages() -> None:
    plan = plan_workers(BatchConfig(out=Path("o")), 100, {"CPU": 2.0})
    assert (plan.workers, plan.num_gpus, plan.torch_threads, plan.device) == (2, 0.0, 1, "cpu")
    assert plan.workers * plan.num_cpus == pytest.approx(1.5)  # half a CPU stays free
    plan = plan_workers(BatchConfig(out=Path("o"), workers=1), 100, {"CPU": 2.0})
    assert plan.num_cpus == 1.0
    # never more workers than series; device='cpu' ignores the GPUs
    plan = plan_workers(BatchConfig(out=Path("o"), device="cpu"), 3, {"CPU": 16.0, "GPU": 2.0})
    assert (plan.workers, plan.num_gpus) == (3, 0.0)


def test_cuda_without_a_gpu_is_refused() -> None:
    with pytest.raises(MarRtError, match="no GPU"):
        plan_workers(BatchConfig(out=Path("o"), device="cuda"), 5, {"CPU": 8.0})


def test_address_from_the_option_then_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None  # Ray starts inside the command
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert resolve_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_address(None) == "10.0.0.1:6379"
    assert resolve_address("auto") == "auto"


def test_the_embedded_ray_is_small() -> None:
    args = local_ray_args()
    assert args["include_dashboard"] is False
    assert 75_000_000 < args["object_store_memory"] <= 1_000_000_000
    assert args["num_cpus"] == len(os.sched_getaffinity(0))


def _record(i: int, status: str, total: float) -> dict:
    return {
        "key": f"file:/s{i}.npy",
        "label": f"s{i}.npy",
        "status": status,
        "n_slices": 2,
        "timings_s": {"read": 0.5, "total": total, "worker": total + 0.1} if total else {},
        "node_id": "n1" if i % 2 else "n2",
        "error": None if status == "done" else "BadInputError: s.npy: NaN",
        "finished_utc": f"2026-01-01T00:00:{10 + i:02d}.000+00:00",
    }


def test_stage_distribution_and_report(tmp_path: Path) -> None:
    records = [_record(i, "done", t) for i, t in enumerate([1.0, 2.0, 3.0, 10.0])]
    records.append(_record(4, "failed", 0.0))
    stats = stage_distribution(records)
    assert list(stats) == ["read", "total", "worker"]
    assert stats["total"] == {"n": 4, "mean": 4.0, "median": 2.5, "p90": 7.9, "max": 10.0}

    ledger = Ledger(tmp_path)
    for r in records:
        ledger.append(r)
    summary = BatchSummary(
        out=tmp_path,
        job_id="j",
        started_utc="2026-01-01T00:00:00.000+00:00",
        wall_s=30.0,
        found=6,
        skipped=1,
        retried=0,
        records=records,
    )
    json_path, png_path = write_report(tmp_path, summary, ledger)
    report = json.loads(json_path.read_text())
    assert report["counts"] == {
        "found": 6,
        "skipped_done": 1,
        "ran": 5,
        "done": 4,
        "failed": 1,
        "retried": 0,
    }
    assert report["throughput"] == {"series_per_minute": 8.0, "slices_per_minute": 16.0}
    assert report["nodes"] == {"n2": 3, "n1": 2}
    assert report["failures"] == [
        {"key": "file:/s4.npy", "label": "s4.npy", "error": "BadInputError: s.npy: NaN"}
    ]
    assert png_path.read_bytes()[:4] == b"\x89PNG"
