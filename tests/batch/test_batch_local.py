"""`mar-rt batch` on a local Ray (2 CPUs, 200 MB object store, no dashboard), one per module.

Six tiny series (three .npy, a NIfTI, two DICOM series of real slices; one .npy with NaN)
on the 64² micro bundle with one SDE step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="mar-rt batch needs the scale extra (ray[data])")

from typer.testing import CliRunner  # noqa: E402

from mar_rt.cli import app  # noqa: E402
from tests.batch._inputs import make_inputs, metal_npy_series  # noqa: E402
from tests.runtime._runtime_bundles import micro_bundle  # noqa: E402

EXIT_SOME_FAILED = 3


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=200_000_000,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return micro_bundle(tmp_path_factory)


def _batch(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["batch", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _ledger(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]


def _outputs(out: Path) -> list[Path]:
    """Every entry inside the per-series folders (run_study's outputs, or leftovers)."""
    return sorted(p for d in out.iterdir() if d.is_dir() for p in d.iterdir())


def _check_output(record: dict) -> None:
    """A done record's folder is complete: qa.json and every image file readable."""
    folder = Path(record["output"])
    assert folder.is_dir() and not folder.name.startswith(".tmp")
    json.loads((folder / "qa.json").read_text())
    if record["kind"] == "dicom":
        import pydicom

        files = sorted(folder.glob("IM*.dcm"))
        assert len(files) == record["n_slices"]
        for f in files:
            ds = pydicom.dcmread(f)
            assert ds.pixel_array.shape == (512, 512)
            assert "DERIVED" in ds.ImageType
    elif record["kind"] == "npy":
        image = np.load(folder / "image.npy")
        assert image.shape[-2:] == (64, 64) and np.isfinite(image).all()
    else:
        import nibabel as nib

        assert nib.load(folder / "image.nii.gz").get_fdata().shape == (64, 64, 3)


def test_six_series_then_a_rerun(ray_local: None, bundle: Path, tmp_path: Path) -> None:
    paths = make_inputs(tmp_path)
    out = tmp_path / "out"
    args = (tmp_path / "in", "--out", out, "--bundle", bundle, "--units", "mu", "--steps", "1")
    args = (*args, "--backend", "torch", "--workers", "2", "--no-preview")

    # 1. six series: five done, the NaN one failed with its reason
    code, output = _batch(*args)
    assert code == EXIT_SOME_FAILED, output
    records = _ledger(out)
    assert len(records) == 6
    done = [r for r in records if r["status"] == "done"]
    (failed,) = [r for r in records if r["status"] == "failed"]
    assert len(done) == 5
    assert failed["label"] == "broken.npy"
    assert failed["error"].startswith("BadInputError: ")
    assert str(paths["broken"]) in failed["error"] and "4 NaN" in failed["error"]
    assert f"FAILED broken.npy: BadInputError: {paths['broken']}" in output
    assert "5 done now, 1 failed" in output
    for r in done:
        _check_output(r)
        assert len(r["input_sha256"]) == 64 and r["node_id"]
        assert r["timings_s"]["worker"] >= r["timings_s"]["total"] > 0
    metal = {r["label"]: r["n_metal_slices"] for r in done}
    assert metal["metal.npy"] == 1 and metal["water.npy"] == 0
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["done"] == 5 and report["counts"]["failed"] == 1
    assert report["failures"][0]["error"] == failed["error"]
    assert report["stages_s"]["total"]["n"] == 5
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outputs = _outputs(out)
    assert len(outputs) == 5

    # 2. a rerun does nothing for the five and tries the broken one again (on a worker)
    code, output = _batch(*args)
    assert code == EXIT_SOME_FAILED, output
    records = _ledger(out)
    assert len(records) == 7
    retry = records[-1]
    assert retry["label"] == "broken.npy" and retry["status"] == "failed"
    assert retry["job_id"] != failed["job_id"] and retry["pid"] and retry["node_id"]
    assert retry["error"] == failed["error"]
    assert "5 done before (skipped), 0 done now, 1 failed" in output
    assert _outputs(out) == outputs


def _killed_midway(args: list[str], ledger: Path, timeout_s: float = 240.0) -> None:
    """Run `mar-rt batch` in its own session; SIGKILL that session after the first record."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    code = "import sys; from mar_rt.cli import app; sys.argv[0] = 'mar-rt'; app()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "batch", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not (ledger.exists() and ledger.read_text().count("\n") >= 1):
            assert proc.poll() is None, "the batch ended before its first ledger record"
            assert time.monotonic() < deadline, "no ledger record in time"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the command, its local Ray and its workers
        proc.wait(timeout=30)
    # what the session left (Ray's processes) is gone before the test goes on
    deadline = time.monotonic() + 30
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-s", str(sid), "-o", "pid="], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_killed_job_resumes_without_half_written_output(
    ray_local: None, bundle: Path, tmp_path: Path
) -> None:
    src, out, args = metal_npy_series(tmp_path, bundle, "--workers", "1")

    _killed_midway(args, out / "ledger.jsonl")
    first = _ledger(out)
    assert 1 <= len(first) < 4
    for r in first:
        assert r["status"] == "done"
        _check_output(r)
    # no half-written output: every folder under its final name is complete (one the worker
    # finished after the last record may exist without a record); the rest is ".tmp-*"
    for entry in _outputs(out):
        if not entry.name.startswith(".tmp-"):
            _check_output({"output": entry, "kind": "npy"})

    code, output = _batch(*args)
    assert code == 0, output
    records = _ledger(out)
    assert len(records) == 4
    assert sorted(r["key"] for r in records) == sorted(f"file:{p}" for p in src.glob("*.npy"))
    assert records[: len(first)] == first  # done before the kill: not run again
    for r in records:
        _check_output(r)
    assert _outputs(out) == sorted(Path(r["output"]) for r in records)  # nothing left over


def test_an_attempt_whose_record_was_lost_leaves_no_output(
    ray_local: None, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker can die after ``run_study`` renamed a series' output into place and before
    the record came back; Ray then runs the series again, under a new name. Here the real
    worker runs the first series twice in-process and its first record is dropped: once the
    job is over only the recorded outputs remain."""
    from mar_rt.batch import job

    src, out, args = metal_npy_series(tmp_path, bundle, "--workers", "1")
    lost: list[dict] = []

    def execute(todo, config, settings, plan, emit) -> None:
        worker = job.SeriesWorker(str(config.bundle), config.backend, plan.device, 1)
        for i, series in enumerate(todo):
            task = json.loads(job._task(series, config, settings))
            if i == 0:
                lost.append(worker.run_one(task))  # its process dies before this comes back
            emit(worker.run_one(task))

    monkeypatch.setattr(job, "_execute", execute)
    code, output = _batch(*args)
    assert code == 0, output
    records = _ledger(out)
    assert len(records) == 4 and all(r["status"] == "done" for r in records), records
    (first,) = lost
    assert first["status"] == "done" and first["output"] not in {r["output"] for r in records}
    assert not Path(first["output"]).exists()
    assert _outputs(out) == sorted(Path(r["output"]) for r in records)


def _worker_pids() -> list[int]:
    """PIDs of the Ray Data actor processes (process title ``ray::MapWorker(...)`` or
    ``ray::_MapWorker``) running SeriesWorker."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [
        int(line.split(None, 1)[0])
        for line in out.splitlines()
        if "ray::" in line and "MapWorker" in line
    ]


def test_a_worker_that_dies_has_its_series_retried(
    ray_local: None, bundle: Path, tmp_path: Path
) -> None:
    """SIGKILL the only worker process after its first record: Ray restarts the actor and
    runs the series it was holding again, so every series ends 'done', once each."""
    import threading

    src, out, args = metal_npy_series(tmp_path, bundle, "--workers", "1")
    killed: list[int] = []

    def kill_after_first_record() -> None:
        ledger = out / "ledger.jsonl"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            pids = _worker_pids() if ledger.exists() and ledger.read_text().count("\n") else []
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            if pids:
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_record, daemon=True)
    killer.start()
    code, output = _batch(*args)
    killer.join(timeout=10)
    assert killed, "no worker process was found to kill"
    assert code == 0, output
    records = _ledger(out)
    assert sorted(r["key"] for r in records) == sorted(f"file:{p}" for p in src.glob("*.npy"))
    assert all(r["status"] == "done" for r in records), records
    pids = {r["pid"] for r in records}
    # the killed worker wrote the first records, a restarted one the rest
    assert pids & set(killed) and pids - set(killed), (pids, killed)
    for r in records:
        _check_output(r)
    assert _outputs(out) == sorted(Path(r["output"]) for r in records)
