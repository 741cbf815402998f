"""The storage SCP over a real association (pynetdicom SCU → our SCP on 127.0.0.1), without
the worker: spooling, completion, aborted associations, refused SOP classes, a full spool,
the calling-AE allow-list and late instances."""

from __future__ import annotations

import errno
import json
import logging
from types import SimpleNamespace

import pydicom
import pytest

from mar_rt.node import spool as spool_mod
from mar_rt.node.completion import CompletionTracker
from mar_rt.node.config import build_config
from mar_rt.node.queue import READY, RunQueue
from mar_rt.node.scp import STATUS_SOP_CLASS_NOT_SUPPORTED, StorageSCP
from mar_rt.node.spool import SeriesKey, Spool, SpoolFullError, instance_files
from tests.node._dicom_net import NODE_AET, free_port, store_scu, wait_for

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture()
def pancreas(shared_data):
    files = sorted((shared_data / "dicom" / "pancreas_4").glob("*.dcm"))
    assert len(files) == 4
    return files


def _scp(tmp_path, *, max_bytes=None, quiet_s=0.3, **flags):
    cfg = build_config(
        None, spool=tmp_path / "spool", dest="ORTHANC@127.0.0.1:1", aet=NODE_AET,
        host="127.0.0.1", port=free_port(), quiet_seconds=quiet_s, network_timeout_s=10,
        **flags,
    )  # fmt: skip
    spool = Spool(cfg.spool, max_bytes=max_bytes)
    tracker = CompletionTracker(cfg.quiet_seconds)
    scp = StorageSCP(cfg, spool, tracker)
    scp.start()
    return cfg, spool, tracker, scp


@pytest.fixture()
def node_parts(tmp_path):
    parts = _scp(tmp_path)
    yield parts
    parts[3].stop()


def _key(path, calling_ae="TESTSCU"):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return SeriesKey(calling_ae, ds.StudyInstanceUID, ds.SeriesInstanceUID)


def test_released_series_becomes_a_run_with_the_received_bytes(node_parts, pancreas):
    cfg, spool, tracker, _ = node_parts
    assert store_scu(pancreas, cfg.port) == [0, 0, 0, 0]
    ready = wait_for("the series to be ready", tracker.pop_ready, timeout_s=10)
    assert [s.key for s in ready] == [_key(pancreas[0])] and ready[0].n_instances == 4
    queue = RunQueue(cfg.spool)
    run = queue.create(spool, ready[0].key, ready[0].first_instance, ready[0].last_instance)
    assert run is not None and run.state == READY and run.n_instances == 4
    assert list(spool.keys()) == []  # nothing left in incoming
    received = {pydicom.dcmread(p).SOPInstanceUID: p for p in queue.input_files(run)}
    for f in pancreas:  # the data set as sent: same elements, same pixel bytes
        original = pydicom.dcmread(f)
        copy = pydicom.dcmread(received[original.SOPInstanceUID])
        assert copy.PixelData == original.PixelData
        assert copy.SeriesInstanceUID == original.SeriesInstanceUID
        assert copy.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
    assert json.loads((queue.folder(run) / "state.json").read_text())["state"] == "ready"


def test_aborted_association_is_quarantined(node_parts, pancreas):
    cfg, spool, tracker, _ = node_parts
    assert store_scu(pancreas[:2], cfg.port, abort=True) == [0, 0]
    folders = wait_for(
        "the quarantine", lambda: [p for p in spool.quarantine_dir.iterdir()], timeout_s=10
    )
    assert len(folders) == 1 and len(instance_files(folders[0])) == 2
    reason = json.loads((folders[0] / "reason.json").read_text())
    assert reason["reason"].startswith("association aborted") and reason["calling_ae"] == "TESTSCU"
    assert list(spool.keys()) == [] and tracker.pending() == []


def test_non_ct_sop_class_is_refused(node_parts, pancreas):
    from pynetdicom import AE

    cfg = node_parts[0]
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MR_IMAGE_STORAGE)
    ae.add_requested_context(CT_IMAGE_STORAGE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", cfg.port, ae_title=NODE_AET)
    try:
        assert assoc.is_established
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        # PS3.8 9.3.3.2: result 3 = abstract syntax not supported (provider rejection)
        assert rejected == {MR_IMAGE_STORAGE: 0x03} and accepted == {CT_IMAGE_STORAGE}
        mr = pydicom.dcmread(pancreas[0])
        mr.SOPClassUID = MR_IMAGE_STORAGE
        mr.Modality = "MR"
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(mr)
    finally:
        assoc.release()
    # a C-STORE that names another SOP class inside an association gets 0x0122
    event = SimpleNamespace(
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="X", address="a", port=1)),
        request=SimpleNamespace(AffectedSOPClassUID=MR_IMAGE_STORAGE),
    )
    assert node_parts[3].handle_store(event) == STATUS_SOP_CLASS_NOT_SUPPORTED == 0x0122


def test_full_spool_answers_out_of_resources(tmp_path, pancreas):
    size = pancreas[0].stat().st_size  # 526716 bytes
    cfg, spool, tracker, scp = _scp(tmp_path, max_bytes=int(1.5 * size))
    try:
        assert store_scu(pancreas[:3], cfg.port) == [0x0000, 0xA700, 0xA700]
    finally:
        scp.stop()
    n_spooled = sum(len(instance_files(p)) for p in spool.incoming.glob("*/*"))
    assert n_spooled == 1


