"""Fuzz the server from its own OpenAPI schema (schemathesis): valid and invalid bodies, never a 5xx.

Bounded: a few dozen examples per operation, a small context, so the file runs in well under a minute.
"""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation import GenerationMode
from serve_fixtures import ServerThread, build_codec, build_model

from moecoder.serve.api import create_app
from moecoder.serve.engine import Engine

KEY = "fuzz-key"




@pytest.fixture(scope="module")
def server(tmp_path_factory):
    codec = build_codec(tmp_path_factory.mktemp("tok"))
    # max_queue large enough that fuzzed n x prompts never meets a 429 from its own earlier cases
    engine = Engine(build_model(codec), codec, codec.eos_token_ids, max_batch=8, max_context=48, max_queue=64)
    with ServerThread(create_app(engine, codec, "debug-moe", api_key=KEY)) as srv:
        yield srv


def operations(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    return [r.ok() for r in schema.get_all_operations()]


def check_response(case, response):
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.text}"
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_never_5xx_and_errors_are_openai_shaped(server, mode):
    ops = operations(server)
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    statuses = []
    for op in ops:
        if mode is GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=20, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def fuzz(case):
            # Half the positive cases use the served model id, so generation is reached, not only the 404.
            if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and len(str(case.body)) % 2:
                case.body["model"] = "debug-moe"
            response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            statuses.append(response.status_code)
            check_response(case, response)

        fuzz()
    assert statuses and (200 in statuses) == (mode is GenerationMode.POSITIVE)


def test_server_is_healthy_and_idle_after_fuzzing(server):
    deadline = time.time() + 10
    while sum((health := httpx.get(server.url + "/health").json())[k] for k in ("running", "prefilling", "waiting")):
        assert time.time() < deadline, health
        time.sleep(0.05)
    assert health["status"] == "ok" and health["failed_steps"] == 0
