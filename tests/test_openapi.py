"""The admin API's OpenAPI document: valid, complete, and true of the running API.

- valid: `openapi-spec-validator` accepts it;
- complete: its paths and methods are exactly the routes `make_app` serves, so a route added
  without documentation fails here (and a documented route that is not served);
- true: schemathesis derives requests from it (examples, coverage and fuzzing phases, positive
  and negative data, a fixed seed) and sends them to this module's own `switchyard up`, run
  with an admin token. No answer may be a 5xx; every answer must be documented (status,
  content type, body schema); auth must be enforced where the document says so; negative data
  must be refused. `GET /v1/events` (an endless stream) is not fuzzed.

Making the calls count: half the generated model names and versions are ones the stack has
(schemathesis dictionaries), so calls get past 404 to validation, conflicts and the Envoy
push. Fuzzed rollout ids are never real (404), so `test_rollout_commands_conform_to_document`
builds cases from the same document for each command in each phase and puts their answers
(200, 409) through the same checks.

State. The contract says a rejected call changes nothing. The stack is kept still between
calls: a rollout the fuzzer creates is aborted at once, and after every call the test waits
until no active rollout is half-way through a step. Around every call it reads
`GET /v1/models` and `GET /v1/rollouts` before and after: after a 4xx answer (and the extra
probes schemathesis sends with it, which must all be refused too) both must be exactly as
before. Accepted calls are accounted for: a weight change shows exactly the weights sent; a
rollback leaves each model it returns at 100 % on one version without an active rollout.
After every call, whatever its answer: each model's weights are integers from 0 to 100
summing to 100, `stable` is one of its versions, `active_rollout` agrees with
`GET /v1/rollouts?active=true`, no model, version or rollout carries a field the document
does not describe, and a JSON answer is strict JSON (no NaN or Infinity).
"""

from __future__ import annotations

import copy
import json
import urllib.request
from collections import Counter

import pytest
import schemathesis
from openapi_spec_validator import validate
from schemathesis import CheckFunction

from controlplane.admin.app import make_app
from controlplane.admin.openapi import openapi_document
from controlplane.config import parse_config
from controlplane.controller import Controller
from controlplane.rollout.engine import TRANSITIONS, RolloutEngine
from tests.conftest import (
    Running,
    http_json,
    switchyard,
    two_version_models,
    wait_for_proxy,
    wait_until,
)

TOKEN = "openapi-fuzz-token"
MODELS = two_version_models()
MODEL_NAMES = [model["name"] for model in MODELS]
VERSION_NAMES = sorted({v["name"] for model in MODELS for v in model["versions"]})
OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
NOT_FUZZED = {
    "/v1/events": "an endless Server-Sent Events stream",
    # Every accepted call starts backend processes; tests/test_runtime.py covers these calls
    # (accepted and refused) one by one.
    "/v1/models/{model}/versions": "starts a backend process per accepted call",
}
NOT_FUZZED_OPERATIONS = {("POST", "/v1/models"): "starts backend processes per accepted call"}
# Bugs outside openapi.py the fuzzing finds (each gets a regression test at the end): the
# one check such a bug trips is skipped for that operation only; all other checks still run.
KNOWN_BUGS: dict[str, tuple[CheckFunction, str]] = {}
OUTCOMES: Counter[tuple[str, int]] = Counter()
FRAMING = {"content-length", "transfer-encoding", "host", "connection"}


CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20240501,
        "generation": {"mode": "all", "max-examples": 30, "deterministic": True},
        "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
        # Half the generated names are ones the stack has, so calls get past 404.
        "dictionaries": {"models": {"values": MODEL_NAMES}, "versions": {"values": VERSION_NAMES}},
        "parameters": {
            "path.model": {"dictionary": "models", "probability": 0.5},
            "body.model": {"dictionary": "models", "probability": 0.5},
            "body.to": {"dictionary": "versions", "probability": 0.5},
            "body.from": {"dictionary": "versions", "probability": 0.5},
        },
        "checks": {
            # Schema-valid bodies can still get 422 for what JSON Schema cannot say: weights
            # that do not sum to 100, a version the model lacks, `to` equal to `from`.
            # Any other refusal of positive data stays a failure.
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "401", "403", "404", "409", "422"]
            },
        },
        "request-timeout": 30,
    }
)
FULL_SCHEMA = schemathesis.openapi.from_dict(copy.deepcopy(openapi_document()), config=CONFIG)
schema = FULL_SCHEMA
for _path in NOT_FUZZED:
    schema = schema.exclude(path=_path)
