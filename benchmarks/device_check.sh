#!/usr/bin/env bash
# One-shot GPU check of the mar-rt kernels on a lent H100/H200 (see benchmarks/device_check.py).
# Runs with the machine's own python3 (torch, CuPy, nvcc there; no venv, no install):
#
#     bash benchmarks/device_check.sh            # writes $OUT/device_check.{log,json}
#
# OUT defaults to ./device_check_out when unset.  The whole run is capped at 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT"
# Pure-Python packages the GPU image lacks (open_clip_torch, ftfy, wcwidth, pydicom) travel as
# wheels in ./.whl (carry it); install them into a private target when present.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/mar-rt-site .whl/*.whl && export PYTHONPATH="/tmp/mar-rt-site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAR_RT_CACHE="${MAR_RT_CACHE:-/tmp/mar-rt-cache}"
timeout --signal=TERM --kill-after=10 480 python3 benchmarks/device_check.py --out "$OUT" "$@"
status=$?
if [ "$status" -ne 0 ]; then
    echo "device_check.py exited with $status (124: the 8-minute cap)" | tee -a "$OUT/device_check.log"
fi
exit "$status"
