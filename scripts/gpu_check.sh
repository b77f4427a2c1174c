#!/usr/bin/env bash
# The GPU check, in one command for a session that has an NVIDIA GPU:
#     bash scripts/gpu_check.sh OUT_DIR
# Uses the machine's python as it is (PYTHON, default python3: its CUDA torch; no venv, no
# installs). Runs `make test-gpu` (the tests marked cuda) and the one-GPU attention
# benchmark, each under a timeout, and tees every log into OUT_DIR. About 10 minutes at most.
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
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    local note=""
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (timed out)"
    echo "$name: exit $rc$note after $((SECONDS - t0))s" | tee -a "$SUMMARY"
}

step env 60 bash -c "nvidia-smi; $PY -c 'import torch, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version()); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())'; $PY -m pytest --version; $PY -c 'import tqdm, transformers; print(\"tqdm\", tqdm.__version__, \"transformers\", transformers.__version__)'"

if command -v make >/dev/null; then
    step test-gpu 330 make test-gpu PYTHON="$PY"
else  # the same command make would run
    echo "make is not installed: running make test-gpu's command directly" | tee -a "$SUMMARY"
    step test-gpu 330 "$PY" -m pytest -m cuda -q
fi

step bench-attention 200 "$PY" -m ringwise.cli bench attention --device cuda --out "$OUT/bench"

echo "== summary"; cat "$SUMMARY"