def test_disk_full_while_writing_is_a_spool_full_error(tmp_path, monkeypatch):
    def no_space(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(spool_mod, "atomic_file", no_space)
    spool = Spool(tmp_path / "spool")
    with pytest.raises(SpoolFullError, match="the disk is full"):
        spool.store(SeriesKey("A", "1", "2"), "a1", "1.2.3", b"x" * 10)


def test_calling_aet_outside_the_allow_list_is_rejected(tmp_path, pancreas):
    from pynetdicom import AE

    cfg, spool, tracker, scp = _scp(tmp_path, allow_aets=["CT1"])
    try:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(CT_IMAGE_STORAGE)
        ae.acse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", cfg.port, ae_title=NODE_AET)
        assert assoc.is_rejected
        assert store_scu(pancreas[:1], cfg.port, calling_aet="CT1") == [0]
    finally:
        scp.stop()


def test_late_instances_start_a_new_logged_run(node_parts, pancreas, caplog):
    cfg, spool, tracker, _ = node_parts
    queue = RunQueue(cfg.spool)
    store_scu(pancreas[:2], cfg.port)
    first = wait_for("the first part", tracker.pop_ready, timeout_s=10)[0]
    run1 = queue.create(spool, first.key, first.first_instance, first.last_instance)
    store_scu(pancreas[2:], cfg.port)
    late = wait_for("the late part", tracker.pop_ready, timeout_s=10)[0]
    with caplog.at_level(logging.INFO, logger="mar_rt.node"):
        run2 = queue.create(spool, late.key, late.first_instance, late.last_instance)
    assert run1.n_instances == 2 and run2.n_instances == 2 and run2.key == run1.key
    assert run2.late_after == (run1.run_id,) and run2.run_id > run1.run_id
    events = [json.loads(r.getMessage()) for r in caplog.records]
    assert any(e["event"] == "late_instances" and e["earlier_runs"] == [run1.run_id]
               for e in events)  # fmt: skip


JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


def _jpeg2000_copy(src, dst):
    """``src`` re-encoded as JPEG 2000 lossless (Pillow's OpenJPEG encoder, one fragment)."""
    import io

    import numpy as np
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(src)
    stored = ds.pixel_array
    assert stored.dtype == np.uint16 and ds.PixelRepresentation == 0
    buf = io.BytesIO()
    image = Image.fromarray(stored)  # uint16 → mode "I;16"
    assert image.mode == "I;16"
    image.save(buf, format="JPEG2000", irreversible=False)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_jpeg2000_arrives_over_the_network_and_decodes_losslessly(node_parts, pancreas, tmp_path):
    """A scanner that sends JPEG 2000 lossless: the SCP accepts it (when a decoder is
    installed), spools the compressed bytes, and the reader recovers the original file's μ
    exactly (lossless: the same stored values, bit for bit)."""
    from PIL import features
    from pydicom.pixels import get_decoder

    from mar_rt.node.scp import accepted_transfer_syntaxes
    from mar_rt.runtime.io.dicom import read_dicom

    if not (features.check("jpg_2000") and get_decoder(JPEG2000_LOSSLESS).is_available):
        pytest.skip("no JPEG 2000 encoder (Pillow + OpenJPEG) or decoder here")
    assert JPEG2000_LOSSLESS in accepted_transfer_syntaxes()
    cfg, spool, tracker, _ = node_parts
    j2k = _jpeg2000_copy(pancreas[0], tmp_path / "j2k.dcm")
    assert store_scu([j2k], cfg.port, transfer_syntaxes=(JPEG2000_LOSSLESS,)) == [0]
    ready = wait_for("the series to be ready", tracker.pop_ready, timeout_s=10)
    run = RunQueue(cfg.spool).create(
        spool, ready[0].key, ready[0].first_instance, ready[0].last_instance
    )
    (received,) = RunQueue(cfg.spool).input_files(run)
    assert pydicom.dcmread(received).file_meta.TransferSyntaxUID == JPEG2000_LOSSLESS
    got, want = read_dicom(received), read_dicom(pancreas[0])
    assert got.images.shape == want.images.shape == (1, 512, 512)
    assert (got.images == want.images).all()


def test_a_syntax_without_a_decoder_here_is_not_offered(node_parts):
    """JPEG-LS is offered only when pydicom has a JPEG-LS decoder on this machine: a sender
    proposing it alone gets the context rejected (PS3.8 result 4, transfer syntaxes not
    supported) and would fall back to an uncompressed syntax."""
    from pydicom.pixels import get_decoder
    from pynetdicom import AE

    cfg = node_parts[0]
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, [JPEG_LS_LOSSLESS])
    ae.add_requested_context(CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", cfg.port, ae_title=NODE_AET)
    try:
        assert assoc.is_established
        accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        rejected = {cx.transfer_syntax[0]: cx.result for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    if get_decoder(JPEG_LS_LOSSLESS).is_available:
        assert accepted == {JPEG_LS_LOSSLESS, "1.2.840.10008.1.2.1"}
    else:
        assert accepted == {"1.2.840.10008.1.2.1"} and rejected == {JPEG_LS_LOSSLESS: 0x04}
