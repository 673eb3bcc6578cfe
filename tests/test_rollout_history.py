"""Rollout history over the admin API: every rollout ever run can be listed page by page and
fetched by id, however old; bad paging parameters are refused naming the field.

The real admin app on a real port, driving the real rollout engine and SQLite store (no Envoy:
the engine's contract with Envoy is exercised in test_rollouts.py).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from controlplane.admin.app import make_app
from controlplane.config import parse_config
from controlplane.controller import Controller
from controlplane.rollout.engine import RolloutEngine
from controlplane.state import Endpoint

CONFIG = {
    "models": [
        {
            "name": name,
            "versions": [
                {"name": "v1", "weight": 100, "backend": {"url": "http://127.0.0.1:1"}},
                {"name": "v2", "weight": 0, "backend": {"url": "http://127.0.0.1:2"}},
            ],
        }
        for name in ("chat", "embed")
    ]
}


class Admin:
    def __init__(self, url: str, session: aiohttp.ClientSession, engine: RolloutEngine) -> None:
        self.url, self.session, self.engine = url, session, engine

    async def get(self, path: str) -> tuple[int, dict]:
        async with self.session.get(self.url + path) as response:
            return response.status, await response.json()

    async def run_rollout(self, model: str, to: str) -> str:
        """An immediate rollout, run to its end; its id."""
        spec = {"model": model, "to": to, "strategy": "immediate"}
        async with self.session.post(f"{self.url}/v1/rollouts", json=spec) as response:
            assert response.status == 201, await response.text()
            rollout_id = (await response.json())["id"]
        for _ in range(500):
            if not self.engine.rollouts:
                return rollout_id
            await asyncio.sleep(0.005)
        raise AssertionError(f"rollout {rollout_id} did not end")


@pytest.fixture
async def admin(tmp_path: Path):
    controller = Controller(parse_config(CONFIG), tmp_path / "state")
    for model in controller.state.models.values():
        for version in model.versions.values():
            controller.set_endpoints(
                model.name, version.name, [Endpoint(version.backend.url)], "active"
            )
    engine = RolloutEngine(controller)
    runner = web.AppRunner(make_app(controller, engine))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession() as session:
        yield Admin(url, session, engine)
    await engine.stop()
    await runner.cleanup()
    controller.store.close()


def cli(admin: Admin, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "controlplane", *args, "--server", admin.url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_every_rollout_is_listed_page_by_page_and_found_by_id_however_old(admin):
    ran = []  # oldest first
    for index in range(240):
        model = "embed" if index % 4 == 3 else "chat"
        current = admin.engine.controller.state.models[model].stable
        ran.append((model, await admin.run_rollout(model, "v2" if current == "v1" else "v1")))
    newest_first = [rollout_id for _, rollout_id in reversed(ran)]

    status, first = await admin.get("/v1/rollouts")
    assert status == 200, first
    assert [r["id"] for r in first["rollouts"]] == newest_first[:100]  # default limit 100
    assert first["next"] is not None

    pages, query = [], "/v1/rollouts?limit=70"
    while True:
        status, page = await admin.get(query)
        assert status == 200, page
        pages.append([r["id"] for r in page["rollouts"]])
        if page["next"] is None:
            break
        query = f"/v1/rollouts?limit=70&before={page['next']}"
    assert [len(ids) for ids in pages] == [70, 70, 70, 30]
    assert [rollout_id for ids in pages for rollout_id in ids] == newest_first

    embed = [rollout_id for model, rollout_id in reversed(ran) if model == "embed"]
    status, page = await admin.get("/v1/rollouts?model=embed&limit=50")
    assert status == 200 and [r["id"] for r in page["rollouts"]] == embed[:50]
    status, rest = await admin.get(f"/v1/rollouts?model=embed&limit=50&before={page['next']}")
    assert status == 200 and [r["id"] for r in rest["rollouts"]] == embed[50:]
    assert rest["next"] is None

    oldest = ran[0][1]
    status, doc = await admin.get(f"/v1/rollouts/{oldest}")
    assert status == 200, doc
    assert (doc["id"], doc["phase"], doc["to"]) == (oldest, "succeeded", "v2")
    shown = await asyncio.to_thread(cli, admin, "rollout", "status", oldest)
    assert shown.returncode == 0, shown.stderr
    assert oldest in shown.stdout and "[succeeded]" in shown.stdout


async def test_active_rollouts_are_listed_and_the_cli_shows_them(admin):
    for _ in range(3):
        await admin.run_rollout("chat", "v2")
        await admin.run_rollout("chat", "v1")
    gate = {"model": "embed", "to": "v2", "strategy": "canary",
            "steps": [{"set_weight": 10}, {"pause": {}}]}  # fmt: skip
    async with admin.session.post(f"{admin.url}/v1/rollouts", json=gate) as response:
        active = await response.json()
    status, page = await admin.get("/v1/rollouts?active=true")
    assert status == 200, page
    assert [r["id"] for r in page["rollouts"]] == [active["id"]] and page["next"] is None
    status, page = await admin.get("/v1/rollouts?active=false&model=embed")
    assert (status, page) == (200, {"rollouts": [], "next": None})
    shown = await asyncio.to_thread(cli, admin, "rollout", "status")
    assert shown.returncode == 0, shown.stderr
    assert active["id"] in shown.stdout and "embed v1->v2" in shown.stdout
    assert shown.stdout.count("ro-") == 1


@pytest.mark.parametrize(
    ("query", "field"),
    [("limit=0", "limit"), ("limit=-3", "limit"), ("limit=1001", "limit"),
     ("limit=ten", "limit"), ("before=ro-0000000000", "before"), ("active=yes", "active")],
)  # fmt: skip
async def test_bad_paging_is_refused_naming_the_field(admin, query, field):
    await admin.run_rollout("chat", "v2")
    status, body = await admin.get(f"/v1/rollouts?{query}")
    assert status == 422, body
    assert body["error"]["field"] == field
