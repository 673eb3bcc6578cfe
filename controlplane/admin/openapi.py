"""The OpenAPI 3.1 document of the admin API, served at /openapi.json.

Every route `make_app` serves is described here (tests/test_openapi.py fails on a route
without documentation). Request bodies that pydantic validates are generated from the
pydantic models (plus the rules of their model validators, from the same tables), so the
document cannot drift from the validation; the other schemas mirror the `to_json` of
`state.Model`, the rollout engine's documents and the xDS server's streams. What JSON Schema
cannot say (weights summing to 100, a version the model has, `to` differing from `from`) the
server answers with 422.

The document is built once, on first use, and cached: treat it as read-only.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from controlplane import __version__
from controlplane.config import ModelConfig
from controlplane.rollout.engine import PHASES, TRANSITIONS
from controlplane.rollout.spec import REQUIRED_FIELDS, STRATEGIES, STRATEGY_FIELDS, RolloutSpec
from controlplane.state import VERSION_STATES
from controlplane.store import PAGE_MAX

Schema = dict[str, Any]
REF = "#/components/schemas/{model}"


def _ref(name: str) -> Schema:
    return {"$ref": REF.format(model=name)}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {
                "type": {
                    "type": "string",
                    "description": "bad_request, unauthorized, not_found, conflict, invalid, "
                    "envoy_rejected, ack_timeout, http_error, ...",
                },
                "message": {"type": "string"},
                "field": {"type": "string", "description": "the field at fault, when one is"},
            },
        }
    },
}
PERCENT: Schema = {"type": "integer", "minimum": 0, "maximum": 100}
WEIGHT_MAP: Schema = {
    "type": "object",
    "description": "version -> integer percent of the model's traffic",
    "additionalProperties": PERCENT,
}
VERSION: Schema = {
    "type": "object",
    "required": ["name", "weight", "ready", "state", "endpoints"],
    "properties": {
        "name": {"type": "string"},
        "weight": PERCENT,
        "ready": {"type": "boolean", "description": "active, with at least one ready endpoint"},
        "state": {"type": "string", "enum": list(VERSION_STATES)},
        "endpoints": {
            "type": "array",
            "description": "base URLs of the version's backends",
            "items": {"type": "string"},
        },
        "replicas": {
            "type": "integer",
            "minimum": 1,
            "description": "backend servers the version runs when all are up (endpoints lists "
            "the ready ones)",
        },
        "backend": {"type": "object", "description": "the backend as configured"},
    },
}
TRAFFIC_POLICY: Schema = {
    "type": "object",
    "description": "route options a rollout holds while it runs (empty when none)",
    "properties": {
        "sticky_header": {"type": "string"},
        "sticky_cookie": {"type": "string"},
        "mirror_to": {"type": "string"},
        "mirror_percent": PERCENT,
    },
}
MODEL: Schema = {
    "type": "object",
    "required": ["name", "versions", "stable", "active_rollout"],
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": _ref("Version")},
        "stable": {"type": "string"},
        "last_good": {
            **_nullable({"type": "string"}),
            "description": "the stable before the last change of stable: where rollback goes",
        },
        "active_rollout": {
            **_nullable({"type": "string"}),
            "description": "id of the model's active rollout",
        },
        "traffic_policy": _ref("TrafficPolicy"),
        "routing": {
            "type": "string",
            "enum": ["least_request", "prefix_aware", "round_robin"],
            "description": "how an endpoint is picked inside a version (docs/routing.md)",
        },
    },
}
MODEL_LIST: Schema = {
    "type": "object",
    "required": ["models"],
    "properties": {"models": {"type": "array", "items": _ref("Model")}},
}
WEIGHTS: Schema = {
    "type": "object",
    "required": ["weights"],
    "additionalProperties": False,
    "properties": {
        "weights": {
            **WEIGHT_MAP,
            "description": "version -> integer percent; the weights sum to 100; left out = 0",
            "minProperties": 1,
        }
    },
}
ROLLBACK: Schema = {
    "description": 'one model (optionally `to` a version), or every model with `"all": true`; '
    "a null field is the same as a field left out",
    "oneOf": [
        {
            "type": "object",
            "required": ["model"],
            "additionalProperties": False,
            "properties": {
                "model": {"type": "string"},
                "to": {
                    **_nullable({"type": "string"}),
                    "description": "default: the last known-good version",
                },
                "all": {"const": False},
            },
        },
        {
            "type": "object",
            "required": ["all"],
            "additionalProperties": False,
            "properties": {
                "all": {"const": True},
                "model": {"type": "null"},
                "to": {"type": "null"},
            },
        },
    ],
}
VERDICT: Schema = {
    "type": "object",
    "description": "the last verdict of the analysis, with the figures it used",
    "required": ["result", "reason", "figures", "time"],
    "properties": {
        "result": {"type": "string", "enum": ["pass", "fail", "inconclusive"]},
        "reason": {"type": "string"},
        "figures": {"type": "object"},
        "time": {"type": "number"},
    },
}
HISTORY_ENTRY: Schema = {
    "type": "object",
    "required": ["time", "event", "phase", "step_index", "weights", "message"],
    "properties": {
        "time": {"type": "number"},
        "event": {"type": "string"},
        "phase": {"type": "string", "enum": list(PHASES)},
        "step_index": {"type": "integer", "minimum": 0},
        "weights": WEIGHT_MAP,
        "message": {"type": "string"},
    },
}
ROLLOUT_FIELDS: Schema = {
    "id": {"type": "string"},
    "from": {"type": "string", "description": "the version traffic moves away from"},
    "phase": {"type": "string", "enum": list(PHASES)},
    "step_index": {"type": "integer", "minimum": 0},
    "steps_total": {"type": "integer", "minimum": 0},
    "weights": {**WEIGHT_MAP, "description": "what Envoy has now"},
    "message": {"type": "string"},
    "analysis_status": _nullable(_ref("AnalysisStatus")),
    "history": {"type": "array", "items": _ref("HistoryEntry")},
    "created_at": {"type": "number", "description": "Unix time"},
    "updated_at": {"type": "number", "description": "Unix time"},
    "pause_until": _nullable({"type": "number"}),
    "pause_left": _nullable({"type": "number"}),
    "failures": {"type": "integer", "minimum": 0, "description": "consecutive failing verdicts"},
    "candidate_crashes": {
        "type": "integer",
        "minimum": 0,
        "description": "the candidate's backend crashes counted when the rollout started: one "
        "more during the rollout rolls it back (with analysis)",
    },
    "wake_seconds": {
        "type": "number",
        "description": "how long waking the parked candidate took, when it had to be woken",
    },
    "unready_since": {
        **_nullable({"type": "number"}),
        "description": "since when the candidate, with traffic, has had no ready endpoint",
    },
}
# absent from rollouts stored by older versions, or only there once something happened
OPTIONAL_ROLLOUT_FIELDS = {"unready_since", "wake_seconds", "candidate_crashes"}
FIGURE = _nullable({"type": "number"})
VERSION_HEALTH: Schema = {
    "type": "object",
    "description": "one version over the window; a figure without data is null",
    "required": ["weight", "ready", "state", "requests", "errors", "requests_per_second"],
    "properties": {
        "weight": PERCENT,
        "ready": {"type": "boolean"},
        "state": {"type": "string", "enum": list(VERSION_STATES)},
        "window_seconds": {"type": "number"},
        "requests": {"type": "number"},
        "errors": {"type": "number", "description": "5xx, connect failures, resets, timeouts"},
        "retries": {"type": "number"},
        "requests_per_second": {"type": "number"},
        "error_rate": FIGURE,
        "latency_p50_ms": FIGURE,
        "latency_p95_ms": FIGURE,
        "latency_p99_ms": FIGURE,
        "ttft_p95_ms": FIGURE,
        "itl_p95_ms": FIGURE,
        "running": {**FIGURE, "description": "requests running in the backends (vLLM)"},
        "waiting": {**FIGURE, "description": "requests queued in the backends (vLLM)"},
    },
}
MODEL_HEALTH: Schema = {
    "type": "object",
    "required": ["model", "window_seconds", "versions"],
    "properties": {
        "model": {"type": "string"},
        "window_seconds": {"type": "number"},
        "versions": {
            "type": "object",
            "description": "version name -> its health",
            "additionalProperties": _ref("VersionHealth"),
        },
    },
}
ROLLOUT_LIST: Schema = {
    "type": "object",
    "required": ["rollouts", "next"],
    "properties": {
        "rollouts": {"type": "array", "items": _ref("Rollout")},
        "next": {
            **_nullable({"type": "string"}),
            "description": "the cursor of the next (older) page, for `before`; null on the last",
        },
    },
}
ENVOY: Schema = {
    "type": "object",
    "required": ["node_id", "node_cluster", "stream", "connected_at", "types"],
    "properties": {
        "node_id": {"type": "string"},
        "node_cluster": {"type": "string"},
        "stream": {"type": "string"},
        "connected_at": {"type": "number"},
        "types": {
            "type": "object",
            "description": "per resource type (cds, eds, lds, rds)",
            "additionalProperties": {
                "type": "object",
                "required": ["acked_version", "nack", "pending"],
                "properties": {
                    "acked_version": _nullable({"type": "string"}),
                    "nack": _nullable(
                        {
                            "type": "object",
                            "required": ["version", "message"],
                            "properties": {
                                "version": _nullable({"type": "string"}),
                                "message": {"type": "string"},
                            },
                        }
                    ),
                    "pending": {"type": "boolean"},
                },
            },
        },
    },
}
ENVOY_LIST: Schema = {
    "type": "object",
    "required": ["snapshot_version", "envoys"],
    "properties": {
        "snapshot_version": _nullable({"type": "string"}),
        "envoys": {"type": "array", "items": _ref("Envoy")},
    },
}

# -- examples (the contract's) -------------------------------------------------------------

MODEL_NAME_EXAMPLE = "llama-3-8b"
ROLLOUT_EXAMPLES = {
    "canary": {
        "value": {
            "model": MODEL_NAME_EXAMPLE,
            "to": "v2",
            "strategy": "canary",
            "steps": [
                {"set_weight": 10},
                {"pause": {"seconds": 30}},
                {"set_weight": 50},
                {"pause": {}},
                {"set_weight": 100},
            ],
            "analysis": {"interval_seconds": 1, "min_requests": 20, "max_error_rate": 0.05},
        }
    },
    "gradual": {
        "value": {
            "model": MODEL_NAME_EXAMPLE,
            "to": "v2",
            "strategy": "gradual",
            "duration_seconds": 300,
            "step_percent": 20,
        }
    },
    "ab": {
        "value": {
            "model": MODEL_NAME_EXAMPLE,
            "to": "v2",
            "strategy": "ab",
            "weight": 50,
            "sticky": {"header": "x-user-id"},
        }
    },
    "mirror": {
        "value": {"model": MODEL_NAME_EXAMPLE, "to": "v2", "strategy": "mirror", "percent": 10}
    },
}
ROLLBACK_EXAMPLES = {
    "one model": {"value": {"model": MODEL_NAME_EXAMPLE}},
    "one model to a version": {"value": {"model": MODEL_NAME_EXAMPLE, "to": "v1"}},
    "every model": {"value": {"all": True}},
}

# -- building blocks -----------------------------------------------------------------------

ERROR_MEANINGS = {
    400: "the body is not a JSON object",
    401: "missing or wrong bearer token",
    404: "unknown model, rollout or path",
    409: "not allowed in the current state (active rollout, phase, version not ready)",
    413: "the body is larger than the server accepts (256 KiB)",
    422: "invalid field, named in error.field",
    502: "an Envoy rejected (NACKed) the change; the change was undone",
    504: "not every Envoy confirmed the change in time; the change stays in the desired state",
}
MODEL_PARAM = {
    "name": "model",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "example": MODEL_NAME_EXAMPLE,
}
SD_TARGETS: Schema = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["targets", "labels"],
        "properties": {
            "targets": {"type": "array", "items": {"type": "string"}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
}
VERSION_PARAM = {
    "name": "version",
    "in": "path",
    "required": True,
    "description": "a version of the model",
    "schema": {"type": "string"},
}
ROLLOUT_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "rollout id, ro-...",
}
OPEN = {"security": [], "tags": ["operations"]}


def _json(schema: Schema, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    return {str(status): _json(_ref("Error"), ERROR_MEANINGS[status]) for status in statuses}


def _body(schema: Schema, examples: dict | None = None) -> dict:
    media: dict = {"schema": schema}
    if examples:
        media["examples"] = examples
    return {"required": True, "content": {"application/json": media}}


def _rollout_command(action: str) -> dict:
    description = {
        "pause": "Hold the rollout at its step (a running timed pause keeps its time left)",
        "resume": "Continue a paused rollout (past a manual gate)",
        "promote": "Send all traffic to the candidate now; the rollout succeeds",
        "abort": "Send all traffic back to `from`; the rollout is aborted",
    }[action]
    return {
        "post": {
            "operationId": f"{action}Rollout",
            "tags": ["rollouts"],
            "summary": description,
            "parameters": [ROLLOUT_ID_PARAM],
            "responses": {
                "200": _json(_ref("Rollout"), "the rollout (a repeated command changes nothing)"),
                **_errors(400, 401, 404, 409, 502, 504),
            },
        }
    }


def _spec_schemas() -> tuple[Schema, dict[str, Schema]]:
    """The rollout spec's JSON Schema, and its sub-models to put in components/schemas.

    pydantic leaves out what its model validators check; the rules are added here from the
    same tables the validators use: the fields each strategy requires and accepts (a field
    "not used" may be absent or null), and the "exactly one of" of a step and of `sticky`.
    """
    schema = RolloutSpec.model_json_schema(by_alias=True, ref_template=REF)
    defs = schema.pop("$defs", {})
    optional = sorted(set().union(*STRATEGY_FIELDS.values()))
    rules = []
    for strategy in STRATEGIES:
        required = REQUIRED_FIELDS.get(strategy, ())
        properties = {name: {"not": {"type": "null"}} for name in required}
        properties |= {n: {"type": "null"} for n in optional if n not in STRATEGY_FIELDS[strategy]}
        when: Schema = {"properties": {"strategy": {"const": strategy}}}
        if strategy != schema["properties"]["strategy"].get("default"):
            when["required"] = ["strategy"]
        then: Schema = {"required": list(required)} if required else {}
        rules.append({"if": when, "then": {**then, "properties": properties}})
    schema["allOf"] = rules
    defs["Step"]["oneOf"] = _exactly_one("set_weight", "pause")
    defs["Sticky"]["oneOf"] = _exactly_one("header", "cookie")
    return schema, defs


def _exactly_one(first: str, second: str) -> list[Schema]:
    return [
        {"required": [one], "properties": {one: {"not": {"type": "null"}}, other: {"type": "null"}}}
        for one, other in ((first, second), (second, first))
    ]


def _rollout_schema(spec: Schema) -> Schema:
    """A rollout document: the spec as stored (no nulls, defaults filled) plus engine fields."""
    properties = {**copy.deepcopy(spec["properties"]), **ROLLOUT_FIELDS}
    engine = [name for name in ROLLOUT_FIELDS if name not in OPTIONAL_ROLLOUT_FIELDS]
    required = [*spec.get("required", []), "strategy", *engine]
    return {
        "type": "object",
        "description": "the rollout spec plus the engine's fields",
        "required": list(dict.fromkeys(required)),
        "properties": properties,
    }


def _model_config_schemas() -> dict[str, Schema]:
    """A model and a version as switchyard.yaml has them (what POST /v1/models takes)."""
    schema = ModelConfig.model_json_schema(ref_template=REF)
    defs = schema.pop("$defs", {})
    defs["Backend"]["minProperties"] = defs["Backend"]["maxProperties"] = 1
    new_version = copy.deepcopy(defs["VersionConfig"])
    new_version["required"] = ["name", "backend"]
    new_version["properties"]["weight"] = {"type": "integer", "const": 0, "default": 0}
    new_version["description"] = "a version added at run time: it joins at weight 0"
    return {"ModelConfig": schema, "NewVersion": new_version, **defs}


def _build() -> dict:
    spec, spec_defs = _spec_schemas()
    schemas = {
        **_model_config_schemas(),
        "Error": ERROR,
        "Version": VERSION,
        "TrafficPolicy": TRAFFIC_POLICY,
        "Model": MODEL,
        "ModelList": MODEL_LIST,
        "Weights": WEIGHTS,
        "ModelHealth": MODEL_HEALTH,
        "VersionHealth": VERSION_HEALTH,
        "RolloutSpec": spec,
        **spec_defs,
        "Rollout": _rollout_schema(spec),
        "RolloutList": ROLLOUT_LIST,
        "AnalysisStatus": VERDICT,
        "HistoryEntry": HISTORY_ENTRY,
        "Rollback": ROLLBACK,
        "Envoy": ENVOY,
        "EnvoyList": ENVOY_LIST,
    }
    paths: dict[str, dict] = {
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "tags": ["models"],
                "summary": "All models with their versions, weights and readiness",
                "responses": {"200": _json(_ref("ModelList"), "the models"), **_errors(401)},
            },
            "post": {
                "operationId": "addModel",
                "tags": ["models"],
                "summary": "Add a model with its versions (as in switchyard.yaml); its backends "
                "start, and it is routed once they are ready",
                "requestBody": _body(_ref("ModelConfig")),
                "responses": {
                    "201": _json(_ref("Model"), "the new model"),
                    **_errors(400, 401, 409, 413, 422),
                },
            },
        },
        "/v1/models/{model}/versions": {
            "post": {
                "operationId": "addVersion",
                "tags": ["models"],
                "summary": "Add a version at weight 0; its backend starts and becomes ready",
                "parameters": [MODEL_PARAM],
                "requestBody": _body(
                    _ref("NewVersion"), {"sim": {"value": {"name": "v3", "backend": {"sim": {}}}}}
                ),
                "responses": {
                    "201": _json(_ref("Version"), "the new version"),
                    **_errors(400, 401, 404, 409, 413, 422),
                },
            }
        },
        "/v1/models/{model}/versions/{version}": {
            "delete": {
                "operationId": "removeVersion",
                "tags": ["models"],
                "summary": "Remove a version; refused (409) while it has weight or the model has "
                "an active rollout",
                "parameters": [MODEL_PARAM, VERSION_PARAM],
                "responses": {
                    "204": {"description": "removed: out of Envoy, its backend stopped"},
                    **_errors(401, 404, 409, 502, 504),
                },
            }
        },
        "/v1/models/{model}": {
            "get": {
                "operationId": "getModel",
                "tags": ["models"],
                "summary": "One model",
                "parameters": [MODEL_PARAM],
                "responses": {"200": _json(_ref("Model"), "the model"), **_errors(401, 404)},
            }
        },
        "/v1/models/{model}/health": {
            "get": {
                "operationId": "getModelHealth",
                "tags": ["models"],
                "summary": "Per version over the last window: request rate, error rate, latency "
                "p50/p95/p99, TTFT and inter-token latency p95, running and waiting requests",
                "parameters": [
                    MODEL_PARAM,
                    {
                        "name": "window",
                        "in": "query",
                        "description": "seconds to look back",
                        "schema": {"type": "number", "minimum": 1, "maximum": 600, "default": 10},
                    },
                ],
                "responses": {
                    "200": _json(_ref("ModelHealth"), "the model's health per version"),
                    **_errors(401, 404, 422),
                },
            }
        },
        "/v1/models/{model}/weights": {
            "put": {
                "operationId": "setWeights",
                "tags": ["models"],
                "summary": "Set the traffic split; answers once every connected Envoy ACKed it",
                "parameters": [MODEL_PARAM],
                "requestBody": _body(
                    _ref("Weights"), {"90/10": {"value": {"weights": {"v1": 90, "v2": 10}}}}
                ),
                "responses": {
                    "200": _json(_ref("Model"), "the model with its new weights"),
                    **_errors(400, 401, 404, 409, 413, 422, 502, 504),
                },
            }
        },
        "/v1/rollouts": {
            "get": {
                "operationId": "listRollouts",
                "tags": ["rollouts"],
                "summary": "Rollouts, newest first, one page at a time (follow `next`)",
                "parameters": [
                    {"name": "model", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "active",
                        "in": "query",
                        "schema": {"type": "boolean"},
                        "description": "true: only progressing or paused; false: only finished",
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": PAGE_MAX,
                            "default": 100,
                        },
                        "description": "rollouts per page",
                    },
                    {
                        "name": "before",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "a cursor: the `next` of the previous page (422 if unknown)",
                    },
                ],
                "responses": {
                    "200": _json(_ref("RolloutList"), "the rollouts"),
                    **_errors(401, 422),
                },
            },
            "post": {
                "operationId": "createRollout",
                "tags": ["rollouts"],
                "summary": "Start a rollout (the steps run in the background)",
                "requestBody": _body(_ref("RolloutSpec"), ROLLOUT_EXAMPLES),
                "responses": {
                    "201": _json(_ref("Rollout"), "the rollout, started"),
                    **_errors(400, 401, 404, 409, 413, 422),
                },
            },
        },
        "/v1/rollouts/{id}": {
            "get": {
                "operationId": "getRollout",
                "tags": ["rollouts"],
                "summary": "One rollout, however old",
                "parameters": [ROLLOUT_ID_PARAM],
                "responses": {"200": _json(_ref("Rollout"), "the rollout"), **_errors(401, 404)},
            }
        },
        **{f"/v1/rollouts/{{id}}/{action}": _rollout_command(action) for action in TRANSITIONS},
        "/v1/rollback": {
            "post": {
                "operationId": "rollback",
                "tags": ["rollouts"],
                "summary": "Emergency brake: abort any active rollout and send 100 % to the "
                "last known-good version (or `to`); answers after the Envoys ACKed",
                "requestBody": _body(_ref("Rollback"), ROLLBACK_EXAMPLES),
                "responses": {
                    "200": _json(_ref("ModelList"), "the models rolled back"),
                    **_errors(400, 401, 404, 409, 413, 422, 502, 504),
                    "502": _json(
                        _ref("Error"),
                        "an Envoy rejected (NACKed) the rollback; the rollouts are aborted all "
                        "the same and the Envoys that accepted it keep it",
                    ),
                },
            }
        },
        "/v1/envoys": {
            "get": {
                "operationId": "listEnvoys",
                "tags": ["operations"],
                "summary": "Connected Envoys: per type the last ACKed version and any NACK",
                "responses": {"200": _json(_ref("EnvoyList"), "the Envoys"), **_errors(401)},
            }
        },
        "/v1/events": {
            "get": {
                "operationId": "streamEvents",
                "tags": ["operations"],
                "summary": "Server-Sent Events: rollout.*, weights.changed, xds.nack, backend.*",
                "description": "An endless stream: `id`, `event` (the type) and `data` (JSON "
                "with `type`, `time` and the event's fields); a comment line every 15 s.",
                "responses": {
                    "200": {
                        "description": "the event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(401),
                },
            }
        },
        "/healthz": {
            "get": {
                **OPEN,
                "operationId": "healthz",
                "summary": "Liveness",
                "responses": {"200": _json(_status_schema(["ok"]), "alive")},
            }
        },
        "/readyz": {
            "get": {
                **OPEN,
                "operationId": "readyz",
                "summary": "Readiness: state loaded and xDS serving",
                "responses": {
                    "200": _json(_status_schema(["ready"]), "ready"),
                    "503": _json(_status_schema(["starting"]), "starting"),
                },
            }
        },
        "/metrics": {
            "get": {
                **OPEN,
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/sd/backends": {
            "get": {
                "tags": ["operations"],
                "operationId": "serviceDiscovery",
                "summary": "Prometheus HTTP service discovery: every ready backend endpoint, "
                "labelled model and version (needs the token: it lists backend addresses)",
                "responses": {"200": _json(SD_TARGETS, "the target groups"), **_errors(401)},
            }
        },
        "/openapi.json": {
            "get": {
                **OPEN,
                "operationId": "openapi",
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "the OpenAPI document")},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Switchyard admin API",
            "version": __version__,
            "description": 'Errors are `{"error": {"type", "message", "field"}}`; '
            "a rejected call changes nothing.",
        },
        "tags": [
            {"name": "models", "description": "models, versions and weights"},
            {"name": "rollouts", "description": "rollouts and emergency rollback"},
            {"name": "operations", "description": "Envoys, events, health and metrics"},
        ],
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "$SWITCHYARD_ADMIN_TOKEN; enforced on /v1/... when it is set",
                }
            },
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


def _status_schema(values: list[str]) -> Schema:
    return {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": values}},
    }


@functools.cache
def openapi_document() -> dict:
    """The document, built on first use and cached (shared: do not mutate it)."""
    return _build()
