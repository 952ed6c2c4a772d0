"""One request path: the same bad requests through every door get the same answer.

HTTP ``/predict``, V2 REST, V2 gRPC and the batch command (in-process) all hand their requests to the core's
one entry (``ServedModel.serve``). A corrupt image, too many images, a missed deadline, a client that
leaves and a full queue must therefore give, at every door, the same error code, the same status (gRPC:
its mapping of it), the same ``effnet_rejected_total`` reason and the same access-log fields (status,
error code, reject reason, which image). The server here is real (uvicorn and grpc.aio on loopback, in a
thread) around a stand-in engine whose gate holds batches on demand.

Not every case exists at every door: the batch command sends one image per request (no "too many") and is
its own client (it cannot leave its own request); HTTP stops parsing a multipart body at the limit, so it
does not know how many images a too-large request held.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import httpx
import pytest

from service.v2.pb import grpc_predict_v2_pb2 as pb
from service.v2.pb import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.helpers.fakes import FakeEngine, fake_model, split_settings
from tests.helpers.images import solid_png
from tests.helpers.server import ThreadedServers, free_port
from tests.helpers.waiting import wait_until

MODEL = "efficientnet-lite0"
CORRUPT = b"\x89PNG\r\n\x1a\n but not really"
GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
              499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE,
              504: grpc.StatusCode.DEADLINE_EXCEEDED}


GOOD = solid_png((0, 0, 255))


class AccessLog(logging.Handler):
    """The access-log lines' fields, as ``service.access`` emits them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append({k: getattr(record, k, None) for k in
                           ("method", "path", "status", "error_code", "reject_reason", "image_index", "images")})

    def last(self, path_part: str) -> dict:
        return [line for line in self.lines if path_part in (line["path"] or "")][-1]


@dataclass
class Server:
    url: str
    grpc_target: str
    engine: FakeEngine
    app: object

    def rejected(self, reason: str) -> float:
        metrics = self.app.state.metrics  # type: ignore[attr-defined]
        return metrics.registry.get_sample_value("effnet_rejected_total", {"reason": reason}) or 0.0


@pytest.fixture()
def access_log() -> Iterator[AccessLog]:
    handler = AccessLog()
    logger = logging.getLogger("service.access")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


SETTINGS = dict(warmup=False, max_batch_size=1, max_batch_delay_ms=0, max_queue=2, max_images_per_request=2,
                request_timeout_s=30)


@pytest.fixture()
def server() -> Iterator[Callable[..., Server]]:
    """Factory: uvicorn + gRPC on loopback around a gated stand-in engine, with SETTINGS and overrides."""
    servers = ThreadedServers()

    def start(**overrides) -> Server:
        from service.core.registry import Startup
        from service.server.app import create_app

        engine = FakeEngine()
        servers.on_close.append(engine.gate.set)
        grpc_port = free_port()
        server_settings, model_settings = split_settings(**{**SETTINGS, **overrides})
        model = fake_model(engine, **model_settings.model_dump(include=model_settings.model_fields_set))
        app = create_app(server_settings, startup=Startup(None, [model]), grpc_address=f"127.0.0.1:{grpc_port}")
        return Server(servers.start(app), f"127.0.0.1:{grpc_port}", engine, app)

    yield start
    servers.close()


# -- the doors: each sends encoded images and answers (status, code or None) -----------------------------------
def http_door(srv: Server, images: list[bytes], timeout: float = 30) -> tuple[int, str | None]:
    files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = httpx.post(f"{srv.url}/predict", files=files, timeout=timeout)
    return response.status_code, response.json()["error"]["code"] if response.status_code != 200 else None


def rest_door(srv: Server, images: list[bytes], timeout: float = 30) -> tuple[int, str | None]:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                        "data": [base64.b64encode(d).decode() for d in images]}]}
    response = httpx.post(f"{srv.url}/v2/models/{MODEL}/infer", json=body, timeout=timeout)
    return response.status_code, None  # the protocol's error body has no code: the access log has it


