#!/usr/bin/env bash
# The GPU check, in one command for a session that has an NVIDIA GPU:
#     bash scripts/gpu_check.sh OUT_DIR
# Uses the machine's python as it is (PYTHON, default python3: its CUDA torch; no venv, no
# installs). Runs `make test-gpu` (the tests marked cuda), the one-GPU attention benchmark,
# the per-rank compute benchmark and a capped max-context search, each under a timeout
# (590 s in all; scale them with LIMIT_PERCENT=60 for a shorter lease), teeing every log into OUT_DIR.
set -u
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME SECONDS CMD...: run under a timeout, log to OUT/NAME.log, note the exit status
    local name=$1 limit=$(( $2 * ${LIMIT_PERCENT:-100} / 100 ))
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    local note=""
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (timed out)"
    echo "$name: exit $rc$note after $((SECONDS - t0))s" | tee -a "$SUMMARY"
}

step env 20 bash -c "nvidia-smi; $PY -c 'import torch, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version()); print(\"gpu:\", \"yes\" if torch.cuda.is_available() else \"no\"); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())'; $PY -m pytest --version; $PY -c 'import tqdm, transformers; print(\"tqdm\", tqdm.__version__, \"transformers\", transformers.__version__)'"
# Without a GPU the benches would only refuse (tests/test_cuda.py checks that they do): say so, and skip them.
gpu_step() {
    if grep -q "^gpu: yes" "$OUT/env.log"; then
        step "$@"
    else
        echo "$1: skipped (torch sees no GPU)" | tee "$OUT/$1.log" | tee -a "$SUMMARY"
    fi
}

if command -v make >/dev/null; then
    step test-gpu 240 make test-gpu PYTHON="$PY"
else  # the same command make would run
    echo "make is not installed: running make test-gpu's command directly" | tee -a "$SUMMARY"
    step test-gpu 240 "$PY" -m pytest -m cuda -q --continue-on-collection-errors --durations=15
fi

gpu_step bench-attention 110 "$PY" -m ringwise.cli bench attention --device cuda --gpu-seq-lens 8192 32768 131072 \
    --out "$OUT/bench"
# Per-rank compute of a W = 2, 4, 8 ring (each rank alone, transfers excluded) vs one process, S = 128K
gpu_step bench-compute 70 "$PY" -m ringwise.cli bench compute --device cuda --out "$OUT/bench"
# Does the ~1B preset train at 256K on this GPU (BPT), and how far do vanilla and SDPA get?
gpu_step bench-context 150 "$PY" -m ringwise.cli bench context --device cuda --gpu-methods bpt memeff vanilla \
    --gpu-granularity 32768 --gpu-max-seq-len 262144 --out "$OUT/bench"

# One bf16 training run of the base preset with layer checkpointing and --save-attention on one GPU
gpu_step train-bf16 60 "$PY" -m ringwise.cli train --device cuda --dtype bf16 --model base --world 1 \
    --seq-len 16384 --batch 1 --steps 12 --warmup 2 --checkpoint-layers --save-attention --eval-lengths 1024 \
    --eval-per-cell 1 --out "$OUT/train"

echo "== summary"; cat "$SUMMARY"
