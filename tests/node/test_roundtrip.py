"""The node against a real Orthanc (Debian's /usr/sbin/Orthanc), with `mar-rt node` running as
its own process: the round trip, the destination down, and the node stopped mid-series."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pydicom
import pytest
from typer.testing import CliRunner

from tests.node._dicom_net import (
    ORTHANC_BIN,
    NodeProcess,
    Orthanc,
    free_port,
    metal_series,
    run_states,
    store_scu,
    wait_for,
)
from tests.runtime._runtime_bundles import micro_bundle

pytestmark = pytest.mark.skipif(
    not ORTHANC_BIN.exists(),
    reason=f"{ORTHANC_BIN} not found (Debian package orthanc; .ci/run installs it)",
)

TIMEOUT_S = 120.0  # any single wait; the micro bundle corrects 4 slices in a few seconds


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return micro_bundle(tmp_path_factory)


@pytest.fixture()
def net(tmp_path):
    """(orthanc not yet started, node port, spool folder); everything is stopped at the end."""
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=port)
    nodes: list[NodeProcess] = []
    yield orthanc, port, tmp_path / "spool", nodes
    for node in nodes:
        node.stop()
    orthanc.stop()


@pytest.fixture()
def metal_files(tmp_path, shared_data):
    return metal_series(shared_data / "dicom" / "pancreas_4", tmp_path / "metal", (1, 2))


def _run_in(spool, state):
    return next((r for r in run_states(spool) if r["state"] == state), None)


def _config(tmp_path, **values):
    path = tmp_path / "node.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return str(path)


def test_round_trip_through_orthanc(net, bundle, metal_files, tmp_path):
    orthanc, port, spool, nodes = net
    orthanc.start()
    node = NodeProcess(spool, port, orthanc.dest, bundle, "--quiet-seconds", "1").start()
    nodes.append(node)
    uploaded = {pydicom.dcmread(f).SOPInstanceUID: f.read_bytes() for f in metal_files}
    study_uid = pydicom.dcmread(metal_files[0]).StudyInstanceUID
    source_id = orthanc.upload(metal_files)
    job = orthanc.post("/modalities/marnode/store", {"Resources": [source_id], "Synchronous": True})
    assert job.get("InstancesCount", 4) == 4, job

    sent = wait_for("the derived series to be sent", lambda: _run_in(spool, "sent"), TIMEOUT_S)
    series = orthanc.find_series(study_uid)
    assert len(series) == 2, [s["MainDicomTags"] for s in series]
    derived = next(s for s in series if s["ID"] != source_id)
    assert derived["MainDicomTags"]["SeriesInstanceUID"] == sent["derived_series_uid"]
    assert len(orthanc.get(f"/series/{derived['ID']}")["Instances"]) == 4
    referenced = set()
    for instance_id in orthanc.get(f"/series/{derived['ID']}")["Instances"]:
        tags = orthanc.instance_tags(instance_id)
        assert tags["ImageType"].split("\\")[:2] == ["DERIVED", "SECONDARY"]
        assert tags["SOPInstanceUID"] not in uploaded
        referenced |= {item["ReferencedSOPInstanceUID"] for item in tags["SourceImageSequence"]}
    assert referenced == set(uploaded)  # every derived slice points at its source slice
    if shutil.which("dciodvfy"):  # what the PACS holds is conformant (dicom3tools)
        stored = tmp_path / "stored.dcm"
        stored.write_bytes(orthanc.get(f"/instances/{instance_id}/file"))
        report = subprocess.run(
            ["dciodvfy", str(stored)], capture_output=True, text=True, timeout=60
        )
        lines = (report.stdout + report.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        assert errors == [], errors

    source = orthanc.get(f"/series/{source_id}")  # the original series is untouched
    assert len(source["Instances"]) == 4
    for instance_id in source["Instances"]:
        uid = orthanc.instance_tags(instance_id)["SOPInstanceUID"]
        assert orthanc.get(f"/instances/{instance_id}/file") == uploaded[uid]

    assert sent["key"]["calling_ae"] == "ORTHANC" and sent["n_instances"] == 4
    assert sent["n_metal_slices"] == 2 and sent["attempts"] == 0
    assert not (spool / "incoming").exists() or not any((spool / "incoming").iterdir())
    run_folder = spool / "runs" / sent["run_id"]
    assert len(list((run_folder / "input").glob("*.dcm"))) == 4  # kept for --keep-hours

    from mar_rt.cli import app

    out = CliRunner().invoke(app, ["node", "status", "--spool", str(spool)])
    assert out.exit_code == 0, out.output
    assert "node: running" in out.output and "sent 1" in out.output
    assert sent["run_id"] in out.output and "ORTHANC" in out.output

    assert node.signal(signal.SIGTERM) == 0
    assert not (spool / "node.json").exists()
    events = [e["event"] for e in node.events()]
    for name in ("listening", "worker_ready", "series_ready", "processed", "sent", "node_stopped"):
        assert name in events


def test_destination_down_then_back(net, bundle, metal_files, tmp_path):
    orthanc, port, spool, nodes = net  # Orthanc is not running yet
    config = _config(tmp_path, quiet_seconds=1, retry_base_s=0.5, retry_max_s=1.0)
    node = NodeProcess(spool, port, orthanc.dest, bundle, "--config", config).start()
    nodes.append(node)
    assert store_scu(metal_files, port) == [0, 0, 0, 0]

    def failed_once():
        run = _run_in(spool, "to_send")
        return run if run and run["attempts"] >= 1 else None

    queued = wait_for("a failed send", failed_once, TIMEOUT_S)
    assert "association" in queued["last_error"]
    orthanc.start()
    sent = wait_for("the send after Orthanc is back", lambda: _run_in(spool, "sent"), TIMEOUT_S)
    assert sent["attempts"] >= 1
    series = orthanc.find_series(pydicom.dcmread(metal_files[0]).StudyInstanceUID)
    assert [s["MainDicomTags"]["SeriesInstanceUID"] for s in series] == [sent["derived_series_uid"]]
    assert len(series[0]["Instances"]) == 4


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_node_stopped_during_processing_resumes_after_restart(
    net, bundle, metal_files, tmp_path, sig
):
    orthanc, port, spool, nodes = net
    orthanc.start()
    config = _config(tmp_path, quiet_seconds=1, shutdown_grace_s=0.5)
    slow = NodeProcess(spool, port, orthanc.dest, bundle, "--config", config, "--steps", "1000")
    slow.start()
    nodes.append(slow)
    pgid = slow.proc.pid
    assert store_scu(metal_files, port) == [0, 0, 0, 0]
    wait_for("processing to start", lambda: _run_in(spool, "processing"), TIMEOUT_S, 0.05)

    rc = slow.signal(sig)
    if sig == signal.SIGTERM:
        assert rc == 0  # a clean stop: 1000 steps do not finish in 0.5 s, so it is requeued
        assert [r["state"] for r in run_states(spool)] == ["ready"]
        assert "worker_terminated" in [e["event"] for e in slow.events()]
    wait_for("the old worker to be gone", lambda: not _group_alive(pgid), 30.0)
    assert orthanc.get("/statistics")["CountInstances"] == 0

    fresh = NodeProcess(spool, port, orthanc.dest, bundle, "--config", config).start()
    nodes.append(fresh)
    sent = wait_for("the resumed series to be sent", lambda: _run_in(spool, "sent"), TIMEOUT_S)
    runs = run_states(spool)
    assert len(runs) == 1 and sent["n_instances"] == 4  # nothing lost, one run
    assert orthanc.get("/statistics")["CountInstances"] == 4  # nothing sent twice
    assert orthanc.get("/statistics")["CountSeries"] == 1
    assert "requeued" in [e["event"] for e in fresh.events()] or sig == signal.SIGTERM


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
