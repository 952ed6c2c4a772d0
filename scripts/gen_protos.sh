#!/usr/bin/env bash
# Regenerate the Python modules of the Open Inference Protocol's gRPC service from its .proto:
#
#   bash scripts/gen_protos.sh            # writes service/v2/pb/grpc_predict_v2_pb2{,_grpc}.py
#   bash scripts/gen_protos.sh --check    # fails if the committed modules differ from a fresh generation
#
# Uses grpcio-tools from the project venv (the dev extra pins it). Its protoc must not be newer than the
# protobuf runtime pinned in constraints.txt: generated code refuses to load on an older runtime.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
PROTO=service/v2/pb/grpc_predict_v2.proto
OUT="$ROOT"
if [[ "${1:-}" == "--check" ]]; then
    OUT="$(mktemp -d)"
    trap 'rm -rf "$OUT"' EXIT
fi
"$PY" -m grpc_tools.protoc -I . --python_out="$OUT" --grpc_python_out="$OUT" "$PROTO"
# The messages go into a descriptor pool of their own, not protobuf's process-wide default: the spec's
# package name "inference" is Triton's too, and in the default pool tritonclient's grpc_service.proto and
# this file could not both be loaded in one process (a "duplicate symbol" TypeError), e.g. a test suite
# that runs tritonclient beside an in-process server.
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile(/' \
    "$OUT/service/v2/pb/grpc_predict_v2_pb2.py"
grep -q '^DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile(' "$OUT/service/v2/pb/grpc_predict_v2_pb2.py"
if [[ "${1:-}" == "--check" ]]; then
    for f in grpc_predict_v2_pb2.py grpc_predict_v2_pb2_grpc.py; do
        if ! diff -q "$OUT/service/v2/pb/$f" "service/v2/pb/$f" >/dev/null; then
            echo "service/v2/pb/$f is not what $PROTO generates: run bash scripts/gen_protos.sh" >&2
            exit 1
        fi
    done
    echo "generated gRPC modules are current"
fi