def _grpc_request(images: list[bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(d)) + d for d in images))
    return request


def grpc_door(srv: Server, images: list[bytes], timeout: float = 30) -> tuple[int, str | None]:
    with grpc.insecure_channel(srv.grpc_target) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_grpc_request(images), timeout=timeout)
        except grpc.RpcError as exc:
            status = {v: k for k, v in GRPC_CODES.items()}[exc.code()]
            return status, None
    return 200, None


DOORS = {"http": (http_door, "/predict"), "v2-rest": (rest_door, "/infer"), "grpc": (grpc_door, "/ModelInfer")}


def _run_cli(images: list[bytes], *, hold: bool = False, **overrides) -> tuple[list, object, FakeEngine]:
    """The batch command's in-process runner on its own service (stand-in engine): one image a request."""
    from service.cli.local import LocalRunner
    from service.core.registry import Startup

    engine = FakeEngine(hold=hold)
    server_settings, model_settings = split_settings(**{**SETTINGS, "warmup": False, **overrides})
    model = fake_model(engine, **model_settings.model_dump(include=model_settings.model_fields_set))
    runner = LocalRunner(server_settings, model_settings, "predict", startup=Startup(None, [model]))

    async def go() -> list:
        await runner.start()
        try:
            tasks = [asyncio.ensure_future(runner.run(f"img{i}.png", d)) for i, d in enumerate(images)]
            if hold:
                await asyncio.sleep(0.5)  # every image admitted or refused while the engine is held
                engine.gate.set()
            return list(await asyncio.gather(*tasks))
        finally:
            engine.gate.set()
            await runner.close()

    return asyncio.run(go()), runner, engine


def _core_fields(line: dict) -> dict:
    return {k: line[k] for k in ("status", "error_code", "reject_reason", "image_index")}


# -- the cases --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("door", DOORS)
def test_a_corrupt_image_is_named_the_same_at_every_door(server, access_log, door):
    srv = server()
    send, path = DOORS[door]
    before = srv.rejected("invalid_image")
    status, code = send(srv, [GOOD, CORRUPT])
    assert status == 400 and code in (None, "invalid_image")
    line = access_log.last(path)
    assert _core_fields(line) == {"status": 400, "error_code": "invalid_image", "reject_reason": "invalid_image",
                                  "image_index": 1}
    assert line["images"] == 2
    assert srv.rejected("invalid_image") == before + 1


def test_a_corrupt_image_in_the_batch_command_gives_the_same_record(access_log):
    results, runner, _ = _run_cli([CORRUPT])
    assert results[0].error["code"] == "invalid_image"
    assert "image 1" not in results[0].error["message"]  # the row names the file itself
    line = access_log.last("img0.png")
    assert line["method"] == "CLI"
    assert _core_fields(line) == {"status": 400, "error_code": "invalid_image", "reject_reason": "invalid_image",
                                  "image_index": 0}
    assert runner.metrics.registry.get_sample_value("effnet_rejected_total", {"reason": "invalid_image"}) == 1


@pytest.mark.parametrize("door", DOORS)
def test_too_many_images_is_413_at_every_door(server, access_log, door):
    srv = server()
    send, path = DOORS[door]
    before = srv.rejected("too_many_images")
    status, code = send(srv, [GOOD] * 3)
    assert status == 413 and code in (None, "too_many_images")
    assert _core_fields(access_log.last(path)) == {"status": 413, "error_code": "too_many_images",
                                                   "reject_reason": "too_many_images", "image_index": None}
    assert srv.rejected("too_many_images") == before + 1
    assert srv.engine.batches == []  # refused before any decoding or inference


@pytest.mark.parametrize("door", DOORS)
def test_a_missed_deadline_is_504_timeout_at_every_door(server, access_log, door):
    srv = server(request_timeout_s=0.5)
    srv.engine.gate.clear()  # the engine holds every batch past the deadline
    send, path = DOORS[door]
    status, code = send(srv, [GOOD])
    assert status == 504 and code in (None, "timeout")
    assert _core_fields(access_log.last(path)) == {"status": 504, "error_code": "timeout",
                                                   "reject_reason": "timeout", "image_index": None}
    assert srv.rejected("timeout") == 1
    assert srv.app.state.models.get().batcher.depth == 0  # nothing of it left in the queue


