"""`mar-rt batch --address`: a Ray Client address is refused before anything is written.

Ray Data, which runs the series, does not work through Ray Client: with Ray 2.60 and a
client server on loopback every series failed with "'Worker' object has no attribute
'core_worker'" (ray-project/ray#42739: "Ray client does not work with Ray Data").
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray", reason="mar-rt batch needs the scale extra (ray[data])")

from typer.testing import CliRunner  # noqa: E402

from mar_rt.batch.job import resolve_address  # noqa: E402
from mar_rt.cli import app  # noqa: E402
from mar_rt.errors import MarRtError  # noqa: E402
from tests.batch._inputs import metal_npy_series  # noqa: E402

CLIENT = "ray://127.0.0.1:10001"


@pytest.mark.parametrize("from_env", [False, True], ids=["option", "RAY_ADDRESS"])
def test_ray_client_address_is_refused_before_the_ledger(
    from_env: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    extra = () if from_env else ("--address", CLIENT)
    if from_env:
        monkeypatch.setenv("RAY_ADDRESS", CLIENT)
    _, out, args = metal_npy_series(tmp_path, tmp_path / "no-bundle-needed", *extra)
    result = CliRunner().invoke(app, ["batch", *args])
    assert result.exit_code not in (0, None)
    said = " ".join(result.output.split())
    source = "$RAY_ADDRESS" if from_env else "--address"
    assert f"{source} {CLIENT}: a Ray Client address" in said
    assert "--address auto" in said and "ray job submit" in said
    assert not (out / "ledger.jsonl").exists()  # nothing recorded as failed or half-written
    assert not ray.is_initialized()


def test_cluster_addresses_pass_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None
    assert resolve_address("auto") == "auto"
    assert resolve_address("10.0.0.5:6379") == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert resolve_address(None) == "10.0.0.5:6379"
    assert resolve_address("auto") == "auto"  # the option wins over the environment
    with pytest.raises(MarRtError, match="Ray Client"):
        resolve_address(" RAY://head:10001")
