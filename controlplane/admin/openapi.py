"""The OpenAPI 3 document of the admin API, served at /openapi.json."""

from __future__ import annotations

from controlplane import __version__

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": "string", "description": "the field at fault, when one is"},
            },
        }
    },
}
VERSION = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "weight": {"type": "integer", "minimum": 0, "maximum": 100},
        "ready": {"type": "boolean"},
        "state": {
            "type": "string",
            "enum": ["starting", "active", "sleeping", "waking", "error", "stopped"],
        },
        "endpoints": {"type": "array", "items": {"type": "string", "format": "uri"}},
        "backend": {"type": "object"},
    },
}
MODEL = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": {"$ref": "#/components/schemas/Version"}},
        "stable": {"type": "string"},
        "active_rollout": {"type": ["string", "null"]},
    },
}
WEIGHTS = {
    "type": "object",
    "required": ["weights"],
    "additionalProperties": False,
    "properties": {
        "weights": {
            "type": "object",
            "description": "version -> integer percent; the weights sum to 100; left out = 0",
            "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100},
        }
    },
}


def _json(schema_ref: str) -> dict:
    return {
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}
    }


def _errors(*statuses: int) -> dict:
    return {str(status): {"description": "error", **_json("Error")} for status in statuses}


MODEL_PARAM = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Switchyard admin API", "version": __version__},
        "components": {
            "schemas": {"Error": ERROR, "Version": VERSION, "Model": MODEL, "Weights": WEIGHTS},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/models": {
                "get": {
                    "summary": "All models with their versions, weights and readiness",
                    "responses": {"200": {"description": '{"models": [Model]}'}, **_errors(401)},
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "One model",
                    "parameters": [MODEL_PARAM],
                    "responses": {
                        "200": {"description": "the model", **_json("Model")},
                        **_errors(401, 404),
                    },
                }
            },
            "/v1/models/{model}/weights": {
                "put": {
                    "summary": "Set the traffic split; answers once every connected Envoy ACKed it",
                    "parameters": [MODEL_PARAM],
                    "requestBody": {"required": True, **_json("Weights")},
                    "responses": {
                        "200": {"description": "the model with its new weights", **_json("Model")},
                        **_errors(400, 401, 404, 409, 422, 502, 504),
                    },
                }
            },
            "/v1/envoys": {
                "get": {
                    "summary": "Connected Envoys: per type the last ACKed version and any NACK",
                    "responses": {"200": {"description": '{"envoys": [...]}'}, **_errors(401)},
                }
            },
            "/v1/events": {
                "get": {
                    "summary": "Server-Sent Events: weights.changed, xds.nack, backend.ready, ...",
                    "responses": {"200": {"description": "text/event-stream"}, **_errors(401)},
                }
            },
            "/healthz": {"get": {"security": [], "responses": {"200": {"description": "alive"}}}},
            "/readyz": {
                "get": {
                    "security": [],
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "starting"},
                    },
                }
            },
            "/metrics": {
                "get": {"security": [], "responses": {"200": {"description": "Prometheus text"}}}
            },
            "/openapi.json": {
                "get": {"security": [], "responses": {"200": {"description": "this document"}}}
            },
        },
    }
