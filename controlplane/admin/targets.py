"""Prometheus HTTP service discovery of the backends: `GET /sd/backends`.

Simulators and `vllm serve` processes get their ports at run time, so a static scrape config
cannot name them. Prometheus asks this endpoint instead (`http_sd_configs`) and scrapes every
ready endpoint of every version, labelled `model` and `version`: vLLM's own metrics do not say
which version they come from. Outside /v1/ like /metrics, so it needs no bearer token.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from controlplane.admin.keys import CONTROLLER

SD_PATH = "/sd/backends"


def add_routes(app: web.Application) -> None:
    """Register the service-discovery routes on the admin app."""
    app.router.add_get(SD_PATH, backends)


async def backends(request: web.Request) -> web.Response:
    """The http_sd target groups: one per version with a ready backend."""
    return web.json_response(target_groups(request.app[CONTROLLER].state.models.values()))


def target_groups(models) -> list[dict[str, Any]]:
    groups = []
    for model in models:
        for version in model.versions.values():
            by_base: dict[tuple[str, str], list[str]] = {}
            for endpoint in version.endpoints:
                # A parked version's endpoint is the activator: no vLLM there to scrape.
                if endpoint.ready and endpoint.url != version.activator:
                    url = urlsplit(endpoint.url)
                    by_base.setdefault((url.scheme, url.path.rstrip("/")), []).append(url.netloc)
            for (scheme, path), hosts in by_base.items():
                labels = {
                    "model": model.name,
                    "version": version.name,
                    "__scheme__": scheme or "http",
                    "__metrics_path__": f"{path}/metrics",
                }
                groups.append({"targets": hosts, "labels": labels})
    return groups
