"""``mar-rt bench`` on a micro bundle: the table, the JSON and the chart."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mar_rt.cli import app
from mar_rt.runtime.bench import percentiles
from tests.runtime._runtime_bundles import micro_bundle


def test_percentiles_match_numpy() -> None:
    values = [0.3, 0.1, 0.2, 0.5, 0.4]
    p = percentiles(values)
    assert p["p50"] == pytest.approx(np.percentile(values, 50))
    assert p["p95"] == pytest.approx(np.percentile(values, 95))
    assert p["n"] == 5


def test_bench_writes_json_and_chart(tmp_path_factory: pytest.TempPathFactory, tmp_path) -> None:
    bundle = micro_bundle(tmp_path_factory)
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        app,
        [
            "bench", "--bundle", str(bundle), "--backends", "torch,nosuch", "--runs", "2",
            "--warmup", "0", "--sweep", "1,2", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    torch_res = report["backends"]["torch"]
    for stage in ("clip", "image_sde", "sinogram_sde", "osro", "io", "total"):
        p = torch_res["stages"][stage]
        assert p["n"] == 2 and 0.0 <= p["p50"] <= p["p95"]
    total = torch_res["stages"]["total"]["p50"]
    parts = sum(torch_res["stages"][s]["p50"] for s in ("clip", "image_sde", "sinogram_sde"))
    assert parts <= total * 1.05 + 1e-3
    assert [r["steps"] for r in torch_res["sweep"]] == [1, 2]
    assert "error" in report["backends"]["nosuch"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "machine:" in result.output and "unavailable" in result.output
