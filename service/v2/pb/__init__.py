"""Generated from grpc_predict_v2.proto by ``bash scripts/gen_protos.sh`` (grpcio-tools); do not edit."""
