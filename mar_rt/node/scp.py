"""The storage SCP: accepts CT Image Storage and Verification, and only spools.

The C-STORE handler reads the three UIDs it needs from the data set, writes the encoded
data set (as received, with a P10 header) to the spool and answers at once.  Inference never
runs in an association thread.  Statuses it answers (PS3.4 Annex B.2.3):

    0x0000  stored in the spool
    0xA700  Refused: Out of Resources (spool budget reached or the disk is full)
    0xA900  Error: Data Set does not match SOP Class (Study/Series/SOP Instance UID missing)
    0x0122  Refused: SOP Class not supported (a C-STORE outside CT Image Storage)
    0xC000  Error: Cannot understand (the data set cannot be parsed)

Other SOP classes are refused earlier, during association negotiation (presentation
context result 3, abstract syntax not supported); calling AE titles outside the allow-list
(when one is set) and a called AE title other than ours are rejected (A-ASSOCIATE-RJ).
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from mar_rt.node.completion import CompletionTracker
from mar_rt.node.config import NodeConfig
from mar_rt.node.events import emit
from mar_rt.node.spool import SeriesKey, Spool, SpoolFullError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
UNCOMPRESSED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
)
COMPRESSED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000 Image Compression
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless Image Compression
    "1.2.840.10008.1.2.5",  # RLE Lossless
)


def accepted_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes the SCP offers for CT: both uncompressed ones, and each compressed
    one that pydicom can decode on this machine (a decoder plugin is installed).  A scanner
    then falls back to a syntax the worker can read, instead of sending a series that is
    spooled and only fails when its pixels are decoded."""
    from pydicom.pixels import get_decoder

    usable = [uid for uid in COMPRESSED_TRANSFER_SYNTAXES if get_decoder(uid).is_available]
    return [*UNCOMPRESSED_TRANSFER_SYNTAXES, *usable]


STATUS_OK = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_CANNOT_UNDERSTAND = 0xC000


