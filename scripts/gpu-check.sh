#!/usr/bin/env bash
# The prepared GPU check (issue: CUDA paths fast and tested). On a CUDA machine that has torch,
# transformers and the other dependencies installed and no network:
#
#   pip wheel --no-deps --no-build-isolation -w dist .     # beforehand, anywhere
#   bash scripts/gpu-check.sh OUTDIR                       # about 8 minutes on an H200
#
# It installs llmctl from the newest dist/llmctl-*.whl into a scratch directory (no
# dependencies fetched), runs the CUDA tests (`pytest -m cuda`) against that install and the GPU
# benchmarks (benchmarks/gpu.py: train, decode, eval against transformers, LoRA finetuning against PEFT, on the same GPU), and
# leaves OUTDIR/{env.txt,cuda-tests.txt,gpu-report.md,gpu-report.json}. Exit status: the tests'.
# GPU_CHECK_BENCH_ARGS passes options to the benchmark (e.g. "--only decode,eval").
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
wheel=$(ls -t dist/llmctl-*.whl 2>/dev/null | head -1)
if [ -z "$wheel" ]; then
  echo "gpu-check: no dist/llmctl-*.whl; build one first: pip wheel --no-deps --no-build-isolation -w dist ." >&2
  exit 2
fi
site=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --target "$site" "$wheel" || exit 2
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -P -c "import sys, torch, transformers, llmctl; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'llmctl', llmctl.__version__, llmctl.__file__)"
} 2>&1 | tee "$out/env.txt"
# -P: the repo root is not on sys.path, so the installed wheel is what runs
timeout "${GPU_CHECK_TEST_TIMEOUT:-150}" python3 -P -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -rs 2>&1 \
  | tee "$out/cuda-tests.txt"
status=${PIPESTATUS[0]}
timeout "${GPU_CHECK_BENCH_TIMEOUT:-420}" python3 -P benchmarks/gpu.py --out "$out" ${GPU_CHECK_BENCH_ARGS:-} 2>&1 | tail -n 80
exit "$status"
