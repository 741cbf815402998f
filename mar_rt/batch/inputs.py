"""Find the series a batch job will process: folders scanned recursively, or manifest files.

- **Folders.** NIfTI (``.nii``/``.nii.gz``), ``.npy`` and SynDeepLesion ``.h5`` files are one
  series each (``gt.h5``, the target beside the cases, is not).  Every other file is tried as
  DICOM, reading its header only (``stop_before_pixels``), and the CT files are grouped by
  SeriesInstanceUID, across folders.  Hidden files and folders, DICOMDIR, the output folder,
  non-CT objects and series mar-rt derived (so a job never processes its own output) are
  left out and counted.
- **Manifests** (``.csv`` with a header row, or ``.jsonl``): one series per row.  ``path`` is
  required (relative paths are taken from the manifest's folder); ``units``, ``steps``,
  ``seed`` and ``skip_bad`` override the job's options for that row.  A row whose path is
  missing becomes a series with a ``problem``: it is recorded as failed, the job goes on.

A series' ``key`` is its identity in the ledger: ``dicom:<SeriesInstanceUID>`` or
``file:<absolute path>``.  Its ``fingerprint`` (the files' names, sizes and modification
times, plus the options) tells a rerun whether a done series is still done, without reading
the pixels.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mar_rt.errors import BadInputError

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".jsonl")
VOLUME_KINDS = {".npy": "npy", ".nii": "nifti", ".nii.gz": "nifti", ".h5": "h5"}
SKIPPED_SUFFIXES = frozenset(
    {".json", ".jsonl", ".txt", ".md", ".csv", ".log", ".xml", ".html", ".pdf", ".png", ".jpg"}
    | {".jpeg", ".npz", ".gz", ".zip", ".tar", ".py", ".sh", ".safetensors", ".onnx", ".engine"}
)
"""Suffixes never tried as DICOM (``.nii.gz`` is matched before ``.gz``)."""

_OPTION_FIELDS = ("units", "steps", "seed", "skip_bad")


@dataclass(frozen=True)
class SeriesOptions:
    """Per-series options of ``run_study``.

    Attributes:
        units: 'hu' or 'mu', the units of ``.npy`` / NIfTI values; None for DICOM and h5.
        steps: reverse-SDE steps per loop; None means the bundle's.
        seed: noise seed (≥ 0).
        skip_bad: DICOM: leave out unreadable files instead of failing the series.
    """

    units: str | None = None
    steps: int | None = None
    seed: int = 0
    skip_bad: bool = False

    def __post_init__(self) -> None:
        if self.units not in (None, "hu", "mu"):
            raise BadInputError(f"units must be 'hu' or 'mu', got {self.units!r}")
        if self.steps is not None and self.steps < 1:
            raise BadInputError(f"steps must be ≥ 1, got {self.steps}")
        if self.seed < 0:
            raise BadInputError(f"seed must be ≥ 0, got {self.seed}")

    def updated(self, row: dict[str, Any], where: str) -> SeriesOptions:
        """These options with a manifest row's non-empty option fields; errors name ``where``."""
        changes: dict[str, Any] = {}
        try:
            for name in _OPTION_FIELDS:
                value = row.get(name)
                if value is None or (isinstance(value, str) and not value.strip()):
                    continue
                if name == "units":
                    changes[name] = str(value).strip().lower()
                elif name in ("steps", "seed"):
                    changes[name] = int(value)
                else:
                    changes[name] = _as_bool(value)
            return dataclasses.replace(self, **changes)
        except (TypeError, ValueError) as exc:  # BadInputError is a ValueError
            raise BadInputError(f"{where}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Series:
    """One unit of work: one DICOM series, or one volume file.

    Attributes:
        key: identity in the ledger (``dicom:<uid>`` or ``file:<absolute path>``).
        kind: 'dicom' | 'nifti' | 'npy' | 'h5'.
        files: absolute paths; DICOM: the series' files, sorted; otherwise the one file.
        label: a short human name (file name, or DICOM folder and description).
        options: what ``run_study`` is called with.
        problem: set when the series cannot be run at all (a manifest row naming a missing
            file); it is recorded as failed with this reason.
    """

    key: str
    kind: str
    files: tuple[Path, ...]
    label: str
    options: SeriesOptions = field(default_factory=SeriesOptions)
    problem: str | None = None

    @property
    def source(self) -> Path | list[Path]:
        """What ``run_study`` reads: the DICOM file list, or the one file."""
        return list(self.files) if self.kind == "dicom" else self.files[0]

    def fingerprint(self) -> str:
        """sha256 (hex, 16 digits) of each file's path, size and mtime (ns), and the options.

        Cheap (no pixel is read) and changes when a file is replaced or an option changes.
        """
        h = hashlib.sha256()
        for path in self.files:
            try:
                st = path.stat()
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{path}\0missing\n".encode())
        h.update(json.dumps(self.options.to_dict(), sort_keys=True).encode())
        return h.hexdigest()[:16]


@dataclass
class ScanResult:
    """The series found, plus what was left out and why (counts per reason)."""

    series: list[Series]
    ignored: dict[str, int] = field(default_factory=dict)

    def ignore(self, reason: str) -> None:
        self.ignored[reason] = self.ignored.get(reason, 0) + 1


def input_sha256(files: Sequence[Path], chunk: int = 1 << 20) -> str:
    """sha256 (hex) of the files' bytes, in order, each preceded by its name and size."""
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}\0{path.stat().st_size}\n".encode())
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