class StorageSCP:
    """The listening side of the node: spool + completion tracking, no computation."""

    def __init__(self, config: NodeConfig, spool: Spool, tracker: CompletionTracker) -> None:
        self.config = config
        self.spool = spool
        self.tracker = tracker
        self._server: Any = None
        self._lock = threading.Lock()
        self._ids: dict[int, str] = {}  # id(association) → our association id
        self._released: set[str] = set()

    # --- association bookkeeping ---------------------------------------------------------------
    def _assoc_id(self, assoc: Any) -> str:
        with self._lock:
            if id(assoc) not in self._ids:
                self._ids[id(assoc)] = uuid.uuid4().hex[:12]
            return self._ids[id(assoc)]

    def _forget(self, assoc: Any) -> str | None:
        with self._lock:
            return self._ids.pop(id(assoc), None)

    @staticmethod
    def _peer(assoc: Any) -> dict[str, Any]:
        req = assoc.requestor
        return {"calling_ae": str(req.ae_title).strip(), "peer": f"{req.address}:{req.port}"}

    # --- handlers ------------------------------------------------------------------------------
    def handle_store(self, event: Any) -> int:
        """C-STORE: spool the instance, answer at once."""
        assoc_id = self._assoc_id(event.assoc)
        calling_ae = str(event.assoc.requestor.ae_title).strip()

        def refuse(status: int, level: int, **fields: Any) -> int:
            emit(
                "store_refused",
                level=level,
                assoc_id=assoc_id,
                calling_ae=calling_ae,
                status=f"0x{status:04X}",
                **fields,
            )
            return status

        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class != CT_IMAGE_STORAGE:
            return refuse(STATUS_SOP_CLASS_NOT_SUPPORTED, logging.WARNING, sop_class=sop_class)
        try:
            ds = event.dataset
            uids = (ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"))
            sop_uid = str(event.request.AffectedSOPInstanceUID or ds.get("SOPInstanceUID") or "")
        except Exception as exc:  # any parser failure: the peer sent something unreadable
            return refuse(
                STATUS_CANNOT_UNDERSTAND, logging.WARNING, error=f"{type(exc).__name__}: {exc}"
            )
        if not all(uids) or not sop_uid:
            return refuse(
                STATUS_DATASET_MISMATCH,
                logging.WARNING,
                error="Study, Series or SOP Instance UID missing",
            )
        key = SeriesKey(calling_ae, str(uids[0]), str(uids[1]))
        try:
            self.spool.store(key, assoc_id, sop_uid, event.encoded_dataset())
        except SpoolFullError as exc:
            return refuse(STATUS_OUT_OF_RESOURCES, logging.ERROR, error=str(exc))
        except OSError as exc:
            return refuse(
                STATUS_OUT_OF_RESOURCES, logging.ERROR, error=f"spool write failed: {exc}"
            )
        self.tracker.instance(key, assoc_id)
        return STATUS_OK

    def handle_echo(self, event: Any) -> int:
        emit("echo", assoc_id=self._assoc_id(event.assoc), **self._peer(event.assoc))
        return STATUS_OK

    def handle_accepted(self, event: Any) -> None:
        assoc_id = self._assoc_id(event.assoc)
        emit("association_accepted", assoc_id=assoc_id, **self._peer(event.assoc))

    def handle_rejected(self, event: Any) -> None:
        emit("association_rejected", level=logging.WARNING, **self._peer(event.assoc))
        self._forget(event.assoc)

    def handle_released(self, event: Any) -> None:
        assoc_id = self._assoc_id(event.assoc)
        with self._lock:
            self._released.add(assoc_id)
        keys = self.tracker.keys_of(assoc_id)
        for key in keys:  # on disk first: a series must never be taken before its marker
            self.spool.mark_released(key, assoc_id)
        self.tracker.released(assoc_id)
        emit("association_released", assoc_id=assoc_id, series=len(keys), **self._peer(event.assoc))

    def handle_aborted(self, event: Any) -> None:
        self._abort(event.assoc, "association aborted")

    def handle_closed(self, event: Any) -> None:
        """Connection closed: an association neither released nor aborted counts as aborted."""
        assoc_id = self._forget(event.assoc)
        if assoc_id is None:
            return
        with self._lock:
            released = assoc_id in self._released
            self._released.discard(assoc_id)
        if not released:
            self._abort_id(assoc_id, "association aborted (connection closed without release)")

    def _abort(self, assoc: Any, reason: str) -> None:
        with self._lock:
            assoc_id = self._ids.get(id(assoc))
        if assoc_id is not None:
            self._abort_id(assoc_id, reason)

    def _abort_id(self, assoc_id: str, reason: str) -> None:
        keys = self.tracker.aborted(assoc_id)
        for key in keys:
            self.spool.quarantine(key, assoc_id, reason)
        if keys:
            emit(
                "association_aborted",
                level=logging.WARNING,
                assoc_id=assoc_id,
                series=len(keys),
                reason=reason,
            )

    # --- server --------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen on (host, port) in background threads."""
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.config.aet)
        syntaxes = accepted_transfer_syntaxes()
        left_out = sorted(set(COMPRESSED_TRANSFER_SYNTAXES) - set(syntaxes))
        if left_out:  # no decoder plugin here: not offered, so senders fall back
            emit("transfer_syntaxes_not_offered", transfer_syntaxes=left_out)
        ae.add_supported_context(CT_IMAGE_STORAGE, syntaxes)
        ae.add_supported_context(VERIFICATION)
        ae.require_called_aet = True
        if self.config.allow_aets:
            ae.require_calling_aet = list(self.config.allow_aets)
        t = self.config.network_timeout_s
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = t
        handlers = [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self.handle_aborted),
            (evt.EVT_CONN_CLOSE, self.handle_closed),
        ]
        self._server = ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers
        )
        emit(
            "listening",
            aet=self.config.aet,
            host=self.config.host,
            port=self.config.port,
            allow_aets=list(self.config.allow_aets) or None,
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
