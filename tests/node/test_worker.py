"""The worker's per-run decisions, in-process with the micro test bundle: corrected and queued
for sending, skipped without metal, skipped by the loop guard, failed on bad input."""

from __future__ import annotations

import pydicom
import pytest

from mar_rt.node.config import build_config
from mar_rt.node.queue import FAILED, SKIPPED, TO_SEND, RunQueue
from mar_rt.node.spool import SeriesKey, Spool
from mar_rt.node.worker import process_run
from tests.node._dicom_net import metal_series
from tests.runtime._runtime_bundles import micro_bundle


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from mar_rt.runtime.study import open_pipeline

    with open_pipeline(micro_bundle(tmp_path_factory), backend="torch", device="cpu") as p:
        yield p


def _run_of(tmp_path, files, name="s"):
    """A ``ready`` run holding ``files`` (as the SCP + completion would leave it)."""
    spool = Spool(tmp_path / "spool")
    key = SeriesKey("CT1", "1.2", name)
    for i, f in enumerate(files):
        spool.store(key, "a1", f"1.2.{i}", f.read_bytes())
    spool.mark_released(key, "a1")
    queue = RunQueue(spool.root)
    cfg = build_config(None, spool=spool.root, dest="O@127.0.0.1:1")
    return queue.create(spool, key, 0.0, 1.0), queue, cfg


def test_metal_series_is_corrected_and_queued_then_its_output_is_guarded(
    tmp_path, shared_data, pipe
):
    src = metal_series(shared_data / "dicom" / "pancreas_4", tmp_path / "metal")
    run, queue, cfg = _run_of(tmp_path, src)
    done = process_run(run, pipe, queue, cfg)
    assert done.state == TO_SEND and done.n_metal_slices == 2
    assert len(done.derived_files) == 4 and queue.load(run.run_id) == done
    derived = [pydicom.dcmread(queue.folder(done) / rel) for rel in done.derived_files]
    originals = {pydicom.dcmread(f).SOPInstanceUID for f in src}
    for ds in derived:
        assert ds.ImageType[0] == "DERIVED" and ds.SeriesInstanceUID == done.derived_series_uid
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in originals
    assert len(queue.input_files(done)) == 4  # received files stay until the send is acked

    paths = [queue.folder(done) / rel for rel in done.derived_files]
    again, queue2, cfg2 = _run_of(tmp_path / "second", paths, name="derived")
    skipped = process_run(again, pipe, queue2, cfg2)
    assert skipped.state == SKIPPED and skipped.reason.startswith("loop guard")
    assert not (queue2.folder(skipped) / "derived").exists()


def test_series_without_metal_is_skipped_not_sent(tmp_path, shared_data, pipe):
    files = sorted((shared_data / "dicom" / "pancreas_4").glob("*.dcm"))
    run, queue, cfg = _run_of(tmp_path, files)
    done = process_run(run, pipe, queue, cfg)
    assert (done.state, done.reason, done.n_metal_slices) == (SKIPPED, "no metal", 0)
    assert done.derived_files == () and not (queue.folder(done) / "derived").exists()
    assert len(queue.input_files(done)) == 4


def test_unreadable_series_fails_and_is_kept(tmp_path, pipe):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    run, queue, cfg = _run_of(tmp_path, [bad])
    done = process_run(run, pipe, queue, cfg)
    assert done.state == FAILED and done.reason
    assert len(queue.input_files(done)) == 1
