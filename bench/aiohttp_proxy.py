"""A minimal Python reverse proxy doing Envoy's job in Switchyard, as a yardstick for Envoy.

Reads the JSON body, picks a backend by the body's `model` (weighted, like the route's
split), forwards the request over a keep-alive pool, and streams the response back
unbuffered (as Envoy does for SSE) with `x-switchyard-version`. Errors in OpenAI's shape.

    python bench/aiohttp_proxy.py --port 8080 --route bench-model=v1=http://127.0.0.1:8001=100
"""

from __future__ import annotations

import argparse
import json
import random

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def error(status: int, message: str, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": "model",
                      "code": code}}  # fmt: skip
    return web.json_response(body, status=status)


async def forward(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        model = json.loads(raw)["model"]
    except (ValueError, KeyError, TypeError):
        return error(400, "The request body must be a JSON object with a `model` field.")
    versions = request.app["routes"].get(model)
    if versions is None:
        return error(404, f"The model `{model}` does not exist.", "model_not_found")
    names, urls, weights = zip(*versions, strict=True)
    index = random.choices(range(len(names)), weights)[0]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    session: aiohttp.ClientSession = request.app["session"]
    async with session.request(
        request.method, urls[index] + request.path_qs, data=raw, headers=headers
    ) as upstream:
        response = web.StreamResponse(status=upstream.status)
        for key, value in upstream.headers.items():
            if key.lower() not in HOP_BY_HOP:
                response.headers[key] = value
        response.headers["x-switchyard-version"] = names[index]
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def make_app(routes: dict[str, list[tuple[str, str, int]]]) -> web.Application:
    app = web.Application()
    app["routes"] = routes

    async def session_context(app: web.Application):
        connector = aiohttp.TCPConnector(limit=0)  # like Envoy's huge circuit breakers
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            app["session"] = session
            yield

    app.cleanup_ctx.append(session_context)
    app.router.add_route("POST", "/{path:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--route", action="append", required=True, help="MODEL=VERSION=URL=WEIGHT, repeatable"
    )
    args = parser.parse_args()
    routes: dict[str, list[tuple[str, str, int]]] = {}
    for spec in args.route:
        model, version, rest = spec.split("=", 2)
        url, weight = rest.rsplit("=", 1)
        routes.setdefault(model, []).append((version, url.rstrip("/"), int(weight)))
    web.run_app(make_app(routes), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
