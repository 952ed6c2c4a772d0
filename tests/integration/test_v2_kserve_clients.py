"""KServe's own V2 clients (``kserve.InferenceRESTClient`` / ``InferenceGRPCClient``, kserve 0.21) against a
real Lite0 server: readiness, BYTES images (REST binary and gRPC) with /predict's top-1, and FP32 tensors
from a client's own float preprocessing with the eager model's logits on the same tensor (1e-4).

kserve pins many dependencies of its own, so it lives in ``.venv-kserve`` (``make .venv-kserve/.stamp``,
pinned by constraints-kserve.txt) and the client runs there as a subprocess (tests/helpers/kserve_client.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from model import EfficientNet, default_weights_path, get_efficientnet_config
from tests.helpers.components import missing_component
from tests.helpers.images import DATA, PHOTO_NAMES, float_preprocessed
from tests.helpers.server import ServiceProcess, free_port

REPO = Path(__file__).resolve().parents[2]
KSERVE_PYTHON = REPO / ".venv-kserve" / "bin" / "python"
CLIENT = REPO / "tests" / "helpers" / "kserve_client.py"
MODEL = "efficientnet-lite0"

if not KSERVE_PYTHON.exists():
    missing_component("kserve's venv is missing (make .venv-kserve/.stamp)")


@pytest.fixture(scope="module")
def server():
    grpc_port = free_port()
    with ServiceProcess({"EFFNET_MODEL": MODEL, "EFFNET_GRPC_PORT": str(grpc_port)}) as service:
        service.grpc_address = f"127.0.0.1:{grpc_port}"
        yield service


def test_kserve_clients_classify_images_and_float_tensors(server, photos, tmp_path):
    """Readiness over both clients; BYTES images give /predict's top-1 over REST (binary) and gRPC; an FP32
    batch off the 8-bit grid gives the eager model's logits on the same tensor within 1e-4 over REST binary,
    REST JSON and gRPC."""
    spec = get_efficientnet_config(MODEL).preprocess
    batch = np.concatenate([float_preprocessed(photos[n], spec.mean, spec.std) for n in PHOTO_NAMES])
    np.save(tmp_path / "tensor.npy", batch)
    for name in PHOTO_NAMES:
        (tmp_path / name).write_bytes((DATA / name).read_bytes())
    (tmp_path / "images.json").write_text(json.dumps(list(PHOTO_NAMES)))
    run = subprocess.run([str(KSERVE_PYTHON), str(CLIENT), server.url, server.grpc_address, MODEL, str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    for key in ("rest_server_ready", "rest_server_live", "rest_model_ready", "grpc_server_ready", "grpc_server_live",
                "grpc_model_ready"):
        assert result[key] is True, key
    expected_top1 = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for name in PHOTO_NAMES:
            files = {"file": (name, photos[name], "image/jpeg")}
            expected_top1.append(client.post("/predict", params={"top_k": 1}, files=files).json()
                                 ["results"][0]["top_k"][0]["index"])
    assert result["rest_top1"] == expected_top1 and result["grpc_top1"] == expected_top1
    net = EfficientNet.from_pretrained(MODEL, default_weights_path(MODEL)).eval()
    with torch.inference_mode():
        _, logits = net.forward_features_and_logits(torch.from_numpy(batch))
    for transport in ("rest_binary", "rest_json", "grpc"):
        got = np.load(tmp_path / f"logits_{transport}.npy")
        np.testing.assert_allclose(got, logits.numpy(), atol=1e-4, rtol=0, err_msg=transport)
    logs = server.logs()
    assert "Traceback" not in logs, logs[-3000:]
