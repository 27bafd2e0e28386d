#!/bin/sh
# GPU tests and kernel benchmarks, on a CUDA machine that already has torch, triton, transformers,
# pluggy, attrs, typer, rich, safetensors and pytest-benchmark. Logs and JSON go to $OUT.
#   sh benchmarks/run_gpu.sh [tests|bench|all] [extra args for decode_kernels.py]
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
what=${1:-all}
[ $# -gt 0 ] && shift
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e kernels -e . -e plugins/kivi -e plugins/headq \
  -e plugins/a2 -e plugins/gsrq -e plugins/baselines >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
status=0
if [ "$what" != bench ]; then
  python3 -m pytest -q -m gpu tests/test_kernels_gpu.py tests/test_runtime_gpu.py tests/test_graphs_gpu.py --maxfail=10 -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -40
  grep -q " failed\| error" "$OUT/tests.log" && status=1
fi
if [ "$what" != tests ]; then
  python3 benchmarks/decode_kernels.py --out "$OUT/kernels.json" "$@" 2>&1 | tee "$OUT/bench.log"
fi
exit $status
