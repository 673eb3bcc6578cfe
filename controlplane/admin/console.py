"""The web console at /ui/ (to be built: issue #9)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the console's routes on the admin app."""