for _method, _path in NOT_FUZZED_OPERATIONS:
    schema = schema.exclude(method=_method, path=_path)


# -- the document itself -------------------------------------------------------------------


def test_document_is_valid_openapi():
    validate(copy.deepcopy(openapi_document()))


def test_document_is_built_once():
    assert openapi_document() is openapi_document()


def _served_routes(tmp_path) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route `make_app` adds, without aiohttp's implicit HEADs."""
    controller = Controller(parse_config({"models": MODELS}), tmp_path / "state")
    try:
        app = make_app(controller, RolloutEngine(controller), token=TOKEN)
        routes = {(route.method, route.resource.canonical) for route in app.router.routes()}
    finally:
        controller.store.close()
    gets = {path for method, path in routes if method == "GET"}
    return {
        (method, path)
        for method, path in routes
        if not (method == "HEAD" and path in gets) and not path.startswith("/ui")  # the console
    }


def _documented_routes() -> set[tuple[str, str]]:
    methods = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
    return {
        (method.upper(), path)
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method in methods
    }


def test_every_served_route_is_documented_and_nothing_else(tmp_path):
    served, documented = _served_routes(tmp_path), _documented_routes()
    assert not served - documented, "routes served but not in the OpenAPI document"
    assert not documented - served, "routes documented but not served"


def test_operations_declare_auth_as_served():
    document = openapi_document()
    assert document["security"] == [{"bearer": []}]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if path in OPEN_PATHS:
                assert operation.get("security") == [], (method, path)
            else:
                assert "security" not in operation, (method, path)
                assert "401" in operation["responses"], (method, path)


# -- against a running stack ---------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Running:
    directory = tmp_path_factory.mktemp("openapi")
    env = {"SWITCHYARD_ADMIN_TOKEN": TOKEN}
    with switchyard("up", directory, MODELS, env=env) as running:
        wait_for_proxy(running.proxy)
        yield running


def _get(api: Running, path: str):
    status, answer = api.api("GET", path)
    assert status == 200, (path, status, answer)
    return answer


def test_served_document_is_the_built_one(api):
    status, served = http_json("GET", api.admin + "/openapi.json")
    assert status == 200
    assert served == openapi_document()


def _snapshot(api: Running) -> tuple[dict, dict]:
    return _get(api, "/v1/models"), _get(api, "/v1/rollouts")


def _still(api: Running) -> bool:
    """No rollout half-way through a step: every active one sits at a gate, fully recorded."""
    active = _get(api, "/v1/rollouts?active=true")["rollouts"]
    return all(r["phase"] == "paused" and r["history"][-1]["phase"] == "paused" for r in active)


def _wait_still(api: Running) -> None:
    wait_until(lambda: _still(api), timeout=15, message="active rollouts to reach a gate")


def _undocumented(document: dict, schema_name: str) -> set[str]:
    """Keys of `document` the named component schema has no property for."""
    schemas = openapi_document()["components"]["schemas"]
    return set(document) - set(schemas[schema_name]["properties"])


def _check_invariants(api: Running) -> list[dict]:
    models = _get(api, "/v1/models")["models"]
    rollouts = _get(api, "/v1/rollouts")["rollouts"]
    active = _get(api, "/v1/rollouts?active=true")["rollouts"]
    # Response schemas allow extra keys; this catches a field added without documentation.
    for model in models:
        assert not _undocumented(model, "Model"), _undocumented(model, "Model")
        for version in model["versions"]:
            assert not _undocumented(version, "Version"), _undocumented(version, "Version")
    for rollout in rollouts:
        assert not _undocumented(rollout, "Rollout"), _undocumented(rollout, "Rollout")
    active_by_model = {rollout["model"]: rollout["id"] for rollout in active}
    assert len(active_by_model) == len(active), f"two active rollouts on one model: {active}"
    for model in models:
        weights = {version["name"]: version["weight"] for version in model["versions"]}
        assert all(isinstance(w, int) and 0 <= w <= 100 for w in weights.values()), model
        assert sum(weights.values()) == 100, model
        assert model["stable"] in weights, model
        assert model["active_rollout"] == active_by_model.get(model["name"]), (model, active)
    return models


