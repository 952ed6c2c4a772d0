"""The Open Inference Protocol (KServe V2) door: REST routes under ``/v2`` and the gRPC
``GRPCInferenceService``, both driving the served models of ``service.core`` through the same entry.

``protocol`` holds the model as the protocol sees it (names, metadata, inputs -> outputs); ``tensors`` the
datatype codecs; ``rest`` and ``grpc_server`` the two transports; ``pb`` the code generated from
``pb/grpc_predict_v2.proto`` (``scripts/gen_protos.sh``).
"""
