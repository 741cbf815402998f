"""`mar-rt batch`: reprocess many series on Ray (an embedded local Ray, or a cluster).

- ``inputs``: find the series (folders scanned recursively, or manifests);
- ``ledger``: ``DIR/ledger.jsonl``, what is done and what failed, so reruns resume;
- ``job``: the Ray Data pipeline, one warm pipeline per worker;
- ``report``: ``DIR/report.json`` and ``DIR/report.png``.

Ray (the ``scale`` extra, ``pip install 'mar-rt[scale]'``) is imported only inside the
functions that run a job, so this package imports without it.
"""

from mar_rt.batch.inputs import ScanResult, Series, SeriesOptions, read_manifest, scan_inputs
from mar_rt.batch.job import BatchConfig, BatchSummary, run_batch
from mar_rt.batch.ledger import Ledger, LedgerError

__all__ = [
    "BatchConfig",
    "BatchSummary",
    "Ledger",
    "LedgerError",
    "ScanResult",
    "Series",
    "SeriesOptions",
    "read_manifest",
    "run_batch",
    "scan_inputs",
]
