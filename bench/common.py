"""Helpers shared by the benchmarks: free ports, a `switchyard up` on them, wrk, /proc CPU.

Every process started here is stopped by the context manager that started it, even when the
benchmark fails half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM, then SIGKILL: never leave a child behind."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Stack:
    """A running `switchyard up` (or `serve`) and where to reach it."""

    process: subprocess.Popen
    config: dict
    config_path: Path
    log_path: Path

    @property
    def proxy(self) -> str:
        return f"http://{self.config['listen']['proxy']}"

    @property
    def admin(self) -> str:
        return f"http://{self.config['listen']['admin']}"

    @property
    def envoy_pid(self) -> int:
        """The pid of the Envoy `switchyard up` started."""
        return int((Path(self.config["state_dir"]) / "pids" / "envoy.pid").read_text())

    def wait_routed(self, model: str, timeout: float = 20) -> None:
        """Until the proxy routes `model`; on a timeout, show what the Envoys reported."""
        try:
            wait_routed(self.proxy, model, timeout)
        except SystemExit as exc:
            envoys = urllib.request.urlopen(f"{self.admin}/v1/envoys", timeout=5).read()
            raise SystemExit(f"{exc}; GET /v1/envoys: {envoys.decode()}") from None


@contextlib.contextmanager
def switchyard_up(
    directory: Path,
    models: list[dict],
    command: str = "up",
    timeout: float = 60,
    base: dict | None = None,
    routed: str | None = None,
) -> Iterator[Stack]:
    """`switchyard up` (or `serve`) on free ports with `models`; stopped with its children.

    `base`: other keys of switchyard.yaml (e.g. the repository's own file); its `listen`,
    `state_dir` and `models` are replaced. With `up`, it waits until the proxy routes
    `routed` (default: the first model).
    """
    listen = {key: f"127.0.0.1:{free_port()}" for key in ("proxy", "admin", "xds", "envoy_admin")}
    config = {**(base or {}), "listen": listen, "state_dir": str(directory / "state")}
    config["models"] = models
    config_path = directory / "switchyard.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = directory / f"{command}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SWITCHYARD_ADMIN_TOKEN", None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "controlplane", command, "--config", str(config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=directory,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not re.search("Switchyard is up|control plane is serving", log_path.read_text()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"switchyard {command} did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        stack = Stack(process, config, config_path, log_path)
        if command == "up":
            model = routed or models[0]["name"]
            stack.wait_routed(model, max(20.0, deadline - time.monotonic()))
        yield stack
    finally:
        stop(process)


@contextlib.contextmanager
def own_envoy(stack: Stack, concurrency: int) -> Iterator[subprocess.Popen]:
    """An Envoy we start ourselves for a `switchyard serve` stack, with --concurrency."""
    bootstrap = subprocess.run(
        [sys.executable, "-m", "controlplane", "bootstrap", "--config", str(stack.config_path)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = stack.config_path.parent / "envoy.yaml"
    path.write_text(bootstrap)
    envoy = str(Path(sys.executable).parent / "envoy")
    port = stack.config["listen"]["proxy"].rsplit(":", 1)[1]
    with open(stack.config_path.parent / "envoy.log", "wb") as log:
        process = subprocess.Popen(
            [envoy, "-c", str(path), "--concurrency", str(concurrency), "--base-id", port,
             "--disable-hot-restart", "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield process
    finally:
        stop(process)


@contextlib.contextmanager
def background(argv: list[str], ready_url: str, log_path: Path) -> Iterator[subprocess.Popen]:
    """A process in the background, ready once `ready_url` answers; stopped on exit."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_http(ready_url)
        yield process
    finally:
        stop(process)


@contextlib.contextmanager
def sim(directory: Path, model: str, *options: str) -> Iterator[str]:
    """One `switchyard sim` on a free port; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "controlplane", "sim", "--port", str(port), "--model", model]
    with background([*argv, *options], f"{url}/health", directory / f"sim-{port}.log"):
        yield url


def post_json(url: str, body: dict, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_routed(proxy: str, model: str, timeout: float = 20) -> None:
    """Until the proxy routes `model`: the listener can be up before its routes arrive."""
    deadline = time.monotonic() + timeout
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if post_json(f"{proxy}/v1/chat/completions", body)[0] == 200:
                return
        time.sleep(0.05)
    raise SystemExit(f"{proxy} does not route {model} after {timeout}s")


def wait_http(url: str, timeout: float = 15) -> None:
    """Until `url` answers at all (any status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} not answering after {timeout}s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    """VmRSS of a process in MB, from /proc/<pid>/status (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    index = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def chat_body(model: str) -> str:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 1}
    )


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def run_wrk(url: str, body: str, connections: int, threads: int, seconds: int) -> dict:
    """POST `body` to `url` with wrk; requests/s, p50/p90/p99 in ms and non-2xx count."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            f'wrk.method = "POST"\nwrk.body = [[{body}]]\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
    try:
        command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
        out = subprocess.run(
            [*command, "-s", script.name, url], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(script.name)
    result = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "non_2xx": 0,
    }
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        result["non_2xx"] = int(match.group(1))
    for pct in ("50", "90", "99"):
        result[f"p{pct}"] = _ms(re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M).group(1))
    return result


async def follow_rollout(admin, base: str, spec: dict, poll: float = 0.1) -> dict:
    """POST a rollout spec and poll it until it ends; its final document (exit on a 4xx)."""
    async with admin.post(f"{base}/v1/rollouts", json=spec) as response:
        doc = await response.json()
        if response.status != 201:
            raise SystemExit(f"POST /v1/rollouts: {response.status} {doc}")
    while doc["phase"] in ("progressing", "paused"):
        await asyncio.sleep(poll)
        async with admin.get(f"{base}/v1/rollouts/{doc['id']}") as response:
            doc = await response.json()
    return doc
