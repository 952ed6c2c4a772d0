#!/usr/bin/env bash
# The device check, for a fresh lent GPU machine (H200: python3 3.12 with torch, torchvision, Pillow, numpy,
# httpx, onnxruntime, prometheus-client and pytest; not the service's web stack; no registry). Prepare
# once where PyPI is reachable: bash benchmarks/gpu_wheels.sh (-> .whl). Then, through the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
# Hard budgets: about 20 s here, then the parts of benchmarks/gpu_check.py (PLAN: 320 s in all, the
# service end to end first): done inside 6 minutes of the machine's time. Writes gpu_check.md,
# gpu_check.json and pytest.log under $OUT, after every part, and whatever stops the run.
#
#   bash benchmarks/gpu_check.sh --rehearse        the whole check on this machine's CPU in a fresh venv
#                                                  holding only the device's packages plus the wheels
#   bash benchmarks/gpu_check.sh --rehearse-quick  the same, the service part only (make test runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

# What the device image is relied on to have (benchmarks/README.md); everything else travels as wheels.
DEVICE_PACKAGES=(torch torchvision pillow numpy httpx onnxruntime prometheus-client pytest)
# The whole run, the machine's start not counted: this script's own steps, then PLAN's parts.
HARD_LIMIT_S=345

rehearse() {
    # The device's Python is 3.12, but the CPU build of torch 2.13.0 that stands in for its CUDA one lies on
    # these machines for the machine's python3 (3.11) only; any other Python would download a multi-GB CUDA
    # build. So the rehearsal runs on python3 (REHEARSAL_PYTHON to choose another), with the wheels fetched
    # for its version: the same names and versions as the device's, another ABI tag.
    local py ver venv wheels key out
    py="${REHEARSAL_PYTHON:-python3}"
    ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || return 3
    [ "$ver" = "3.12" ] || echo "rehearsal: Python $ver here (the device has 3.12); wheels fetched for $ver"
    venv=.venv-rehearsal
    key="$ver ${DEVICE_PACKAGES[*]} $(grep -i -E "^($(IFS='|'; echo "${DEVICE_PACKAGES[*]}" | tr '_-' '..'))==" constraints.txt | tr '\n' ' ')"
    if [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$key" ]; then
        rm -rf "$venv"
        "$py" -m venv "$venv" || return 3
        # CPU builds stand in for the device's CUDA ones: torch first and pinned (the local CPU build, as in
        # the Makefile), so torchvision's "torch==2.13.0" finds it installed.
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0 \
            && "$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt \
                "${DEVICE_PACKAGES[@]}" || return 3
        echo "$key" > "$venv/.stamp"
    fi
    wheels=.whl-py$ver
    PYTHON="$venv/bin/python" PY_VERSION="$ver" WHEEL_DIR="$wheels" bash benchmarks/gpu_wheels.sh \
        >"$venv/wheels.log" 2>&1 || { cat "$venv/wheels.log" >&2; return 3; }
    out="${OUT:-$(mktemp -d -t gpu-rehearsal-XXXX)}"
    echo "rehearsal: $venv (${DEVICE_PACKAGES[*]}) + $wheels; report in $out"
    # Nothing from the caller's environment: no PYTHONPATH, no user site, no EFFNET_* settings.
    env -u PYTHONPATH $(env | sed -n 's/^\(EFFNET_[A-Z0-9_]*\)=.*/-u \1/p') \
        PYTHON="$venv/bin/python" WHEELS="$wheels" SITE="$(mktemp -d -t gpu-rehearsal-site-XXXX)" OUT="$out" \
        PYTHONNOUSERSITE=1 bash benchmarks/gpu_check.sh --rehearsal "$@"
}

case "${1:-}" in
    --rehearse) shift; rehearse "$@"; exit $? ;;
    --rehearse-quick) shift; rehearse --parts service "$@"; exit $? ;;
esac

OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/site}"
started=$(date +%s)

WHEELS="${WHEELS:-.whl}"  # the carried wheels (WHEELS=none where the service's dependencies are installed)
if [ -d "$WHEELS" ]; then
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl || { echo "installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# What the server's processes import at start (the supervisor, a worker, the engine process: SERVER_MODULES in
# benchmarks/gpu_check.py), and the Lite0 weights: a wheel missing from the list fails here, at once.
"$PY" -c "import benchmarks.gpu_check as c, importlib; [importlib.import_module(m) for m in c.SERVER_MODULES]" \
    || { echo "service dependencies missing: add them to benchmarks/gpu_wheels.sh and carry .whl" >&2; exit 3; }

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,utilization.gpu --format=csv
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"

# The parts keep their own hard budgets; this limit only catches a part that ignores them.
left=$(( HARD_LIMIT_S - ($(date +%s) - started) ))
timeout --kill-after=5 "$left" "$PY" -m benchmarks.gpu_check --out "$OUT" "$@"
status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "gpu_check stopped at the $HARD_LIMIT_S s limit; the report holds the parts done by then" >&2
    [ -f "$OUT/gpu_check.json" ] && "$PY" -m benchmarks.gpu_check --out "$OUT" --report-only >/dev/null
fi
echo "gpu_check exit status $status after $(( $(date +%s) - started )) s; report: $OUT/gpu_check.md"
exit $status
