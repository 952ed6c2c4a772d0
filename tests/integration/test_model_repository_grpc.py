"""The model repository extension over gRPC, driven by tritonclient.grpc: the index, unload and load (with
the model's own weights back afterwards), and the refusals a caller can meet: no API key, model control
off, a name the repository does not hold, Triton's config override, a repository other than the server's.

Two servers started side by side: one with EFFNET_MODEL_CONTROL=explicit on a repository of the packaged
Lite0 ("a") and a 10-class Lite0 saved here ("b"); one with control off on a repository of "a" alone.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.helpers.repository import save_fine_tuned_lite0, write_model
from tests.helpers.server import ServiceProcess, free_port

KEY = "repository-key"
AUTH = {"authorization": f"Bearer {KEY}"}
AUTH_METADATA = tuple(AUTH.items())
LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"


def start(repository: Path, control: str) -> ServiceProcess:
    grpc_port = free_port()
    service = ServiceProcess({
        "EFFNET_MODEL_REPOSITORY": str(repository),
        "EFFNET_MODEL_CONTROL": control,
        "EFFNET_API_KEY": KEY,
        "EFFNET_GRPC_PORT": str(grpc_port),
        "EFFNET_BACKEND": "torch",  # the quickest start and reload for Lite0
        "EFFNET_DECODE_THREADS": "1",
    }, threads=1)
    service.grpc_url = f"127.0.0.1:{grpc_port}"
    return service


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(explicit, none): both started before either is awaited, so their model loads overlap."""
    explicit_root = tmp_path_factory.mktemp("explicit")
    write_model(explicit_root, "a", 'variant = "efficientnet-lite0"\n')
    b = write_model(explicit_root, "b", 'variant = "efficientnet-lite0"\nweights = "b.pth"\n')
    save_fine_tuned_lite0(b / "b.pth", seed=7)
    none_root = tmp_path_factory.mktemp("none")
    write_model(none_root, "a", 'variant = "efficientnet-lite0"\n')
    started = [start(explicit_root, "explicit"), start(none_root, "none")]
    try:
        for service in started:
            service.wait_ready()
        yield started
    finally:
        for service in started:
            service.stop()


@pytest.fixture(scope="module")
def client(servers):
    client = tgrpc.InferenceServerClient(servers[0].grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def client_no_control(servers):
    client = tgrpc.InferenceServerClient(servers[1].grpc_url)
    yield client
    client.close()


def states(client: tgrpc.InferenceServerClient, headers=AUTH) -> dict[str, tuple[str, str]]:
    index = client.get_model_repository_index(headers=headers, as_json=True)
    return {m["name"]: (m["state"], m["version"]) for m in index.get("models", [])}


def logits(client: tgrpc.InferenceServerClient, model: str, photo: bytes) -> np.ndarray:
    image = tgrpc.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([photo], dtype=object))
    result = client.infer(model, [image], outputs=[tgrpc.InferRequestedOutput("logits")], headers=AUTH)
    return result.as_numpy("logits")[0]


def refusal(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def requests_total(service: ServiceProcess, endpoint: str, code: str) -> float:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "effnet_requests_total" and s.labels.get("endpoint") == endpoint
               and s.labels.get("code") == code)


def test_unload_then_load_over_grpc(servers, client, photos):
    coffee = photos["coffee.jpg"]
    assert states(client) == {"a": ("READY", "1"), "b": ("READY", "1")}
    before = logits(client, "b", coffee)
    assert before.shape == (10,)

    client.unload_model("b", headers=AUTH)  # tritonclient sends unload_dependents=false
    gone = refusal(logits, client, "b", coffee)
    assert gone.status() == "StatusCode.NOT_FOUND" and "not loaded" in gone.message()
    assert logits(client, "a", coffee).shape == (1000,)  # the other model still serves
    assert states(client)["b"][0] == "UNAVAILABLE"
    assert client.is_server_ready()
    client.unload_model("b", headers=AUTH)  # unloading what is not loaded is a no-op, as over REST

    loaded_before = requests_total(servers[0], LOAD, "200")
    client.load_model("b", headers=AUTH)
    assert client.is_model_ready("b")
    assert states(client) == {"a": ("READY", "1"), "b": ("READY", "1")}
    np.testing.assert_allclose(logits(client, "b", coffee), before, atol=1e-5, rtol=0)  # b.pth again
    assert requests_total(servers[0], LOAD, "200") == loaded_before + 1


