"""Prometheus HTTP service discovery of the backends (to be built: issue #7)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the service-discovery routes on the admin app."""
