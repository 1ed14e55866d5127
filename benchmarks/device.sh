#!/usr/bin/env bash
# One prepared run for a GPU machine: the CUDA correctness checks, then the scale benchmark on the
# device, appended to BENCHMARKS.md. Needs torch (CUDA), numpy, safetensors, grpcio, protobuf (numba
# optional); no vLLM, no network. Finishes within 8 minutes on one H100/H200.
#
#   benchmarks/device.sh                 # cuda, 32 Llama-3-8B layers, appends to BENCHMARKS.md
#   DEVICE=cpu TINY=1 benchmarks/device.sh   # the same script on the CPU at tiny shapes (CI)
#
# Settings: DEVICE (cuda), LAYERS (32; tiny: 1), TINY (unset), PYTHON (.venv/bin/python or python3),
# OUT (BENCHMARKS.md; "-" to print only), BUDGET_S (480: the whole run is cut there).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-}
LAYERS=${LAYERS:-$([ -n "$TINY" ] && echo 1 || echo 32)}
OUT=${OUT:-BENCHMARKS.md}
BUDGET_S=${BUDGET_S:-480}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD:$PWD/clients${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
start=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - start))); }

echo "== device checks on $DEVICE"
timeout "$(left)" "$PYTHON" -m benchmarks.device_checks --device "$DEVICE" --layers "$([ -n "$TINY" ] && echo 1 || echo 2)"

echo "== scale benchmark on $DEVICE, $LAYERS layers${TINY:+ (tiny shapes)}"
args=(--device "$DEVICE" --layers "$LAYERS")
[ -n "$TINY" ] && args+=(--tiny)
[ "$OUT" != "-" ] && args+=(--append "$OUT")
[ "$DEVICE" != cpu ] && args+=(--threads "${THREADS:-8}")
timeout "$(left)" "$PYTHON" -m benchmarks.bench_scale "${args[@]}"
echo "== done in $(($(date +%s) - start)) s"