# --- scanning ---------------------------------------------------------------------------------
def scan_inputs(
    inputs: Iterable[Path | str],
    *,
    options: SeriesOptions | None = None,
    exclude: Path | None = None,
) -> ScanResult:
    """The series of ``inputs`` (folders, files, manifests), in a stable order, no duplicates.

    ``options`` are the job's defaults; ``exclude`` (the output folder) is never scanned.
    Raises BadInputError naming the path when an input does not exist or a manifest is
    malformed; a missing file named *inside* a manifest is a series with a ``problem``.
    """
    options = options or SeriesOptions()
    excluded = exclude.resolve() if exclude is not None else None
    result = ScanResult(series=[])
    dicom_files: list[Path] = []
    for raw in inputs:
        path = Path(raw).resolve()
        if not path.exists():
            raise BadInputError(f"{raw}: no such file or folder")
        if path.is_file() and path.name.lower().endswith(MANIFEST_SUFFIXES):
            result.series.extend(read_manifest(path, options=options))
            continue
        for f in _walk(path, excluded, result):
            kind = _volume_kind(f)
            if kind == "skip":
                result.ignore("not a CT input (suffix)")
            elif kind is not None:
                result.series.append(_file_series(f, kind, options))
            else:
                dicom_files.append(f)
    result.series.extend(_dicom_series(dicom_files, options, result))
    seen: set[str] = set()
    unique = []
    for s in result.series:
        if s.key in seen:
            result.ignore("listed twice")
            continue
        seen.add(s.key)
        unique.append(s)
    result.series = unique
    return result


def _walk(path: Path, excluded: Path | None, result: ScanResult) -> Iterator[Path]:
    """Files under ``path`` (or ``path`` itself), sorted, without hidden names or ``excluded``."""
    if path.is_file():
        yield path
        return
    for root, dirs, files in os.walk(path):
        here = Path(root)
        if excluded is not None and (here == excluded or excluded in here.parents):
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                result.ignore("hidden file or DICOMDIR")
                continue
            yield here / name


def _volume_kind(path: Path) -> str | None:
    """'npy' / 'nifti' / 'h5' for a volume file, 'skip' for a file never read, None: DICOM?"""
    name = path.name.lower()
    if name == "gt.h5":
        return "skip"
    for suffix, kind in VOLUME_KINDS.items():
        if name.endswith(suffix):
            return kind
    return "skip" if path.suffix.lower() in SKIPPED_SUFFIXES else None


def _file_series(path: Path, kind: str, options: SeriesOptions) -> Series:
    return Series(key=f"file:{path}", kind=kind, files=(path,), label=path.name, options=options)


def _header(path: Path) -> Any | None:
    """The file's DICOM header without pixel data, or None when it is not DICOM."""
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # any parser failure: not a DICOM file for our purpose
        return None