def _account_for_accepted(case, response, models: list[dict]) -> None:
    """What an accepted call did is what it was asked to do."""
    by_name = {model["name"]: model for model in models}
    label = case.operation.label
    if label == "PUT /v1/models/{model}/weights":
        asked = case.body["weights"]
        model = by_name[case.path_parameters["model"]]
        now = {version["name"]: version["weight"] for version in model["versions"]}
        assert now == {name: asked.get(name, 0) for name in now}, (asked, model)
    elif label == "POST /v1/rollback":
        for returned in response.json()["models"]:
            model = by_name[returned["name"]]
            weights = sorted(version["weight"] for version in model["versions"])
            assert weights[-1] == 100 and model["active_rollout"] is None, model


def _no_constant(name: str):
    raise AssertionError(f"answer is not JSON (RFC 8259): it contains {name}")


def _strict_json(text: str):
    """Python's json reads NaN and Infinity; JSON clients in other languages do not."""
    return json.loads(text, parse_constant=_no_constant)


def _run(api: Running, case, abort_created: bool = True):
    """Send `case`, check the answer against the document and the state around it."""
    # A request that lies about its framing (`content-length: else`) is refused by aiohttp's
    # HTTP parser with a plain-text 400 before any handler runs: not the API's behaviour.
    if case.headers:
        case.headers = {k: v for k, v in case.headers.items() if k.lower() not in FRAMING}
    before = _snapshot(api)
    response = case.call(base_url=api.admin)
    OUTCOMES[(case.operation.label, response.status_code)] += 1
    try:
        known = KNOWN_BUGS.get(case.operation.label)
        case.validate_response(response, excluded_checks=[known[0]] if known else None)
        if response.headers.get("Content-Type", "").startswith("application/json"):
            _strict_json(response.text)
    finally:
        created = case.operation.label == "POST /v1/rollouts" and response.status_code == 201
        if created and abort_created:
            status, body = api.api("POST", f"/v1/rollouts/{response.json()['id']}/abort")
            # 409: it already ended on its own (an immediate rollout can succeed that fast).
            assert status in (200, 409), (status, body)
        _wait_still(api)
        models = _check_invariants(api)
        if 400 <= response.status_code < 500:
            assert _snapshot(api) == before, (
                f"rejected call changed the state: {case.as_curl_command()} -> "
                f"{response.status_code} {response.text[:300]}"
            )
        elif response.status_code < 300:
            _account_for_accepted(case, response, models)
    return response


@schema.parametrize()
def test_api_conforms_to_document(case, api):
    _run(api, case)


def _case(method: str, path: str, body=None, token: str | None = TOKEN, **path_parameters):
    operation = FULL_SCHEMA[path][method]
    kwargs = {} if body is None else {"body": body, "media_type": "application/json"}
    return operation.Case(
        path_parameters=path_parameters or None,
        headers={"Authorization": f"Bearer {token}"} if token else None,
        **kwargs,
    )


