"""Regenerate the console screenshots in docs/img/ (run by hand; CI never writes into the repo).

    .venv/bin/python scripts/console_screenshots.py [--out docs/img]

Starts its own `switchyard up` on free ports in a temporary directory (two models, simulated
backends), sends steady traffic through Envoy, and drives Debian's chromium with Playwright:
1. console-canary.png: a healthy canary of llama-3-8b at 50 % with its analysis passing;
2. console-rolled-back.png: a second canary whose candidate then answers every request with
   a 500 (the simulator's /sim/faults), rolled back automatically by the analysis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp
import yaml
from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
TOKEN = "screenshot-token"
MODELS = [
    {
        "name": "llama-3-8b",
        "versions": [
            {"name": "v1", "weight": 100, "backend": {"sim": {"ttft_ms": 40, "itl_ms": 5}}},
            {"name": "v2", "weight": 0, "backend": {"sim": {"ttft_ms": 25, "itl_ms": 4}}},
        ],
    },
    {"name": "qwen-2-7b", "versions": [{"name": "v1", "weight": 100, "backend": {"sim": {}}}]},
]
FAULTY_ANALYSIS = {"interval_seconds": 1, "min_requests": 5, "max_error_rate": 0.1,
                   "failure_limit": 1}  # fmt: skip


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def api(admin: str, method: str, path: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(admin + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = response.read()
        return json.loads(payload) if payload else None


class Traffic:
    """About 50 requests/s through Envoy to both models, from a background thread."""

    def __init__(self, proxy: str) -> None:
        self.proxy = proxy
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def worker(model: str) -> None:
                body = {"model": model, "prompt": "hello", "max_tokens": 8}
                while not self.stop.is_set():
                    try:
                        async with session.post(f"{self.proxy}/v1/completions", json=body) as r:
                            await r.read()
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                    await asyncio.sleep(0.1)

            models = ["llama-3-8b"] * 6 + ["qwen-2-7b"] * 2
            await asyncio.gather(*(worker(model) for model in models))


def start_stack(directory: Path) -> tuple[subprocess.Popen, str, str]:
    proxy, admin, xds, envoy_admin = free_ports(4)
    config = {
        "listen": {"proxy": f"127.0.0.1:{proxy}", "admin": f"127.0.0.1:{admin}",
                   "xds": f"127.0.0.1:{xds}", "envoy_admin": f"127.0.0.1:{envoy_admin}"},
        "state_dir": str(directory / "state"),
        "models": MODELS,
    }  # fmt: skip
    path = directory / "switchyard.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = directory / "up.log"
    env = {**os.environ, "SWITCHYARD_ADMIN_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "controlplane", "up", "--config", str(path)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=directory,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while "Switchyard is up" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"switchyard up did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return process, f"http://127.0.0.1:{proxy}", f"http://127.0.0.1:{admin}"


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def shoot(out: Path, proxy: str, admin: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(f"{admin}/ui/")
        page.fill("#token", TOKEN)
        page.click("text=Use token")
        expect(page.locator("#live")).to_have_text("Live")
        time.sleep(20)  # some health history for the charts

        # 1. a healthy canary, analysis passing, held at 50 %
        page.select_option("#rf-to", "v2")
        page.fill("#rf-steps", "10,50,100")
        page.fill("#rf-pause", "")
        page.check("#rf-analysis")
        page.fill("#rf-interval", "2")
        page.fill("#rf-min-requests", "5")
        page.click("#rf-submit")
        card = page.locator('article[data-model="llama-3-8b"]')
        card.get_by_role("button", name="Resume").click(timeout=30_000)
        expect(card.locator('.segment[data-version="v2"]')).to_have_attribute("data-weight", "50")
        time.sleep(12)  # traffic on both versions in the charts, a fresh verdict
        expect(card.locator(".verdict .result")).to_have_text("pass")
        page.screenshot(path=str(out / "console-canary.png"), full_page=True)
        card.get_by_role("button", name="Abort").click()
        expect(card.locator('.segment[data-version="v1"]')).to_have_attribute("data-weight", "100")

        # 2. a bad canary: every candidate request fails, the analysis rolls it back
        model = api(admin, "GET", "/v1/models/llama-3-8b")
        candidate = model["versions"][1]["endpoints"][0]
        rollout = api(admin, "POST", "/v1/rollouts", {
            "model": "llama-3-8b", "to": "v2", "strategy": "canary",
            "steps": [{"set_weight": 20}, {"pause": {"seconds": 60}}, {"set_weight": 100}],
            "analysis": FAULTY_ANALYSIS,
        })  # fmt: skip
        time.sleep(4)
        faults = urllib.request.Request(
            f"{candidate}/sim/faults", data=b'{"error_rate": 1.0}', method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        urllib.request.urlopen(faults, timeout=10).read()
        try:
            wait_for(
                lambda: api(admin, "GET", f"/v1/rollouts/{rollout['id']}")["phase"]
                == "rolled_back",
                60, "the automatic rollback",
            )  # fmt: skip
            expect(page.locator("#history li.entry").first).to_have_attribute(
                "data-phase", "rolled_back"
            )
            time.sleep(10)  # the error spike and the return to v1 in the charts
            page.screenshot(path=str(out / "console-rolled-back.png"), full_page=True)
        finally:
            urllib.request.urlopen(
                urllib.request.Request(f"{candidate}/sim/faults", method="DELETE"), timeout=10
            ).read()
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        process, proxy, admin = start_stack(Path(directory))
        traffic = Traffic(proxy)
        traffic.thread.start()
        try:
            shoot(args.out, proxy, admin)
        finally:
            traffic.stop.set()
            traffic.thread.join(10)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
    print(f"wrote {args.out / 'console-canary.png'} and {args.out / 'console-rolled-back.png'}")


if __name__ == "__main__":
    main()
