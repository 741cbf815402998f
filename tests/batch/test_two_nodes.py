"""`mar-rt batch --address` on a two-node Ray cluster on loopback (head + one worker node).

Each node has one CPU, so the two actors (0.75 CPU each) cannot share a node: the ledger's
node ids must name both nodes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="mar-rt batch needs the scale extra (ray[data])")

from typer.testing import CliRunner  # noqa: E402

from mar_rt.cli import app  # noqa: E402
from tests.batch._inputs import metal_npy_series  # noqa: E402
from tests.runtime._runtime_bundles import micro_bundle  # noqa: E402

NODE = {"num_cpus": 1, "object_store_memory": 100_000_000}


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    import ray
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    # Ray on Linux rewrites 127.0.0.1 to the machine's address when it connects; its
    # single-machine mode (the macOS default) keeps every node and the driver on loopback.
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the node processes
    mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # this process (ray imported)
    c = Cluster(
        initialize_head=True,
        head_node_args={**NODE, "include_dashboard": False, "node_ip_address": "127.0.0.1"},
    )
    c.add_node(**NODE, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()
    mp.undo()


def test_batch_uses_both_nodes(
    cluster, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    import ray

    bundle = micro_bundle(tmp_path_factory)
    _, out, args = metal_npy_series(tmp_path, bundle, "--address", cluster.address)
    result = CliRunner().invoke(app, ["batch", *args])
    assert result.exit_code == 0, result.output
    assert "on the Ray cluster at" in result.output and "2 worker(s)" in result.output
    assert not ray.is_initialized()  # the command left the cluster, not stopped it

    records = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["status"] == "done" for r in records)
    nodes = {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
    assert len(nodes) == 2
    assert {r["node_id"] for r in records} == nodes
    report = json.loads((out / "report.json").read_text())
    assert set(report["nodes"]) == nodes and sum(report["nodes"].values()) == 4
