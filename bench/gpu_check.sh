#!/usr/bin/env bash
# The GPU check: the default run end to end on one CUDA machine, with GPU utilisation sampled
# every second, at three sizes (bench/scale_run.py):
#   1. 100,000 users x 20,000 items x 3M events (the platform-sized synthetic log);
#   2. an ML-20M-sized log: 137,000 x 20,000 x 10M          (target: <= 60 s, GPU busy >= 50 % in the model stage);
#   3. 1,000,000 x 50,000 x 50M                              (target: <= 8 min end to end).
# Sized for one 8-minute device command. Everything it prints also goes to $OUT/gpu_check.log,
# and bench/scale_run.py's JSON to $OUT/ (RESULTS section "scale_run" in bench/out/).
#
# Usage (from the repository root):
#   bench/gpu_check.sh            # on the GPU machine; installs the wheels in .whl/ first if present
#   GPU_CHECK_DRY=1 bench/gpu_check.sh   # tiny sizes on the CPU: checks the plumbing anywhere
#
# Wheels the GPU machine lacks (hydra-core, omegaconf, antlr4-python3-runtime, faiss-cpu, fastapi, ...)
# go in .whl/ (git-ignored): `make gpu-wheels` downloads them for Python 3.12 / manylinux x86_64.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

if [ "${GPU_CHECK_DRY:-0}" != 1 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" || { echo "wheel install failed" | tee -a "$LOG"; exit 2; }
fi

{
    echo "== machine"; date -u; nproc; free -g | head -2
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'lightning', pl.__version__)"
} 2>&1 | tee -a "$LOG"

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
    SIZES=(--users 2000 3000 --items 500 800 --events 40000 60000)
    EXTRA=(--cpu)
else
    SIZES=(--users 100000 137000 1000000 --items 20000 20000 50000 --events 3000000 10000000 50000000)
    EXTRA=(--gpu-util)
fi
# a stack every 25 s shows where the time goes without changing the code
$PY - "${SIZES[@]}" "${EXTRA[@]}" --scratch 2>&1 <<'EOF' | tee -a "$LOG"
import faulthandler, runpy, sys
faulthandler.dump_traceback_later(25, repeat=True, file=sys.stderr)
sys.argv = ["bench/scale_run.py", *sys.argv[1:]]
runpy.run_path("bench/scale_run.py", run_name="__main__")
EOF
status=${PIPESTATUS[0]}
cp bench/out/*.json "$OUT"/ 2>/dev/null || true
echo "== done (exit $status)" | tee -a "$LOG"
exit "$status"