def test_a_missed_deadline_in_the_batch_command_gives_the_same_record(access_log):
    results, runner, _ = _run_cli([GOOD], hold=True, request_timeout_s=0.2)
    assert results[0].error["code"] == "timeout"
    assert _core_fields(access_log.last("img0.png")) == {"status": 504, "error_code": "timeout",
                                                         "reject_reason": "timeout", "image_index": None}


def _leave_http(srv: Server, path: str) -> None:
    with pytest.raises(httpx.ReadTimeout):
        if path == "/predict":
            http_door(srv, [GOOD], timeout=0.5)
        else:
            rest_door(srv, [GOOD], timeout=0.5)


def _leave_grpc(srv: Server) -> None:
    with grpc.insecure_channel(srv.grpc_target) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(_grpc_request([GOOD]), timeout=30)
        wait_until(lambda: srv.app.state.models.get().batcher.depth == 1, "the gRPC call never reached the queue")
        call.cancel()


@pytest.mark.parametrize("door", DOORS)
def test_a_client_that_leaves_is_499_client_gone_at_every_door(server, access_log, door):
    srv = server()
    srv.engine.gate.clear()
    path = DOORS[door][1]
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(http_door, srv, [GOOD])  # occupies the engine, so the next image waits in the queue
        assert srv.engine.batch_running.wait(10)
        if door == "grpc":
            _leave_grpc(srv)
        else:
            _leave_http(srv, path)
        wait_until(lambda: srv.app.state.models.get().batcher.depth == 0, "the abandoned image still holds its room")
        wait_until(lambda: any(path in (line["path"] or "") and line["status"] == 499 for line in access_log.lines),
              "no access-log line for the request whose client left")
        srv.engine.gate.set()
        assert busy.result(30) == (200, None)
    gone = [line for line in access_log.lines if path in (line["path"] or "") and line["status"] != 200][-1]
    assert _core_fields(gone) == {"status": 499, "error_code": "client_gone", "reject_reason": "client_gone",
                                  "image_index": None}
    assert srv.rejected("client_gone") == 1
    assert len(srv.engine.batches) == 1  # the abandoned image never ran


@pytest.mark.parametrize("door", DOORS)
def test_a_full_queue_is_503_overloaded_at_every_door(server, access_log, door):
    srv = server()
    srv.engine.gate.clear()
    send, path = DOORS[door]
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(http_door, srv, [GOOD])
        assert srv.engine.batch_running.wait(10)
        waiting = pool.submit(http_door, srv, [GOOD, GOOD])  # fills the queue of 2
        wait_until(lambda: srv.app.state.models.get().batcher.depth == 2, "the queue never filled")
        status, code = send(srv, [GOOD])
        srv.engine.gate.set()
        assert running.result(30)[0] == waiting.result(30)[0] == 200
    assert status == 503 and code in (None, "overloaded")
    line = [line for line in access_log.lines if path in (line["path"] or "") and line["status"] != 200][-1]
    assert _core_fields(line) == {"status": 503, "error_code": "overloaded", "reject_reason": "queue_full",
                                  "image_index": None}
    assert srv.rejected("queue_full") == 1


def test_a_full_queue_in_the_batch_command_gives_the_same_record(access_log):
    # All four are sent at once: the first two take the queue's room (2) before any batch starts.
    results, runner, _ = _run_cli([GOOD] * 4, hold=True)
    assert [r.error["code"] if r.error else "ok" for r in results] == ["ok", "ok", "overloaded", "overloaded"]
    line = [line for line in access_log.lines if line["method"] == "CLI" and line["status"] != 200][-1]
    assert _core_fields(line) == {"status": 503, "error_code": "overloaded", "reject_reason": "queue_full",
                                  "image_index": None}
