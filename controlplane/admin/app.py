"""The admin REST API: models, weights, Envoys, events, health and metrics.

Errors from the control plane (`SwitchyardError`) become the JSON error shape here, in one
middleware; handlers stay small and only translate HTTP to controller calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane import logs, metrics
from controlplane.admin import console, targets
from controlplane.admin.keys import CONTROLLER, ENGINE, TOKEN
from controlplane.admin.openapi import openapi_document
from controlplane.config import ModelConfig, VersionConfig, validate_body
from controlplane.controller import Controller
from controlplane.errors import BadRequest, Invalid, SwitchyardError, Unauthorized
from controlplane.rollout.engine import TRANSITIONS, RolloutEngine
from controlplane.store import PAGE_MAX

log = logs.get("admin")
HEALTH_WINDOW_S = 10.0
PICKER_METRICS_TIMEOUT_S = 0.5
# The largest request body (a model with its versions, a rollout spec): a few KiB in
# practice; larger ones get a JSON 413 before anything is parsed.
MAX_BODY_BYTES = 256 * 1024
# The only routes a caller without the token reaches (probes, Prometheus, the API document,
# the console's static files). Matched on the route that aiohttp resolved, not on the raw
# path, so no spelling of a path can turn a guarded route into a public one.
PUBLIC_ROUTES = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/ui", "/ui/", "/ui/{name}"}
)
PAGE_DEFAULT = 100  # rollouts per page of GET /v1/rollouts
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(
    controller: Controller, engine: RolloutEngine, token: str | None = None
) -> web.Application:
    app = web.Application(
        middlewares=[_observe, _audit, _errors, _auth], client_max_size=MAX_BODY_BYTES
    )
    app[CONTROLLER] = controller
    app[ENGINE] = engine
    app[TOKEN] = token or ""
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/models", add_model)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_post("/v1/models/{model}/versions", add_version)
    app.router.add_delete("/v1/models/{model}/versions/{version}", remove_version)
    app.router.add_put("/v1/models/{model}/weights", put_weights)
    app.router.add_get("/v1/models/{model}/health", model_health)
    app.router.add_post("/v1/rollouts", create_rollout)
    app.router.add_get("/v1/rollouts", list_rollouts)
    app.router.add_get("/v1/rollouts/{id}", get_rollout)
    for action in TRANSITIONS:
        app.router.add_post(f"/v1/rollouts/{{id}}/{action}", _rollout_command(action))
    app.router.add_post("/v1/rollback", rollback)
    app.router.add_get("/v1/envoys", list_envoys)
    app.router.add_get("/v1/events", stream_events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus_metrics)
    app.router.add_get("/openapi.json", openapi)
    console.add_routes(app)
    targets.add_routes(app)
    app.on_shutdown.append(_end_event_streams)
    return app


async def _end_event_streams(app: web.Application) -> None:
    """Open SSE streams (the console, curl) would otherwise hold shutdown until their next
    event."""
    app[CONTROLLER].events.close()


# -- middlewares ---------------------------------------------------------------------------


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request count and latency by route pattern (bounded labels, never the raw path)."""
    started = time.perf_counter()
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.admin_requests.labels(name, request.method, str(status)).inc()
        metrics.admin_latency.labels(name, request.method).observe(time.perf_counter() - started)


@web.middleware
async def _audit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One audit line per mutating call: who, what, and the result."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return await handler(request)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        logs.event(
            log, "audit", who=_who(request), method=request.method, path=request.path,
            status=status,
        )  # fmt: skip


