"""C-STORE SCU: send one derived series over one association, checking every status.

A series counts as acknowledged only when every instance got a Success (0x0000) or Warning
(0x0001, 0xB000–0xBFFF: stored, with a remark) status.  Anything else — no association, a
rejected presentation context, a failure status, a lost connection — raises
:class:`SendError`, and the queue retries the whole series later (the PACS keeps instances
it already has, keyed by SOP Instance UID).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mar_rt.errors import MarRtError
from mar_rt.node.config import Destination
from mar_rt.node.events import emit

SEND_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # explicit, implicit LE


class SendError(MarRtError):
    """A derived series was not (fully) acknowledged by the destination."""


@dataclass(frozen=True)
class SendReport:
    n_instances: int
    seconds: float
    warnings: tuple[str, ...] = ()


def _is_ok(status: int) -> bool:
    return status == 0x0000 or status == 0x0001 or 0xB000 <= status <= 0xBFFF


def send_series(
    files: Sequence[Path],
    dest: Destination,
    *,
    calling_aet: str,
    timeout_s: float = 30.0,
) -> SendReport:
    """C-STORE ``files`` (CT Image Storage, P10 files) to ``dest`` over one association."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    if not files:
        raise SendError(f"{dest}: nothing to send")
    t0 = time.perf_counter()
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(CTImageStorage, list(SEND_TRANSFER_SYNTAXES))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.aet)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise SendError(f"{dest}: association {why}")
    warnings: list[str] = []
    try:
        for path in files:
            try:
                status = assoc.send_c_store(Path(path))
            except (ValueError, RuntimeError, OSError) as exc:
                raise SendError(f"{dest}: C-STORE of {Path(path).name} failed ({exc})") from exc
            if "Status" not in status:  # empty dataset: timeout, abort or bad response
                raise SendError(f"{dest}: no C-STORE response for {Path(path).name}")
            code = int(status.Status)
            if not _is_ok(code):
                raise SendError(f"{dest}: C-STORE of {Path(path).name} → status 0x{code:04X}")
            if code != 0x0000:
                warnings.append(f"{Path(path).name}: 0x{code:04X}")
        if not assoc.is_established:
            raise SendError(f"{dest}: the association ended before the release")
    finally:
        if assoc.is_established:
            assoc.release()
    if warnings:
        emit("send_warnings", level=logging.WARNING, dest=str(dest), warnings=warnings)
    return SendReport(len(files), time.perf_counter() - t0, tuple(warnings))
