"""A rolling restart of two replicas behind HAProxy under steady load, with a chosen lame-duck delay.

    python -m benchmarks.rolling_restart --delay 0      # refuse at once on SIGTERM (before the lame duck)
    python -m benchmarks.rolling_restart                # compose's EFFNET_SHUTDOWN_DELAY_S (5 s)

The same set-up as tests/integration/test_rolling_restart.py (Debian's haproxy running
deploy/haproxy/haproxy.cfg, Lite0 replicas with one inference thread each, 6 clients posting a photo back
to back): SIGTERM each replica in turn, start it again, wait until HAProxy has it UP. Prints one JSON line:
requests, status codes (with the service's error codes for non-200s) and HAProxy's retries,
redispatches and 5xx. Run it under ``flock /tmp/bench.lock``.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from collections import Counter

from tests.helpers.balancer import SERVERS, Cluster, Load
from tests.helpers.images import DATA


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=None, help="EFFNET_SHUTDOWN_DELAY_S (default: compose's)")
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args(argv)
    env = {} if args.delay is None else {"EFFNET_SHUTDOWN_DELAY_S": str(args.delay)}
    photo = (DATA / "grace_hopper.jpg").read_bytes()
    cluster = Cluster(env)
    try:
        before = cluster.lb.counters()
        with Load(cluster.lb.url, photo, clients=args.clients, prefix="roll") as load:
            time.sleep(2.0)
            for name in SERVERS:
                old = cluster.replicas[name]
                old.proc.send_signal(signal.SIGTERM)
                old.wait_exit(timeout=60)
                old.stop()
                cluster.replace(name)
            time.sleep(1.0)
        after = cluster.lb.counters()
    finally:
        cluster.close()
    outcomes = load.outcomes
    codes = Counter(f"{o.status} {o.code}" if o.status != 200 else "200" for o in outcomes)
    print(
        json.dumps(
            {
                "delay_s": float(cluster.env["EFFNET_SHUTDOWN_DELAY_S"]),
                "requests": len(outcomes),
                "codes": {k.replace("None None", "connection closed"): v for k, v in codes.items()},
                "haproxy": {key: after[key] - before[key] for key in after},
            }
        )
    )
    return 0 if all(o.status == 200 for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
