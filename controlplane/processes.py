"""Child processes that die with us: Envoy and local backends started by `switchyard up`.

Each child gets PR_SET_PDEATHSIG, so the kernel stops it even when `up` is SIGKILLed, and a
pid file in `state_dir/pids/`, so the next `up` can stop anything that survived anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from controlplane import logs

log = logs.get("processes")
PR_SET_PDEATHSIG = 1
MAX_BACKOFF_S = 5.0  # a supervised child that keeps dying is restarted at most this often
HEALTHY_RUN_S = 30.0  # one that ran this long before dying was not crash-looping


def _die_with_parent() -> None:
    """Runs in the child before exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    os.setpgrp()  # our Ctrl-C is ours to forward; the child must not get it twice


async def spawn(
    name: str, argv: list[str], state_dir: Path, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Start `argv` with its output in state_dir/logs/<name>.log and a pid file."""
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "ab") as output:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            env={**os.environ, **(env or {})},
        )
    pid_dir = state_dir / "pids"
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"{name}.pid").write_text(str(process.pid))
    logs.event(log, "process.started", name=name, pid=process.pid)
    return process


async def stop(
    name: str, process: asyncio.subprocess.Process, state_dir: Path, grace: float = 5.0
) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; removes the pid file."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    (state_dir / "pids" / f"{name}.pid").unlink(missing_ok=True)
    logs.event(log, "process.stopped", name=name, pid=process.pid, code=process.returncode)


def reap_orphans(state_dir: Path) -> list[int]:
    """Kill processes a previous, killed `up` left behind (by pid file), before taking ports."""
    killed = []
    for pid_file in (state_dir / "pids").glob("*.pid"):
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (ValueError, OSError):
            pid_file.unlink(missing_ok=True)
            continue
        if b"envoy" in cmdline or b"switchyard" in cmdline or b"controlplane" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                logs.event(log, "process.orphan_killed", name=pid_file.stem, pid=pid)
        pid_file.unlink(missing_ok=True)
    return killed


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


async def wait_port(host: str, port: int, timeout: float, process=None) -> bool:
    """True once something accepts TCP connections on host:port."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if process is not None and process.returncode is not None:
            return False
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return True
        except OSError:
            await asyncio.sleep(0.05)
    return False


class Supervised:
    """One child (`argv()` is asked at each start) restarted with backoff whenever it exits
    unasked: Envoy, the endpoint picker. A run of HEALTHY_RUN_S resets the backoff, else
    every crash after a few old ones would cost MAX_BACKOFF_S of outage. `on_exit(code,
    restarts)` says so (the log line) before the wait, `on_restart()` after it (a metric)."""

    def __init__(
        self,
        name: str,
        argv: Callable[[], list[str]],
        state_dir: Path,
        on_exit: Callable[[int | None, int], None],
        on_restart: Callable[[], None] = lambda: None,
    ) -> None:
        self.name, self.argv, self.state_dir = name, argv, state_dir
        self.on_exit, self.on_restart = on_exit, on_restart
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._task: asyncio.Task | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        """Start it (once; later calls do nothing)."""
        if self._task is not None:
            return
        self.process = await spawn(self.name, self.argv(), self.state_dir)
        self._task = asyncio.create_task(self._supervise(), name=f"{self.name}-supervisor")

    async def _supervise(self) -> None:
        backoff = 0.1
        loop = asyncio.get_running_loop()
        while not self._stopping:
            assert self.process is not None
            started = loop.time()
            code = await self.process.wait()
            if self._stopping:
                return
            if loop.time() - started >= HEALTHY_RUN_S:
                backoff = 0.1
            self.on_exit(code, self.restarts)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            self.restarts += 1
            self.on_restart()
            self.process = await spawn(self.name, self.argv(), self.state_dir)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.process is not None:
            await stop(self.name, self.process, self.state_dir)
