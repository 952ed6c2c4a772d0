#!/usr/bin/env bash
# On a lent GPU machine (its python3 has torch): correctness vs CPU float32 and a throughput table for
# B0, B4 and B7 in one short run (about 2-3 minutes). Writes $OUT/gpu_check.json when $OUT is set.
#   device run: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec python3 -m benchmarks.gpu_check --output "${OUT:-.}/gpu_check.json" "$@"
