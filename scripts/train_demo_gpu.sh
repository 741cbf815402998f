#!/usr/bin/env bash
# Train the demo bundle (tiny configs) on one CUDA GPU within MINUTES of wall time, then score
# it on the validation set it generated. Nothing is downloaded; the repository need not be
# installed (PYTHONPATH is set to it).
#
#   bash scripts/train_demo_gpu.sh DATA_DIR OUT_DIR MINUTES
#
#   DATA_DIR  clean slices: a `mar-rt train export-sources` folder (<slice_id>.npy μ 416² +
#             sources.json) or anything `mar-rt train --data` reads
#   OUT_DIR   gets bundle/ (bundle.json, *.safetensors ≤ 16 MB each, train_report.json),
#             eval.json (input / LI / NMAR / DuDoCROP / ablations on the validation set),
#             train.log and gpu.txt. Pair cache and validation set stay in $WORK.
#   MINUTES   wall-time budget of training (data generation included); each stage saves
#             its weights when it ends, so a timeout still leaves a usable bundle.
#
# Environment: DEVICE (default cuda), PYTHON (default python3), WORK (default a fresh
# /tmp folder), EVAL_MINUTES (default 3; 0 skips the evaluation), CONFIG (default tiny),
# THREADS (torch CPU threads, default 0 = torch's choice; use 1 on a busy CPU).
set -euo pipefail

if [ "$#" -ne 3 ]; then
    echo "usage: bash scripts/train_demo_gpu.sh DATA_DIR OUT_DIR MINUTES" >&2
    exit 2
fi
DATA_DIR=$1
OUT_DIR=$2
MINUTES=$3
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-tiny}
EVAL_MINUTES=${EVAL_MINUTES:-3}
THREADS=${THREADS:-0}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$(mktemp -d /tmp/mar_rt_train.XXXXXX)}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/train.log"
mar_rt() { "$PYTHON" -c 'import sys; from mar_rt.cli import app; sys.argv[0] = "mar-rt"; app()' "$@"; }
stamp() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

stamp "mar-rt demo training: data=$DATA_DIR out=$OUT_DIR minutes=$MINUTES device=$DEVICE work=$WORK"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
} | tee "$OUT_DIR/gpu.txt" | tee -a "$LOG"

stamp "training"
set +e
mar_rt -v train bundle --data "$DATA_DIR" --out "$OUT_DIR/bundle" --work "$WORK" \
    --config "$CONFIG" --device "$DEVICE" --max-minutes "$MINUTES" --threads "$THREADS" --quiet \
    2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
set -e
stamp "training exit status $status"
ls -la "$OUT_DIR/bundle" 2>&1 | tee -a "$LOG" || true

if [ "$EVAL_MINUTES" != "0" ] && [ -f "$OUT_DIR/bundle/bundle.json" ] && [ -d "$WORK/val" ]; then
    stamp "evaluating on $WORK/val (limit $EVAL_MINUTES min)"
    set +e
    [ "$THREADS" != "0" ] && export OMP_NUM_THREADS=$THREADS
    timeout "$((EVAL_MINUTES * 60))" "$PYTHON" -c 'import sys; from mar_rt.cli import app; sys.argv[0] = "mar-rt"; app()' \
        eval "$WORK/val" --bundle "$OUT_DIR/bundle" --backend torch --device "$DEVICE" \
        --ablations --json "$OUT_DIR/eval.json" 2>&1 | tee -a "$LOG"
    stamp "evaluation exit status ${PIPESTATUS[0]}"
    set -e
fi
stamp "done"
exit "$status"