def test_events_answer_as_documented(api):
    """Not fuzzed (it never ends): a 401 without the token, else a text/event-stream."""
    assert _run(api, _case("GET", "/v1/events", token=None)).status_code == 401
    request = urllib.request.Request(
        api.admin + "/v1/events", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")


def _command(api: Running, action: str, rollout_id: str, expect: int) -> dict:
    response = _run(api, _case("POST", f"/v1/rollouts/{{id}}/{action}", id=rollout_id))
    assert response.status_code == expect, (action, response.status_code, response.text)
    return response.json()


def _start(api: Running, spec: dict, expect: int = 201) -> dict:
    body = {"model": "llama-3-8b", **spec}
    response = _run(api, _case("POST", "/v1/rollouts", body), abort_created=False)
    assert response.status_code == expect, (spec, response.status_code, response.text)
    return response.json()


def test_rollout_commands_conform_to_document(api):
    """Fuzzed rollout ids are unknown (404): here each command meets each phase, and every
    answer (200, 409) is checked against the document like the fuzzed ones."""
    gate = {"pause": {}}
    rollback = _case("POST", "/v1/rollback", {"model": "llama-3-8b", "to": "v1"})
    assert _run(api, rollback).status_code == 200

    rollout = _start(api, {"to": "v2", "steps": [gate, {"set_weight": 20}, gate]})
    rid = rollout["id"]
    assert _run(api, _case("GET", "/v1/rollouts/{id}", id=rid)).status_code == 200
    busy = _case("PUT", "/v1/models/{model}/weights", {"weights": {"v1": 100}}, model="llama-3-8b")
    assert _run(api, busy).status_code == 409
    assert _start(api, {"to": "v2", "strategy": "immediate"}, expect=409)["error"]["field"]
    assert _command(api, "pause", rid, 200)["phase"] == "paused"  # a repeat: no-op
    assert _command(api, "resume", rid, 200)["phase"] in ("progressing", "paused")
    _wait_still(api)
    assert _get(api, f"/v1/rollouts/{rid}")["step_index"] == 2
    assert _command(api, "promote", rid, 200)["phase"] == "succeeded"
    for action in TRANSITIONS:
        _command(api, action, rid, 409)

    rid = _start(api, {"to": "v1", "steps": [gate, {"set_weight": 100}]})["id"]
    assert _command(api, "abort", rid, 200)["phase"] == "aborted"
    assert _command(api, "abort", rid, 200)["phase"] == "aborted"  # a repeat: no-op
    for action in ("pause", "resume", "promote"):
        _command(api, action, rid, 409)

    rid = _start(api, {"to": "v1", "steps": [gate, {"set_weight": 100}]})["id"]
    everything = _run(api, _case("POST", "/v1/rollback", {"all": True}))
    assert everything.status_code == 200
    assert _get(api, f"/v1/rollouts/{rid}")["phase"] == "aborted"


def test_stack_still_serves_after_fuzzing(api):
    """Whatever the fuzzing left: valid models, consistent rollouts, and a routing proxy."""
    _check_invariants(api)
    for name in MODEL_NAMES:
        wait_for_proxy(api.proxy, name)
    envoys = wait_until(lambda: _get(api, "/v1/envoys")["envoys"], message="a connected Envoy")
    nacks = [t for envoy in envoys for t in envoy["types"].values() if t["nack"] is not None]
    assert not nacks, envoys
    if OUTCOMES:
        print("\nchecked calls by operation and status:")
        for (label, status), count in sorted(OUTCOMES.items()):
            print(f"  {label:45} {status}: {count}")


# -- regressions the fuzzing found outside the document (app.py, rollout/spec.py) ----------

BODY_OPERATIONS = [
    ("PUT", "/v1/models/llama-3-8b/weights"),
    ("POST", "/v1/rollouts"),
    ("POST", "/v1/rollback"),
]


@pytest.mark.parametrize(
    "steps",
    [[{"pause": {"seconds": False}}], [{"set_weight": True}], [{"set_weight": "10"}]],
    ids=["false-as-number", "true-as-integer", "string-as-integer"],
)
def test_rollout_spec_refuses_values_of_the_wrong_type(api, steps):
    """Found by the fuzzing: a spec the document calls invalid is refused naming the step."""
    spec = {"model": "qwen-2-7b", "to": "v2", "steps": steps}
    status, body = api.api("POST", "/v1/rollouts", spec)
    # qwen-2-7b has no v2: a spec that passes validation gets 422 for `to`, not for the step.
    assert status == 422 and body["error"].get("field", "").startswith("steps"), (status, body)


@pytest.mark.parametrize("method, path", BODY_OPERATIONS)
@pytest.mark.parametrize(
    "raw",
    [b'{"weights": {"v1": ' + b"1" * 5000 + b"}}", b"[" * 100_000 + b"]" * 100_000],
    ids=["4301-digit-integer", "nested-100000-deep"],
)
def test_unreadable_json_is_a_400(api, method, path, raw):
    status, body = http_json(method, api.admin + path, raw=raw, token=TOKEN)
    assert status == 400 and body["error"]["type"] == "bad_request", (status, body)


def test_infinity_is_refused(api):
    raw = b'{"model": "qwen-2-7b", "to": "v2", "steps": [{"pause": {"seconds": Infinity}}]}'
    status, body = http_json("POST", api.admin + "/v1/rollouts", raw=raw, token=TOKEN)
    field = body["error"].get("field") or ""
    assert status == 400 or (status == 422 and field.startswith("steps")), (status, body)
