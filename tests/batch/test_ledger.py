"""The ledger: durable appends, torn lines, what a rerun skips and retries, the job lock."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mar_rt.batch.inputs import SeriesOptions, scan_inputs
from mar_rt.batch.ledger import DONE, FAILED, Ledger, LedgerError, job_lock

SETTINGS = {"bundle_sha256": "0123456789abcdef"}


def _series(tmp_path: Path, n: int) -> list:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(n):
        np.save(folder / f"s{i}.npy", np.full((4, 4), i, np.float32))
    return scan_inputs([folder], options=SeriesOptions(units="mu")).series


def _record(series, status: str, output: Path | None = None, **extra) -> dict:
    return {
        "key": series.key,
        "status": status,
        "fingerprint": series.fingerprint(),
        "settings": SETTINGS,
        "output": str(output) if output else None,
        **extra,
    }


def test_plan_skips_done_and_retries_failed(tmp_path: Path) -> None:
    a, b, c, d = _series(tmp_path, 4)
    ledger = Ledger(tmp_path / "out")
    done_out = tmp_path / "out" / "a-out"
    done_out.mkdir(parents=True)
    ledger.append(_record(a, FAILED, error="first try"))
    ledger.append(_record(a, DONE, done_out))  # the last record of a key is its state
    ledger.append(_record(b, FAILED, error="NaN"))
    ledger.append(_record(c, DONE, tmp_path / "out" / "gone"))  # output deleted since
    plan = ledger.plan([a, b, c, d], SETTINGS)
    assert plan.skipped == [a]
    assert plan.todo == [b, c, d]
    assert plan.retried == [b]
    # another bundle: nothing counts as done
    assert ledger.plan([a], {"bundle_sha256": "other"}).todo == [a]


def test_plan_reruns_a_series_whose_file_changed(tmp_path: Path) -> None:
    (a,) = _series(tmp_path, 1)
    ledger = Ledger(tmp_path / "out")
    (tmp_path / "out" / "o").mkdir(parents=True)
    ledger.append(_record(a, DONE, tmp_path / "out" / "o"))
    np.save(a.files[0], np.ones((5, 5), np.float32))  # new size → new fingerprint
    assert ledger.plan([a], SETTINGS).todo == [a]


def test_appends_are_whole_lines_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    a, b = _series(tmp_path, 2)
    ledger = Ledger(tmp_path / "out")
    ledger.append(_record(a, DONE, tmp_path, note="line\nbreak"))
    with open(ledger.path, "ab") as f:  # a job killed in the middle of a write
        f.write(b'{"key": "file:/x", "stat')
    ledger.append(_record(b, FAILED, error="boom"))
    lines = ledger.path.read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0])["note"] == "line\nbreak"
    assert [r["key"] for r in ledger.records()] == [a.key, b.key]


def test_lock_refuses_a_second_job_on_the_same_folder(tmp_path: Path) -> None:
    with job_lock(tmp_path):
        with pytest.raises(LedgerError, match="another mar-rt batch is writing"):
            with job_lock(tmp_path):
                pass
    with job_lock(tmp_path):  # released
        pass