def _who(request: web.Request) -> str:
    """The caller: a short fingerprint of its token (never the token), else its address."""
    given = request.headers.get("Authorization", "")
    if given.startswith("Bearer "):
        return "token:" + hashlib.sha256(given[7:].encode()).hexdigest()[:8]
    return f"addr:{request.remote}"


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SwitchyardError as exc:
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        logs.event(
            log, "admin.refused", level, method=request.method, path=request.path,
            status=exc.status, message=exc.message,
        )  # fmt: skip
        return web.json_response(exc.to_json(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = {404: "not_found", 413: "request_too_large"}.get(exc.status, "http_error")
        message = f"{exc.reason}: {request.method} {request.path}"
        if exc.status == 413:
            message = f"the request body is over {MAX_BODY_BYTES} bytes"
        body = {"error": {"type": kind, "message": message}}
        return web.json_response(body, status=exc.status, headers=_allow(exc))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("admin.error", extra={"fields": {"path": request.path}})
        body = {"error": {"type": "internal_error", "message": "internal error, see the logs"}}
        return web.json_response(body, status=500)


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With a token, every route but PUBLIC_ROUTES needs it: the API and the backends'
    service discovery (it lists their addresses). A request that matches no route gets its
    404 or 405, which tells nothing that /openapi.json does not."""
    token = request.app[TOKEN]
    route = _route_of(request)
    if token and route is not None and route not in PUBLIC_ROUTES:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)")
    return await handler(request)


def _route_of(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


# -- handlers ------------------------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    state = request.app[CONTROLLER].state
    return web.json_response({"models": [model.to_json() for model in state.models.values()]})


async def get_model(request: web.Request) -> web.Response:
    model = request.app[CONTROLLER].state.model(request.match_info["model"])
    return web.json_response(model.to_json())


async def add_model(request: web.Request) -> web.Response:
    """A new model, shaped as in switchyard.yaml; 201 once its routes are in the snapshot."""
    config = validate_body(ModelConfig, await json_body(request, allowed=None))
    model = await request.app[CONTROLLER].add_model(config)
    return web.json_response(model.to_json(), status=201)


async def add_version(request: web.Request) -> web.Response:
    """`{"name": "v3", "backend": {...}, "replicas": 1}`: the version starts at weight 0; 201."""
    controller = request.app[CONTROLLER]
    model_name = request.match_info["model"]
    controller.state.model(model_name)  # 404 first
    body = await json_body(request, allowed={"name", "backend", "weight", "replicas"})
    config = validate_body(VersionConfig, {"weight": 0, **body})
    version = await controller.add_version(model_name, config)
    return web.json_response(version.to_json(), status=201)


async def remove_version(request: web.Request) -> web.Response:
    info = request.match_info
    await request.app[CONTROLLER].remove_version(info["model"], info["version"])
    return web.Response(status=204)


async def put_weights(request: web.Request) -> web.Response:
    controller = request.app[CONTROLLER]
    model_name = request.match_info["model"]
    controller.state.model(model_name)  # 404 before 422: the model is the first thing wrong
    body = await json_body(request, allowed={"weights"})
    if "weights" not in body:
        raise Invalid('body must be {"weights": {"<version>": <percent>, ...}}', "weights")
    return web.json_response(await controller.set_weights(model_name, body["weights"]))


async def create_rollout(request: web.Request) -> web.Response:
    body = await json_body(request, allowed=None)
    rollout = await request.app[ENGINE].create(body)
    return web.json_response(rollout, status=201)


async def list_rollouts(request: web.Request) -> web.Response:
    """One page, newest first: `?limit=` (default 100), `?before=<next of the last page>`."""
    query = request.query
    active = query.get("active")
    if active not in (None, "true", "false"):
        raise Invalid("active must be true or false", field="active")
    limit = _page_limit(query.get("limit"))
    rollouts, cursor = request.app[ENGINE].list(
        model=query.get("model"), active=None if active is None else active == "true",
        limit=limit, before=query.get("before"),
    )  # fmt: skip
    return web.json_response({"rollouts": rollouts, "next": cursor})


def _page_limit(text: str | None) -> int:
    if text is None:
        return PAGE_DEFAULT
    try:
        limit = int(text)
    except ValueError:
        raise Invalid(f"limit must be an integer, got {text!r}", field="limit") from None
    if not 1 <= limit <= PAGE_MAX:
        raise Invalid(f"limit must be from 1 to {PAGE_MAX}, got {limit}", field="limit")
    return limit


async def get_rollout(request: web.Request) -> web.Response:
    return web.json_response(request.app[ENGINE].get(request.match_info["id"]))


def _rollout_command(action: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        rollout = await request.app[ENGINE].command(request.match_info["id"], action)
        return web.json_response(rollout)

    handle.__name__ = f"rollout_{action}"
    return handle


async def rollback(request: web.Request) -> web.Response:
    body = await json_body(request, allowed={"model", "all", "to"})
    everything = body.get("all", False)
    if not isinstance(everything, bool):
        raise Invalid("all must be true or false", field="all")
    model, to = body.get("model"), body.get("to")
    if everything == (model is not None):
        raise Invalid('give either "model" or "all": true', field="model")
    for name, value in (("model", model), ("to", to)):
        if value is not None and not isinstance(value, str):
            raise Invalid(f"{name} must be a string", field=name)
    if everything and to is not None:
        raise Invalid('"to" needs a single "model"', field="to")
    models = await request.app[ENGINE].rollback(model, everything, to)
    return web.json_response({"models": models})


async def model_health(request: web.Request) -> web.Response:
    """Per version over the last `window` seconds (default 10): rate, errors, latency, TTFT."""
    controller = request.app[CONTROLLER]
    model = controller.state.model(request.match_info["model"])
    try:
        window = float(request.query.get("window", HEALTH_WINDOW_S))
    except ValueError:
        raise Invalid("window must be a number of seconds", field="window") from None
    if not 1 <= window <= 600:
        raise Invalid("window must be from 1 to 600 seconds", field="window")
    versions = {
        name: {
            "weight": version.weight,
            "ready": version.ready,
            "state": version.state,
            **controller.health.window(model.name, name, window).to_json(),
        }
        for name, version in model.versions.items()
    }
    return web.json_response({"model": model.name, "window_seconds": window, "versions": versions})


async def list_envoys(request: web.Request) -> web.Response:
    controller = request.app[CONTROLLER]
    snapshot = controller.snapshot
    return web.json_response(
        {
            "snapshot_version": snapshot.version if snapshot else None,
            "envoys": controller.xds.envoys(),
        }
    )


async def stream_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events; a comment line every 15 s keeps proxies from closing it."""
    bus = request.app[CONTROLLER].events
    queue = bus.subscribe()
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), 15)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if event is None:
                break
            payload = json.dumps({"type": event.type, "time": event.time, **event.data})
            await response.write(
                f"id: {event.id}\nevent: {event.type}\ndata: {payload}\n\n".encode()
            )
    except ConnectionResetError:
        pass  # the client went away: nothing to tell anyone
    finally:
        bus.unsubscribe(queue)
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    controller = request.app[CONTROLLER]
    ready = controller.snapshot is not None and controller.xds.port is not None
    return web.json_response(
        {"status": "ready" if ready else "starting"}, status=200 if ready else 503
    )


async def prometheus_metrics(request: web.Request) -> web.Response:
    """The controller's metrics, then the endpoint picker's (a process of its own, read on
    loopback; left out when it does not answer at once)."""
    body = generate_latest(metrics.REGISTRY)
    picker = request.app[CONTROLLER].picker_metrics
    if picker is not None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            timeout = aiohttp.ClientTimeout(total=PICKER_METRICS_TIMEOUT_S)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(picker) as answer,
            ):
                if answer.status == 200:
                    body += await answer.read()
    response = web.Response(body=body)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


# -- helpers -------------------------------------------------------------------------------


def _strict_loads(text: str):
    """JSON as RFC 8259 has it: NaN and Infinity are not numbers we accept."""
    return json.loads(text, parse_constant=_refuse_constant)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def json_body(request: web.Request, allowed: set[str] | None) -> dict:
    """The request's JSON object; 400 if it is not one, 422 naming an unknown key."""
    try:
        body = await request.json(loads=_strict_loads)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    unknown = sorted(set(body) - allowed) if allowed is not None else []
    if unknown:
        raise Invalid(f"unknown field {unknown[0]!r}", field=unknown[0])
    return body
