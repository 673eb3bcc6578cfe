"""What the admin app holds (`app[CONTROLLER]`, ...), in a module of its own so that the
route modules (`app.py`, `targets.py`) can all read it without importing one another."""

from __future__ import annotations

from aiohttp import web

from controlplane.controller import Controller
from controlplane.rollout.engine import RolloutEngine

CONTROLLER = web.AppKey("controller", Controller)
ENGINE = web.AppKey("engine", RolloutEngine)
TOKEN = web.AppKey("token", str)
