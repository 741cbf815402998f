"""The node's settings: one frozen :class:`NodeConfig`, read from a TOML file and the CLI.

Precedence: defaults < the TOML file (``--config node.toml``) < command-line flags.  The TOML
file uses the field names below at top level, e.g.::

    aet = "MARNODE"
    port = 11112
    dest = "ORTHANC@10.0.0.5:4242"
    spool = "/var/spool/mar-rt"
    quiet_seconds = 10
    allow_aets = ["CT1", "PACS"]
    keep_hours = 24
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mar_rt.errors import MarRtError

_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: ≤ 16 chars, no backslash


class NodeConfigError(MarRtError, ValueError):
    """A node setting is missing or malformed (names the setting and, if any, the file)."""


@dataclass(frozen=True)
class Destination:
    """Where derived series are sent: the called AE title, host and port of the PACS."""

    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@host:port`` (e.g. ``ORTHANC@127.0.0.1:4242``)."""
        m = re.fullmatch(r"(?P<aet>[^@]+)@(?P<host>[^:@]+):(?P<port>\d+)", text.strip())
        if m is None:
            raise NodeConfigError(f"dest: expected AET@host:port, got {text!r}")
        dest = cls(aet=m["aet"].strip(), host=m["host"], port=int(m["port"]))
        _check_aet("dest", dest.aet)
        _check_port("dest", dest.port)
        return dest

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeConfig:
    """Everything the node needs; see ``docs/node.md``.

    Times are in seconds unless the name says hours; sizes in MiB.
    """

    spool: Path
    dest: Destination
    aet: str = "MARNODE"
    host: str = "0.0.0.0"  # listen address
    port: int = 11112
    quiet_seconds: float = 10.0  # a series is ready after this long without a new instance
    allow_aets: tuple[str, ...] = ()  # calling AE titles allowed; empty = anyone
    keep_hours: float = 24.0  # received files are kept this long after the send is acknowledged
    bundle: Path | None = None  # None = the shipped demo bundle
    backend: str = "auto"
    device: str | None = None
    steps: int | None = None  # reverse-SDE steps per loop (None = the bundle's)
    spool_max_mb: float | None = None  # refuse instances (0xA700) beyond this spool size
    min_free_mb: float = 64.0  # refuse instances (0xA700) when the disk has less free space
    retry_base_s: float = 5.0  # first send retry after this long, doubling each failure
    retry_max_s: float = 300.0  # ... up to this long between tries
    network_timeout_s: float = 30.0  # DIMSE / ACSE / network timeouts of the sender and the SCP
    shutdown_grace_s: float = 60.0  # on SIGTERM, wait this long for the current series
    poll_s: float = 0.2  # how often the node checks for series that became ready
    rescan_s: float = 2.0  # worker and sender rescan the queue this often (else woken by events)

    def __post_init__(self) -> None:
        _check_aet("aet", self.aet)
        _check_port("port", self.port)
        for name in ("quiet_seconds", "keep_hours", "retry_base_s", "retry_max_s", "min_free_mb"):
            if getattr(self, name) < 0:
                raise NodeConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if min(self.network_timeout_s, self.poll_s, self.rescan_s) <= 0:
            raise NodeConfigError("network_timeout_s, poll_s and rescan_s must be > 0")
        if self.spool_max_mb is not None and self.spool_max_mb <= 0:
            raise NodeConfigError(f"spool_max_mb must be > 0, got {self.spool_max_mb}")
        if self.steps is not None and self.steps < 1:
            raise NodeConfigError(f"steps must be ≥ 1, got {self.steps}")
        for aet in self.allow_aets:
            _check_aet("allow_aets", aet)


def _check_aet(name: str, aet: str) -> None:
    if not _AET_RE.fullmatch(aet) or not aet.strip():
        raise NodeConfigError(f"{name}: {aet!r} is not a valid AE title (1–16 characters, no \\)")


def _check_port(name: str, port: int) -> None:
    if not 1 <= int(port) <= 65535:
        raise NodeConfigError(f"{name}: port {port} is outside 1–65535")


_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}


def read_toml(path: Path) -> dict[str, Any]:
    """The settings in the TOML file ``path`` (unknown keys are refused, naming the file)."""
    try:
        import tomllib
    except ModuleNotFoundError as exc:  # Python 3.10
        raise NodeConfigError(f"{path}: reading a TOML config needs Python ≥ 3.11") from exc
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise NodeConfigError(f"{path}: cannot read the node config ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise NodeConfigError(f"{path}: not valid TOML ({exc})") from exc
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise NodeConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return data


def build_config(file: Path | None = None, **flags: Any) -> NodeConfig:
    """Defaults < ``file`` (TOML) < ``flags``; flags that are None are not given."""
    values: dict[str, Any] = read_toml(file) if file is not None else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise NodeConfigError(f"unknown setting(s) {', '.join(unknown)}")
    for required in ("spool", "dest"):
        if required not in values:
            raise NodeConfigError(f"{required} is required (--{required} or in the config file)")
    if isinstance(values["dest"], str):
        values["dest"] = Destination.parse(values["dest"])
    for name in ("spool", "bundle"):
        if values.get(name) is not None:
            values[name] = Path(values[name]).expanduser()
    if "allow_aets" in values:
        values["allow_aets"] = tuple(str(a) for a in values["allow_aets"])
    try:
        return NodeConfig(**values)
    except TypeError as exc:  # a wrong type in the TOML file
        raise NodeConfigError(f"node config: {exc}") from exc
