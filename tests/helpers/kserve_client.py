"""KServe's own V2 clients against a running server; runs in .venv-kserve (kserve pins its own dependencies),
started by tests/integration/test_v2_kserve_clients.py, never imported by the project.

    python kserve_client.py REST_URL GRPC_ADDRESS MODEL WORKDIR

WORKDIR holds ``images.json`` (file names) beside the photos and ``tensor.npy`` (an FP32 batch). The
script writes ``result.json`` (readiness, top-1 per photo and transport) and ``logits_<transport>.npy``
(the logits of the FP32 batch over REST binary, REST JSON and gRPC).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def image_request(model: str, blobs: list[bytes], *, binary: bool) -> InferRequest:
    tensor = InferInput("image", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=binary)
    return InferRequest(model, [tensor])


def tensor_request(model: str, batch: np.ndarray, *, binary: bool) -> InferRequest:
    tensor = InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return InferRequest(model, [tensor])


def output(response, name: str) -> np.ndarray:
    for out in response.outputs:
        if out.name == name:
            return out.as_numpy()
    raise KeyError(name)


async def main(rest_url: str, grpc_address: str, model: str, workdir: Path) -> None:
    names = json.loads((workdir / "images.json").read_text())
    blobs = [(workdir / name).read_bytes() for name in names]
    batch = np.load(workdir / "tensor.npy")
    result: dict = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=1, timeout=60))
    try:
        result["rest_server_ready"] = await rest.is_server_ready(rest_url)
        result["rest_server_live"] = await rest.is_server_live(rest_url)
        result["rest_model_ready"] = await rest.is_model_ready(rest_url, model)
        response = await rest.infer(rest_url, image_request(model, blobs, binary=True), model_name=model)
        result["rest_top1"] = output(response, "logits").argmax(1).tolist()
        for binary, key in ((True, "rest_binary"), (False, "rest_json")):
            response = await rest.infer(rest_url, tensor_request(model, batch, binary=binary), model_name=model)
            np.save(workdir / f"logits_{key}.npy", output(response, "logits"))
    finally:
        await rest.close()
    grpc_client = InferenceGRPCClient(grpc_address, retries=2, timeout=60)
    try:
        result["grpc_server_ready"] = await grpc_client.is_server_ready()
        result["grpc_server_live"] = await grpc_client.is_server_live()
        result["grpc_model_ready"] = await grpc_client.is_model_ready(model)
        response = await grpc_client.infer(image_request(model, blobs, binary=True))
        result["grpc_top1"] = output(response, "logits").argmax(1).tolist()
        response = await grpc_client.infer(tensor_request(model, batch, binary=True))
        np.save(workdir / "logits_grpc.npy", output(response, "logits"))
    finally:
        await grpc_client.close()
    (workdir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])))
