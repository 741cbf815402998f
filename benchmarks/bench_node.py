"""Benchmark: the MAR node end to end against a real Orthanc, next to a bare ``run_study``.

A 20-slice CT series (``pancreas_4`` repeated 5 times with new Series / SOP Instance UIDs and
positions 3 mm apart; metal discs in 4 slices) is pushed to a running, warm ``mar-rt node`` by
a C-STORE SCU (the "scanner").  The clock starts at the first C-STORE and stops when Orthanc
holds all 20 derived instances.  The node's run record splits the time into

    receive   first → last instance at the node
    quiet     last instance → series ready (the --quiet-seconds rule)
    wait      ready → the worker picks it up (poll)
    compute   run_study in the worker (read, correct, write)
    handoff   computed → the sender starts (poll)
    send      C-STORE SCU to Orthanc, all statuses checked
    overhead  total − compute − quiet  (target ≤ 2 s)

and the same 20 files go through ``run_study`` in this process (pipeline opened first, not
timed: what ``mar-rt run`` does after start-up), once before and once after the node, since
the load of a shared machine drifts.

    python benchmarks/bench_node.py [--bundle PATH] [--quiet-seconds 2] [--json PATH]

Needs /usr/sbin/Orthanc (Debian package orthanc).  Default bundle: the shipped demo bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Orthanc / node helpers of tests/node

from tests.node._dicom_net import (  # noqa: E402
    ORTHANC_BIN,
    NodeProcess,
    Orthanc,
    add_metal,
    free_port,
    run_states,
    store_scu,
    wait_for,
)

SOURCE = ROOT.parent / "shared" / "data" / "dicom" / "pancreas_4"
METAL_SLICES = (3, 8, 13, 18)


def make_series(out: Path, copies: int = 5) -> list[Path]:
    """``copies`` × pancreas_4 as one series of 4·copies slices (new UIDs, stacked along z)."""
    import pydicom
    from pydicom.uid import generate_uid

    src = sorted(SOURCE.glob("*.dcm"))
    series_uid = generate_uid()
    first = pydicom.dcmread(src[0], stop_before_pixels=True)
    last = pydicom.dcmread(src[-1], stop_before_pixels=True)
    step = float(last.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
    spacing = step / (len(src) - 1)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for c in range(copies):
        for i, f in enumerate(src):
            n = c * len(src) + i
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = n + 1
            pos = [float(v) for v in ds.ImagePositionPatient]
            pos[2] = float(first.ImagePositionPatient[2]) + n * spacing
            ds.ImagePositionPatient = pos
            if "SliceLocation" in ds:
                ds.SliceLocation = pos[2]
            path = out / f"IM{n + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            if n in METAL_SLICES:
                add_metal(path, path)
            files.append(path)
    return files


def bench_node(files: list[Path], bundle: Path, quiet_s: float, work: Path) -> dict:
    import pydicom

    port = free_port()
    orthanc = Orthanc(work / "orthanc", node_port=port).start()
    node = NodeProcess(work / "spool", port, orthanc.dest, bundle, "--quiet-seconds", str(quiet_s))
    node.args = [a for a in node.args if a not in ("--backend", "torch", "--device", "cpu")]
    node.args += ["--backend", "auto"]
    try:
        node.start(timeout_s=300)
        ready = node.wait_event("worker_ready", timeout_s=600)
        series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        t0 = time.time()
        statuses = store_scu(files, port, calling_aet="SCANNER")
        t_released = time.time()
        assert statuses == [0] * len(files), statuses

        def stored() -> float | None:
            runs = [r for r in run_states(node.spool) if r["state"] == "sent"]
            if not runs:
                return None
            found = orthanc.post(
                "/tools/find",
                {"Level": "Series", "Query": {"SeriesInstanceUID": runs[0]["derived_series_uid"]}},
            )
            if found and len(orthanc.get(f"/series/{found[0]}")["Instances"]) == len(files):
                return time.time()
            return None

        t_end = wait_for("the derived series in Orthanc", stored, 1800, every_s=0.05)
        run = next(r for r in run_states(node.spool) if r["state"] == "sent")
        assert run["key"]["series_uid"] == series_uid
    finally:
        node.stop()
        orthanc.stop()
    total = t_end - t0
    spans = {
        "receive": run["last_instance"] - t0,
        "release": t_released - run["last_instance"],
        "quiet": run["ready_at"] - run["last_instance"],
        "wait": run["processing_started"] - run["ready_at"],
        "compute": run["processed_at"] - run["processing_started"],
        "handoff": run["send_started"] - run["processed_at"],
        "send": run["sent_at"] - run["send_started"],
        "stored_seen": t_end - run["sent_at"],
    }
    return {
        "total_s": total,
        "spans_s": spans,
        "overhead_s": total - spans["compute"] - spans["quiet"],
        "worker_open_s": ready.get("open_s"),
        "metal_slices": run["n_metal_slices"],
        "compute_timings_s": run["compute_timings_s"],
    }


def bench_bare(files: list[Path], bundle: Path | None, work: Path) -> dict:
    from mar_rt.runtime.study import open_pipeline, run_study

    t0 = time.perf_counter()
    with open_pipeline(bundle, backend="auto") as pipe:
        t_open = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = run_study(files, pipe, work / "bare", preview=False)
        t_run = time.perf_counter() - t1
    return {"open_s": t_open, "run_study_s": t_run, "metal_slices": result.n_metal_slices,
            "timings_s": result.timings_s}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="default: the demo bundle")
    parser.add_argument("--quiet-seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not ORTHANC_BIN.exists():
        raise SystemExit(f"{ORTHANC_BIN} not found (apt-get install orthanc)")
    from mar_rt.runtime.bundle_access import DEMO_BUNDLE

    bundle = args.bundle or DEMO_BUNDLE
    work = Path(tempfile.mkdtemp(prefix="bench-node-"))
    try:
        files = make_series(work / "series")
        before = bench_bare(files, bundle, work / "before")  # bare runs before and after the
        node = bench_node(files, bundle, args.quiet_seconds, work)  # node: load drifts
        after = bench_bare(files, bundle, work / "after")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"20-slice series, metal in {node['metal_slices']} slices, bundle {bundle.name}, "
          f"quiet {args.quiet_seconds} s, load {load:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'span':<14}{'s':>9}")
    for name, value in node["spans_s"].items():
        print(f"{name:<14}{value:>9.2f}")
    print(f"{'total':<14}{node['total_s']:>9.2f}   first C-STORE → 20 derived in Orthanc")
    print(f"{'overhead':<14}{node['overhead_s']:>9.2f}   total − compute − quiet (target ≤ 2)")
    for label, bare in (("bare before", before), ("bare after", after)):
        print(f"{label:<14}{bare['run_study_s']:>9.2f}   run_study, warm pipeline "
              f"(open {bare['open_s']:.1f} s)")  # fmt: skip
    print(f"node worker opened its pipeline in {node['worker_open_s']} s (before the clock)")
    record = {"node": node, "bare_before": before, "bare_after": after,
              "quiet_seconds": args.quiet_seconds,
              "bundle": bundle.name, "host": platform.node(), "cpus": os.cpu_count(),
              "load_1min": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
