"""Fuzzing the HTTP contract: schemathesis generates requests from the service's own OpenAPI
document (valid and invalid query parameters, bodies in every declared media type, other methods, missing
auth) and checks every response against the document: no 5xx, only declared status codes, content types
and headers, bodies matching their schemas, invalid data rejected, the API key not ignored.

In-process (the ASGI app with a stand-in engine): the contract lives in the routes, the error handlers and
the middleware, not in the model, and in-process it runs thousands of requests in seconds.

Examples per operation are fixed (``EXAMPLES``) and derandomised, so CI runs the same cases each time; the
counts run are checked at the end of the module and written in docs/reliability.md.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.parameters import ParameterLocation

from tests.helpers.fakes import FakeEngine, app_with_engine

pytestmark = pytest.mark.slow  # real networks or many generated cases: not in `make test-fast`

EXAMPLES = 150
KEY = "fuzz-key-0123456789"


def stand_in_app(**overrides):
    # Small limits, so generated bodies also reach the 413 paths.
    limits = {"max_body_bytes": 64 * 1024, "max_images_per_request": 4, "max_batch_delay_ms": 0}
    return app_with_engine(FakeEngine(random_outputs=True), warmup=False, **limits, **overrides)


# The service accepts raw bodies in these image types too; schemathesis has no serializer of its own for
# them, so they travel as plain bytes, like application/octet-stream.
schemathesis.serializer.alias(
    ["image/bmp", "image/x-bmp", "image/x-ms-bmp", "image/tiff", "image/pjpeg"], "application/octet-stream"
)
open_schema = schemathesis.openapi.from_asgi("/openapi.json", stand_in_app())
keyed_schema = schemathesis.openapi.from_asgi("/openapi.json", stand_in_app(api_key=KEY))

# positive_data_acceptance expects every request that fits the schema to be accepted (2xx). It cannot hold
# here: the schema can only say "binary" for an image, any bytes fit that, and only real JPEG/PNG/... bytes
# decode; random bytes are rightly a 400 invalid_image. Every other check stays on.
EXCLUDED = [positive_data_acceptance]
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

RUN: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


@open_schema.parametrize()
@FUZZ_SETTINGS
def test_open_service_conforms_to_its_openapi_document(case):
    response = case.call_and_validate(excluded_checks=EXCLUDED)
    RUN[f"open {case.operation.label}"] += 1
    STATUSES[response.status_code] += 1


@keyed_schema.parametrize()
@FUZZ_SETTINGS
def test_service_with_an_api_key_conforms_to_its_openapi_document(case):
    # Cases carry the key, except those generated to break the headers (a missing or malformed
    # Authorization is their point). schemathesis' ignored_auth check also replays cases without the key
    # and with a wrong one, and fails unless those are refused.
    meta = case.meta
    broken_headers = meta is not None and meta.is_negative_at(ParameterLocation.HEADER)
    headers = None if broken_headers else {"Authorization": f"Bearer {KEY}"}
    response = case.call_and_validate(headers=headers, excluded_checks=EXCLUDED)
    RUN[f"keyed {case.operation.label}"] += 1
    STATUSES[response.status_code] += 1


def test_the_fuzzers_ran_their_examples():
    if not RUN:
        pytest.skip("the fuzz tests did not run in this session (deselected)")
    total = sum(RUN.values())
    print(f"\nschemathesis: {total} requests over {len(RUN)} operation runs: {dict(sorted(RUN.items()))}")
    print(f"statuses: {dict(sorted(STATUSES.items()))}")
    for label in ("POST /predict", "POST /features"):
        for kind in ("open", "keyed"):
            assert RUN[f"{kind} {label}"] >= EXAMPLES // 2, (kind, label, RUN)
    assert not [s for s in STATUSES if s >= 500], STATUSES
