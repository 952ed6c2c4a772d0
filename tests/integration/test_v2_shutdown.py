"""The gRPC front-end's lifecycle in real server processes. SIGTERM while gRPC clients keep a Lite0 server
busy: it follows the service's shutdown. During the lame duck ``grpc.health.v1`` turns NOT_SERVING at once
while ModelInfer still answers; then new calls get UNAVAILABLE, every call admitted before is answered, and
the process exits 0. And a gRPC port that is taken fails the start in one line.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import grpc
import numpy as np
import tritonclient.grpc as tgrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.helpers.server import ServiceProcess, free_port

MODEL = "efficientnet-lite0"


def test_sigterm_during_grpc_load_answers_every_admitted_call(photos):
    grpc_port = free_port()
    env = {
        "EFFNET_MODEL": MODEL,
        "EFFNET_GRPC_PORT": str(grpc_port),
        "EFFNET_SHUTDOWN_DELAY_S": "1.0",
        "EFFNET_SHUTDOWN_DRAIN_S": "20",
    }
    target = f"127.0.0.1:{grpc_port}"
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    blobs = np.array([photos["coffee.jpg"], photos["chelsea.jpg"]], dtype=object)
    request.inputs.add(name="image", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(tgrpc.serialize_byte_tensor(blobs).item())
    outcomes: list[tuple[float, float, str]] = []  # (started, finished, status code)
    health_seen: list[tuple[float, int]] = []

    with ServiceProcess(env) as server:

        async def load() -> float:
            stop = asyncio.Event()

            async def worker(stub) -> None:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        response = await stub.ModelInfer(request, timeout=30)
                        assert response.outputs[0].name == "logits"
                        code = "OK"
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code().name
                    outcomes.append((started, time.monotonic(), code))
                    if code != "OK":
                        await asyncio.sleep(0.02)

            async def watch_health(channel) -> None:
                health = health_pb2_grpc.HealthStub(channel)
                while not stop.is_set():
                    try:
                        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                        health_seen.append((time.monotonic(), reply.status))
                    except grpc.aio.AioRpcError:
                        pass
                    await asyncio.sleep(0.05)

            async with grpc.aio.insecure_channel(target) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                tasks = [asyncio.ensure_future(worker(stub)) for _ in range(6)]
                tasks.append(asyncio.ensure_future(watch_health(channel)))
                await asyncio.sleep(1.0)
                sigterm_at = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                while server.proc.poll() is None and time.monotonic() - sigterm_at < 40:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                stop.set()
                await asyncio.gather(*tasks)
            return sigterm_at

        sigterm_at = asyncio.run(load())
        stopped = server.stop()

    assert stopped.exit_code == 0, stopped.log[-3000:]
    codes = {code for _, _, code in outcomes}
    assert codes <= {"OK", "UNAVAILABLE", "CANCELLED"}, sorted(codes)
    # A call that reaches the process while its gRPC server closes, after the drain answered everything
    # admitted, can end at the transport (CANCELLED); it was never admitted, so it starts after every
    # answered call has finished.
    last_ok = max(finished for _, finished, code in outcomes if code == "OK")
    cut = [(round(s - sigterm_at, 3), c) for s, _, c in outcomes if c == "CANCELLED" and s < last_ok]
    assert not cut, f"calls cut off while others were still being answered: {cut}"
    in_flight = [code for started, finished, code in outcomes if started < sigterm_at < finished]
    assert in_flight and set(in_flight) == {"OK"}, in_flight  # admitted before SIGTERM: answered
    served_after = [c for started, _, c in outcomes if started > sigterm_at and c == "OK"]
    assert served_after, "nothing was served during the lame duck"
    assert any(c == "UNAVAILABLE" for started, _, c in outcomes if started > sigterm_at), "never refused"
    serving = health_pb2.HealthCheckResponse.SERVING
    assert any(status == serving for t, status in health_seen if t < sigterm_at)
    not_serving_at = [t for t, status in health_seen if t > sigterm_at and status != serving]
    assert not_serving_at and not_serving_at[0] - sigterm_at < 0.5, "health did not turn NOT_SERVING at once"
    ok_after_not_serving = [s for s, _, c in outcomes if c == "OK" and s > not_serving_at[0]]
    assert ok_after_not_serving, "ModelInfer should still answer during the lame duck"


def test_a_taken_grpc_port_fails_the_start_in_one_line():
    """A gRPC port already in use ends the start at once with exit 1 and one clear log line, before the
    model load (no traceback), like any start that cannot succeed."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServiceProcess({"EFFNET_MODEL": MODEL, "EFFNET_GRPC_PORT": str(port)})
        try:
            assert server.wait_exit(60) == 1
            log = server.logs()
        finally:
            server.close()
    assert f"cannot bind the gRPC port 127.0.0.1:{port} (EFFNET_GRPC_PORT)" in log
    assert "Traceback" not in log