def test_the_index_can_list_only_ready_models(servers, client):
    """The request's ``ready`` flag (tritonclient has no argument for it: its stub, by hand)."""
    with grpc.insecure_channel(servers[0].grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        client.unload_model("b", headers=AUTH)
        try:
            every = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), metadata=AUTH_METADATA, timeout=10)
            ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), metadata=AUTH_METADATA,
                                         timeout=10)
        finally:
            client.load_model("b", headers=AUTH)
    assert {(m.name, m.state, m.reason) for m in every.models} == {("a", "READY", ""), ("b", "UNAVAILABLE", "unloaded")}
    assert [m.name for m in ready.models] == ["a"]


def test_refusals_have_the_documented_status(servers, client, client_no_control):
    cases = [
        (client.load_model, ("b",), {}, "UNAUTHENTICATED"),
        (client.load_model, ("b",), {"headers": {"authorization": "Bearer wrong"}}, "UNAUTHENTICATED"),
        (client.unload_model, ("b",), {}, "UNAUTHENTICATED"),
        (client.get_model_repository_index, (), {}, "UNAUTHENTICATED"),
        (client.load_model, ("owls",), {"headers": AUTH}, "NOT_FOUND"),
        (client.unload_model, ("owls",), {"headers": AUTH}, "NOT_FOUND"),
        # Triton's config override (and file: overrides with it): a model loads from its model.toml only.
        (client.load_model, ("b",), {"headers": AUTH, "config": '{"max_batch_size": 2}'}, "INVALID_ARGUMENT"),
        (client.load_model, ("b",), {"headers": AUTH, "config": "{}", "files": {"file:1/model.pt": b"x"}},
         "INVALID_ARGUMENT"),
        (client_no_control.load_model, ("a",), {"headers": AUTH}, "PERMISSION_DENIED"),
        (client_no_control.unload_model, ("a",), {"headers": AUTH}, "PERMISSION_DENIED"),
        (client_no_control.load_model, ("a",), {}, "UNAUTHENTICATED"),  # the key before anything else
    ]
    for call, args, kwargs, code in cases:
        error = refusal(call, *args, **kwargs)
        assert error.status() == f"StatusCode.{code}", (args, kwargs, error.message())
        assert error.message()
    assert "config" in refusal(client.load_model, "b", headers=AUTH, config="{}").message()
    assert "EFFNET_MODEL_CONTROL" in refusal(client_no_control.load_model, "a", headers=AUTH).message()
    # Listing is not control: the server without it still answers the index.
    assert states(client_no_control) == {"a": ("READY", "1")}
    # Nothing refused changed what is served.
    assert states(client) == {"a": ("READY", "1"), "b": ("READY", "1")}


def test_a_named_repository_is_refused(servers):
    """This server has one repository (EFFNET_MODEL_REPOSITORY): a request naming another is refused rather
    than answered from ours, as Triton refuses it."""
    with grpc.insecure_channel(servers[0].grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        calls = [
            (stub.RepositoryIndex, service_pb2.RepositoryIndexRequest(repository_name="other")),
            (stub.RepositoryModelLoad, service_pb2.RepositoryModelLoadRequest(repository_name="other",
                                                                               model_name="b")),
            (stub.RepositoryModelUnload, service_pb2.RepositoryModelUnloadRequest(repository_name="other",
                                                                                   model_name="b")),
        ]
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as info:
                method(request, metadata=AUTH_METADATA, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "one repository" in info.value.details()
