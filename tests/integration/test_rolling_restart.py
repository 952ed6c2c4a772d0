"""Restarts behind a real load balancer: Debian's HAProxy running deploy/haproxy/haproxy.cfg (the file
docker-compose.yml uses) in front of two real replicas (Lite0, one inference thread each) with the
shutdown settings of docker-compose.yml, under steady load from concurrent clients.

- A rolling restart (SIGTERM one replica, start it again, wait until HAProxy has it back, then the other)
  answers every request 200, and HAProxy needed no retry to get there: the lame duck alone does it. The
  same with each replica run as docker-compose.yml runs it, several processes (EFFNET_WORKERS=2: a
  supervisor passing SIGTERM to two front-end workers, each in lame duck then draining, and the engine
  process stopped last).
- SIGKILL of one replica under load: only requests HAProxy had sent to that replica before it noticed
  the death may fail (those in flight, and those sent over a pooled connection the kernel had just
  closed); they are counted, and so are the requests HAProxy redispatched to the other replica.
- SIGTERM while a replica's queue is full: every request the replica admitted is answered 200, nothing
  but 200 and 503 ``overloaded`` (with Retry-After) reaches a client, and the replica exits 0.

Each test prints its figures (``-s`` shows them); ``ROLLING_RESTART_RESULTS=<file>`` also appends them
there as JSON lines (docs/reliability.md quotes three runs).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.helpers.balancer import SERVERS, Cluster, Load, Outcome, compose_workers, haproxy_binary
from tests.helpers.components import missing_component
from tests.helpers.server import ServiceProcess

if haproxy_binary() is None:
    missing_component("haproxy is not installed (Debian package 'haproxy')")

CLIENTS = 6


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    yield cluster
    cluster.close()


@pytest.fixture
def healthy(cluster: Cluster) -> Cluster:
    cluster.heal()
    return cluster


def report(name: str, figures: dict) -> None:
    line = json.dumps({"test": name, **figures})
    print(line)
    target = os.environ.get("ROLLING_RESTART_RESULTS")
    if target:
        with Path(target).open("a") as out:
            out.write(line + "\n")


def codes(outcomes: list[Outcome]) -> dict[str, int]:
    return dict(Counter(str(o.status) if o.status is not None else "transport error" for o in outcomes))


def access_log(replica: ServiceProcess, prefix: str) -> dict[str, int]:
    """Request id -> status for every request of this load the replica answered (its JSON access log)."""
    seen = {}
    for line in replica.logs().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == "service.access" and str(entry.get("request_id", "")).startswith(prefix):
            seen[entry["request_id"]] = entry["status"]
    return seen


def lame_duck_figures(log: str) -> dict[str, int]:
    """What a replica answered after SIGTERM (its "state: lame_duck" line): every /predict 200, and those
    that arrived after the signal (start = end - duration), which a replica refusing at once would have
    answered 503."""
    signalled: datetime | None = None
    answered = arrived = 0
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("message", "").startswith("state: lame_duck"):
            signalled = parse_ts(entry["ts"])
        elif signalled and entry.get("logger") == "service.access" and entry.get("path") == "/predict":
            if entry.get("status") == 200:
                answered += 1
                arrived += parse_ts(entry["ts"]) - timedelta(seconds=entry["duration_s"]) > signalled
    return {"answered_after_sigterm": answered, "arrived_in_lame_duck": arrived}


def parse_ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")


def test_rolling_restart_under_load_answers_every_request_200(healthy, photos):
    """SIGTERM each replica in turn under steady load and start it again: every request is answered 200,
    HAProxy retries and redispatches nothing, each replica leaves HAProxy inside its lame duck, serves what
    still arrives meanwhile, and exits 0 after the delay."""
    rolling_restart(healthy, photos, "rolling_restart")


def test_rolling_restart_of_replicas_with_several_workers_answers_every_request_200(photos):
    """The same with each replica as docker-compose.yml runs it: a supervisor, an engine process and
    EFFNET_WORKERS front-end workers sharing the replica's port. SIGTERM reaches the supervisor only; every
    worker goes into lame duck (readiness 503 on every connection HAProxy checks) and drains, the engine
    process stops after the last of them, and the supervisor exits 0: every request is 200 again."""
    workers = compose_workers()
    assert int(workers) > 1, "docker-compose.yml runs one process per replica: nothing new to test here"
    cluster = Cluster({"EFFNET_WORKERS": workers})
    try:
        restarts = rolling_restart(cluster, photos, "rolling_restart_workers")
    finally:
        cluster.close()
    for restart in restarts:
        assert restart["workers_started"] == int(workers), restart
        assert restart["workers_drained"] == int(workers), restart
        assert restart["unclean"] == [], restart


def rolling_restart(cluster: Cluster, photos, report_as: str) -> list[dict]:
    """SIGTERM each replica of ``cluster`` in turn under steady load, start it again, and check what the
    tests above promise; the figures of each restart are returned (and reported as ``report_as``)."""
    before = cluster.lb.counters()
    restarts = []
    with Load(cluster.lb.url, photos["grace_hopper.jpg"], clients=CLIENTS, prefix="roll") as load:
        time.sleep(2.0)
        for name in SERVERS:
            old = cluster.replicas[name]
            served_before = load.ok_count()
            signalled = time.monotonic()
            old.proc.send_signal(signal.SIGTERM)
            out_s = cluster.lb.wait_state(name, "DOWN", timeout=30)
            exit_code = old.wait_exit(timeout=60)
            exit_s = time.monotonic() - signalled
            stopped = old.stop()
            restart = {
                "replica": name,
                "exit_code": exit_code,
                "out_of_lb_s": round(out_s, 2),
                "exit_s": round(exit_s, 2),
            }
            restart.update(cluster.replace(name))
            restart["total_s"] = round(time.monotonic() - signalled, 2)
            restart.update(lame_duck_figures(stopped.log))
            restart["answered_meanwhile"] = load.ok_count() - served_before
            restart["drain_complete"] = "drain complete" in stopped.log
            restart.update(process_figures(stopped.log))
            restarts.append(restart)
        time.sleep(1.0)
    outcomes = load.outcomes
    after = cluster.lb.counters()
    lb = {key: after[key] - before[key] for key in after}
    report(report_as, {"requests": len(outcomes), "codes": codes(outcomes), "haproxy": lb, "restarts": restarts})

    bad = [o for o in outcomes if o.status != 200]
    assert not bad, (codes(outcomes), bad[:5])
    assert len(outcomes) >= 100, "too little load to prove anything"
    for restart in restarts:
        assert restart["exit_code"] == 0 and restart["drain_complete"], restart
        assert restart["answered_meanwhile"] > 0, "the load stopped during a restart"
        # Out of the balancer well inside the lame duck, and the exit after it (plus the drain).
        assert restart["out_of_lb_s"] < float(cluster.env["EFFNET_SHUTDOWN_DELAY_S"]), restart
        assert restart["exit_s"] >= float(cluster.env["EFFNET_SHUTDOWN_DELAY_S"]), restart
    # The lame duck did its job: requests reached the leaving replicas after SIGTERM and were served...
    assert sum(r["arrived_in_lame_duck"] for r in restarts) > 0, restarts
    # ...and no 200 above needed HAProxy to retry or redispatch anything.
    assert lb["wretr"] == 0 and lb["wredis"] == 0 and lb["hrsp_5xx"] == 0, lb
    return restarts


def process_figures(log: str) -> dict:
    """With EFFNET_WORKERS > 1, from a replica's log: the workers it started, the workers whose drain
    completed, and the supervisor's warnings and errors (a worker that exited other than 0, the engine
    process killed); empty figures for a one-process replica."""
    started = drained = 0
    unclean = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        message = entry.get("message", "")
        if entry.get("logger") == "service.server.supervisor":
            if message.startswith("serving on ") and " with " in message:
                started = int(message.split(" with ")[1].split()[0])
            if entry.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                unclean.append(message)
        elif message == "drain complete":
            drained += 1
    return {"workers_started": started, "workers_drained": drained, "unclean": unclean}


def test_sigkill_under_load_fails_only_requests_sent_to_that_replica_before_haproxy_noticed(healthy, photos):
    """SIGKILL one replica under load: the failures are few (at most one per client), all sent to the dead
    replica before HAProxy marked it down, none a wrong answer; after that every request is 200."""
    cluster = healthy
    name = "effnet-1"
    with Load(cluster.lb.url, photos["grace_hopper.jpg"], clients=CLIENTS, prefix="kill") as load:
        time.sleep(2.0)
        before = cluster.lb.counters()
        victim = cluster.replicas[name]
        victim.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.wait_exit(timeout=10)
        down_s = cluster.lb.wait_state(name, "DOWN", timeout=30)
        time.sleep(2.0)
        after_kill = cluster.lb.counters()
        replaced = cluster.replace(name)
        time.sleep(1.0)
    outcomes = load.outcomes
    lb = {key: after_kill[key] - before[key] for key in before}
    failed = [o for o in outcomes if o.status != 200]
    survivor = access_log(cluster.replicas["effnet-2"], "kill-")
    in_flight = [o for o in outcomes if o.started <= killed <= o.ended]
    report(
        "sigkill",
        {
            "requests": len(outcomes),
            "codes": codes(outcomes),
            "in_flight_at_kill": len(in_flight),
            "failed": len(failed),
            "failed_started_after_kill": sum(o.started > killed for o in failed),
            "failed_codes": codes(failed),
            "out_of_lb_s": round(down_s, 2),
            "haproxy": lb,
            **replaced,
        },
    )

    assert len(outcomes) >= 50
    # Only requests HAProxy sent to the dead replica before it was marked down fail: under way when it
    # died, or sent over a pooled connection the kernel had closed a moment before. Each server
    # connection fails at most one request, so at most one per client. HAProxy cannot replay them (the
    # photo is larger than its buffer): it answers 502, or, for a request on a kept-alive client
    # connection, closes that connection without an answer so that the client may retry (RFC 9112,
    # 9.3.1), as it does when a server closes a kept-alive connection under a request. httpx reports that
    # close as RemoteProtocolError ("disconnected without sending a response") or, when the close meets
    # its read as a reset, as ReadError: both are a connection closed with no answer (CI saw the second).
    closed = ("RemoteProtocolError", "ReadError")
    for outcome in failed:
        assert outcome.started <= killed + down_s, outcome
        assert outcome.request_id not in survivor, outcome
        assert outcome.status in (502, 503, 504) or (outcome.status is None and any(
            kind in (outcome.error or "") for kind in closed)), outcome
    assert len(failed) <= CLIENTS
    # After HAProxy marked the replica down, everything is 200 again.
    assert all(o.status == 200 for o in outcomes if o.started > killed + down_s + 0.1)


def test_sigterm_with_a_full_queue_loses_nothing_admitted(healthy, photos):
    """SIGTERM a replica whose queue is full: everything it admitted is answered 200 to its client, clients
    see only 200 and 503 ``overloaded`` with Retry-After, and it exits 0 with its drain complete."""
    cluster = healthy
    name = "effnet-2"
    replica = cluster.replicas[name]
    max_queue = int(cluster.env["EFFNET_MAX_QUEUE"])
    with Load(cluster.lb.url, photos["grace_hopper.jpg"], clients=4 * max_queue, prefix="full") as load:
        deadline = time.monotonic() + 30
        depth = 0.0
        while depth < max_queue:
            assert time.monotonic() < deadline, f"the queue never filled (depth {depth})"
            depth = queue_depth(replica.url)
            time.sleep(0.005)
        replica.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        exit_code = replica.wait_exit(timeout=60)
        exit_s = time.monotonic() - signalled
        stopped = replica.stop()
        replaced = cluster.replace(name)
    outcomes = load.outcomes
    seen = access_log(replica, "full-")
    by_id = {o.request_id: o for o in outcomes}
    admitted_at_signal = [o for o in outcomes if o.started < signalled < o.ended and seen.get(o.request_id) == 200]
    report(
        "sigterm_full_queue",
        {
            "requests": len(outcomes),
            "codes": codes(outcomes),
            "queue_depth_at_signal": depth,
            "in_flight_on_replica_at_signal": len(admitted_at_signal),
            "answered_by_replica": len(seen),
            "exit_code": exit_code,
            "exit_s": round(exit_s, 2),
            **replaced,
        },
    )

    assert exit_code == 0 and "drain complete" in stopped.log, stopped.log[-2000:]
    # Every answer the replica gave reached its client unchanged: nothing admitted was lost.
    for request_id, status in seen.items():
        assert by_id[request_id].status == status, (request_id, status, by_id[request_id])
    assert len(admitted_at_signal) >= max_queue // 2, "the replica was not busy when the signal came"
    # Clients saw answers only: 200, or 503 overloaded with Retry-After (a full queue, said at once).
    assert {(o.status, o.code) for o in outcomes} <= {(200, None), (503, "overloaded")}, codes(outcomes)
    assert all(o.retry_after for o in outcomes if o.status == 503)


def queue_depth(url: str) -> float:
    """Images admitted and not yet running, over every model (one here)."""
    depths = [float(line.split()[-1]) for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines()
              if line.startswith("effnet_queue_depth{")]
    if not depths:
        raise KeyError("effnet_queue_depth")
    return sum(depths)