def _is_mar_derived(ds: Any) -> bool:
    """True for a series mar-rt wrote (its ContributingEquipment names mar-rt)."""
    try:
        from mar_rt.runtime.io.dicom import is_mar_derived  # type: ignore[attr-defined]
    except ImportError:
        is_mar_derived = None
    if is_mar_derived is not None:
        return bool(is_mar_derived(ds))
    for item in ds.get("ContributingEquipmentSequence", []) or []:
        if str(item.get("Manufacturer", "")).strip().lower() == "mar-rt":
            return True
    return False


def _dicom_series(files: list[Path], options: SeriesOptions, result: ScanResult) -> list[Series]:
    """Group candidate files by SeriesInstanceUID (headers only); one Series per CT series."""
    groups: dict[str, list[Path]] = {}
    first: dict[str, Any] = {}
    for path in files:
        ds = _header(path)
        if ds is None:
            result.ignore("not DICOM")
            continue
        if ds.get("Modality") != "CT":
            result.ignore("DICOM but not CT")
            continue
        if _is_mar_derived(ds):
            result.ignore("a series mar-rt derived")
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        key = f"dicom:{uid}" if uid else f"dicom-folder:{path.parent}"
        groups.setdefault(key, []).append(path)
        first.setdefault(key, ds)
    series = []
    for key, paths in groups.items():
        paths.sort()
        ds = first[key]
        description = str(ds.get("SeriesDescription", "") or "").strip()
        label = paths[0].parent.name + (f" / {description}" if description else "")
        series.append(
            Series(key=key, kind="dicom", files=tuple(paths), label=label, options=options)
        )
    return series


# --- manifests --------------------------------------------------------------------------------
def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y"):
        return True
    if text in ("0", "false", "no", "n", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _manifest_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs of a CSV (header row) or JSONL manifest."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read the manifest ({exc})") from exc
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.name.lower().endswith(".csv"):
        reader = csv.DictReader(text.splitlines())
        for row in reader:
            if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                rows.append((reader.line_num, row))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{path}:{n}: not a JSON object ({exc})") from exc
            if not isinstance(row, dict):
                raise BadInputError(f"{path}:{n}: not a JSON object")
            rows.append((n, row))
    return rows


def read_manifest(path: Path | str, *, options: SeriesOptions | None = None) -> list[Series]:
    """One Series per manifest row (see the module docstring for the columns).

    Raises BadInputError naming the manifest and line for an unknown column, a row without
    ``path``, or an option that does not parse.
    """
    path = Path(path).resolve()
    options = options or SeriesOptions()
    series = []
    for line, row in _manifest_rows(path):
        where = f"{path}:{line}"
        unknown = set(row) - {"path", *_OPTION_FIELDS} - {None}
        if unknown:
            raise BadInputError(
                f"{where}: unknown column(s) {sorted(unknown)}; known: path, "
                + ", ".join(_OPTION_FIELDS)
            )
        raw = str(row.get("path") or "").strip()
        if not raw:
            raise BadInputError(f"{where}: no 'path'")
        target = Path(raw).expanduser()
        target = (target if target.is_absolute() else path.parent / target).resolve()
        row_options = options.updated(row, where)
        series.append(_manifest_series(target, row_options, where))
    return series


def _manifest_series(target: Path, options: SeriesOptions, where: str) -> Series:
    """The series a manifest row names; a missing or unusable target becomes a ``problem``."""
    if not target.exists():
        return Series(
            key=f"file:{target}",
            kind="unknown",
            files=(target,),
            label=target.name,
            options=options,
            problem=f"{where}: {target}: no such file or folder",
        )
    kind = _volume_kind(target) if target.is_file() else None
    if kind not in (None, "skip"):
        return _file_series(target, kind, options)
    files = [target] if target.is_file() else list(_walk(target, None, ScanResult(series=[])))
    found = _dicom_series(
        [f for f in files if _volume_kind(f) is None], options, ScanResult(series=[])
    )
    if len(found) == 1:
        return found[0]
    problem = (
        f"{where}: {target}: no CT DICOM series found"
        if not found
        else f"{where}: {target}: holds {len(found)} DICOM series, a row names one"
    )
    return Series(
        key=f"file:{target}",
        kind="dicom",
        files=(target,),
        label=target.name,
        options=options,
        problem=problem,
    )
