#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) with its output kept: run from anywhere, on the machine with the GPU.
#   benchmarks/gpu_check.sh [--quick]
# Uses the repository's .venv if there is one (install a CUDA build of torch there yourself), else python3.
# The log goes to $OUT/gpu_check.log when OUT is set (the lent-device runner), else ./gpu_check.log.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$root/.venv/bin/python"; [ -x "$py" ] || py="$(command -v python3)"
export MTLBENCH_DATA_DIR="${MTLBENCH_DATA_DIR:-$root/../shared/data}"
log="${OUT:-.}/gpu_check.log"
cd "$root"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda available:', torch.cuda.is_available())"
"$py" benchmarks/gpu_check.py "$@" 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
