"""Helpers of the node tests: a real Orthanc, a node started as `mar-rt node`, metal series,
and a C-STORE SCU.  Everything on 127.0.0.1 with bounded timeouts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
NODE_AET = "MARNODE"
ORTHANC_AET = "ORTHANC"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


# --- Orthanc ---------------------------------------------------------------------------------
class Orthanc:
    """One Orthanc server with its own config and storage in ``folder``."""

    def __init__(self, folder: Path, node_port: int) -> None:
        self.folder = folder
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen | None = None
        storage = folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "mar-rt-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": ORTHANC_AET,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomModalities": {"marnode": [NODE_AET, "127.0.0.1", node_port]},
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": False,
            "DicomScuTimeout": 20,
        }
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=1))

    @property
    def dest(self) -> str:
        return f"{ORTHANC_AET}@127.0.0.1:{self.dicom_port}"

    def start(self, timeout_s: float = 30.0) -> Orthanc:
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [str(ORTHANC_BIN), str(self.config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()}")
            try:
                return self.get("/system")["DicomAet"] == ORTHANC_AET
            except (OSError, urllib.error.URLError):
                return False

        wait_for("Orthanc's REST API", up, timeout_s, every_s=0.2)
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)
        self.proc = None

    # REST
    def _call(self, method: str, path: str, body: bytes | None, ctype: str) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", ctype)
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def get(self, path: str) -> Any:
        return self._call("GET", path, None, "")

    def post(self, path: str, payload: Any) -> Any:
        if isinstance(payload, (bytes, bytearray)):
            return self._call("POST", path, bytes(payload), "application/dicom")
        return self._call("POST", path, json.dumps(payload).encode(), "application/json")

    def upload(self, files: Sequence[Path]) -> str:
        """POST /instances for each file; returns the Orthanc id of their series."""
        series = {self.post("/instances", Path(f).read_bytes())["ParentSeries"] for f in files}
        assert len(series) == 1, series
        return series.pop()

    def find_series(self, study_uid: str) -> list[dict]:
        return self.post(
            "/tools/find",
            {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        )

    def instance_tags(self, instance_id: str) -> dict:
        return self.get(f"/instances/{instance_id}/tags?simplify")


# --- the node as a process -------------------------------------------------------------------
class NodeProcess:
    """`mar-rt node ...` in its own session (so a kill reaches its worker too)."""

    def __init__(self, spool: Path, port: int, dest: str, bundle: Path, *extra: str) -> None:
        self.spool, self.port = spool, port
        self.args = [
            sys.executable, "-c", "from mar_rt.cli import app; app()", "node",
            "--aet", NODE_AET, "--host", "127.0.0.1", "--port", str(port), "--dest", dest,
            "--spool", str(spool), "--bundle", str(bundle), "--backend", "torch",
            "--device", "cpu", *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.log = spool.parent / f"node-{port}.log"

    def start(self, timeout_s: float = 60.0) -> NodeProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        wait_for("the node's C-ECHO", self._echo_ok, timeout_s, every_s=0.3)
        return self

    def _echo_ok(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the node exited: {self.log.read_text()[-3000:]}")
        return echo("127.0.0.1", self.port, NODE_AET)

    def events(self) -> list[dict]:
        path = self.spool / "logs" / "node.jsonl"
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_event(self, name: str, timeout_s: float) -> dict:
        def find() -> dict | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the node exited: {self.log.read_text()[-3000:]}")
            return next((e for e in self.events() if e.get("event") == name), None)

        return wait_for(f"event {name}", find, timeout_s)

    def signal(self, sig: int, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if sig == signal.SIGKILL:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # never leave a node behind
            self.proc.wait(timeout=timeout_s)
            raise AssertionError(f"the node did not stop within {timeout_s} s on {sig!r}") from None
        finally:
            self.proc = None
        return rc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        self.proc = None


def run_states(spool: Path) -> list[dict]:
    runs = spool / "runs"
    if not runs.is_dir():
        return []
    out = []
    for folder in sorted(runs.iterdir()):
        state = folder / "state.json"
        if not folder.name.startswith(".") and state.is_file():
            try:
                out.append(json.loads(state.read_text(encoding="utf-8")))
            except ValueError:  # being replaced right now: os.replace makes that impossible,
                continue  # but a reader on another FS may still see a partial copy
    return out


# --- DICOM -----------------------------------------------------------------------------------
def echo(host: str, port: int, aet: str, timeout_s: float = 5.0) -> bool:
    from pynetdicom import AE

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.get("Status", -1)) == 0


def add_metal(src: Path, dst: Path, *, radius_px: int = 24, center=(300, 256)) -> None:
    """Copy ``src`` to ``dst`` with a disc of the highest stored value (BitsStored) in the pixel
    data (HU = 4095·slope + intercept, ≈ 3095 HU here); every header attribute is kept."""
    import pydicom

    ds = pydicom.dcmread(src)
    arr = ds.pixel_array.copy()
    rows, cols = np.ogrid[: arr.shape[0], : arr.shape[1]]
    disc = (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius_px**2
    arr[disc] = (1 << int(ds.BitsStored)) - 1
    ds.PixelData = arr.astype(arr.dtype).tobytes()
    ds.save_as(dst, enforce_file_format=True)


def metal_series(source: Path, out: Path, metal_slices: Sequence[int] = (1, 2)) -> list[Path]:
    """The ``.dcm`` files of ``source`` copied to ``out``, with metal in ``metal_slices``."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(source.glob("*.dcm"))
    result = []
    for i, f in enumerate(files):
        dst = out / f.name
        if i in metal_slices:
            add_metal(f, dst)
        else:
            shutil.copyfile(f, dst)
        result.append(dst)
    return result


def store_scu(
    files: Sequence[Path],
    port: int,
    *,
    calling_aet: str = "TESTSCU",
    abort: bool = False,
    contexts: Sequence[str] = ("1.2.840.10008.5.1.4.1.1.2",),
    transfer_syntaxes: Sequence[str] = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"),
    timeout_s: float = 20.0,
) -> list[int]:
    """C-STORE ``files`` to the node over one association; returns the statuses.  With
    ``abort`` the association is aborted instead of released."""
    import pydicom
    from pynetdicom import AE

    ae = AE(ae_title=calling_aet)
    for uid in contexts:
        ae.add_requested_context(uid, list(transfer_syntaxes))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established, "the node did not accept the association"
    statuses = []
    try:
        for f in files:
            status = assoc.send_c_store(pydicom.dcmread(f))
            statuses.append(int(status.get("Status", -1)))
    finally:
        if abort:
            assoc.abort()
        else:
            assoc.release()
    return statuses
