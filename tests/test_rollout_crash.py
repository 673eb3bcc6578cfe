"""A control plane SIGKILLed in the middle of a rollout: Envoy serves on with its last
configuration, and the restarted control plane picks the rollout up where it was.

Real processes only: two simulators, `switchyard serve` with `url` backends pointing at
them, and a standalone Envoy connected to it, under steady client load throughout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import (
    EnvoyProcess,
    Running,
    complete_once,
    free_ports,
    start_switchyard,
    stop_process,
    wait_for_proxy,
    wait_until,
    write_config,
)

MODEL = "llama-3-8b"
VERSIONS = ("v1", "v2")
CLIENTS = 8
THINK_S = 0.05  # between one client's requests: about 100 req/s from 8 clients


# -- ports and processes ----------------------------------------------------------------------


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, int]]:
    """Two simulators of llama-3-8b, v1 and v2, started here (not by switchyard)."""
    ports = dict(zip(VERSIONS, free_ports(2), strict=True))
    processes = []
    try:
        for version, port in ports.items():
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "controlplane",
                        "sim",
                        "--port",
                        str(port),
                        "--model",
                        MODEL,
                        "--version",
                        version,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in ports.values():
            wait_until(lambda port=port: healthy(port), 30, message=f"the simulator on {port}")
        yield ports
    finally:
        for process in processes:
            stop_process(process)


@dataclass
class Plane:
    """A `serve` (replaceable: it gets killed and restarted) and the Envoy connected to it."""

    config_path: Path
    config: dict
    control: Running
    envoy: EnvoyProcess | None = None

    @property
    def proxy(self) -> str:
        return f"http://{self.config['listen']['proxy']}"

    def api(self, method: str, path: str, body=None):
        return self.control.api(method, path, body)

    def kill(self) -> None:
        self.control.process.kill()
        self.control.process.wait()

    def restart(self) -> None:
        assert self.control.process.poll() is not None, "the old serve is still running"
        self.control = start_switchyard("serve", self.config_path, self.config)


@pytest.fixture
def plane(tmp_path, sims) -> Iterator[Plane]:
    models = [
        {
            "name": MODEL,
            "versions": [
                {
                    "name": version,
                    "weight": 100 if version == "v1" else 0,
                    "backend": {"url": f"http://127.0.0.1:{port}"},
                }
                for version, port in sims.items()
            ],
        }
    ]
    config_path, config = write_config(tmp_path, models)
    ports = free_ports(4, avoid=set(sims.values()))
    config["listen"] = {
        key: f"127.0.0.1:{p}" for key, p in zip(config["listen"], ports, strict=True)
    }
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    running = Plane(config_path, config, start_switchyard("serve", config_path, config))
    try:
        (envoy_admin,) = free_ports(1, avoid={*ports, *sims.values()})
        running.envoy = EnvoyProcess(tmp_path, config_path, "edge", envoy_admin)
        wait_for_proxy(running.proxy, MODEL, timeout=30)
        yield running
    finally:
        if running.envoy is not None:
            running.envoy.stop()
        running.control.stop()


# -- steady load through Envoy -------------------------------------------------------------------


@dataclass
class Load:
    """CLIENTS concurrent clients doing short completions through Envoy, in a thread."""

    proxy: str
    served: list[tuple[float, str]] = field(default_factory=list)  # (time, version)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        wait_until(lambda: len(self.served) >= 20 or self.failures, 20, message="load to start")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)
        assert not self._thread.is_alive(), "the load clients did not stop"

    async def _run(self) -> None:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def client() -> None:
                while not self._stop.is_set():
                    try:
                        async with session.post(f"{self.proxy}/v1/completions", json=body) as r:
                            text = await r.text()
                            version = r.headers.get("x-switchyard-version")
                            if r.status != 200 or version not in VERSIONS:
                                self.failures.append(f"{r.status} {version}: {text[:200]}")
                            else:
                                self.served.append((time.time(), version))
                    except Exception as exc:  # any failure at all counts
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(THINK_S)

            await asyncio.gather(*(client() for _ in range(CLIENTS)))

    def between(self, start: float, end: float) -> Counter:
        return Counter(version for at, version in list(self.served) if start <= at <= end)


# -- rollout helpers ------------------------------------------------------------------------------


def rollout(plane: Plane, rollout_id: str) -> dict:
    status, body = plane.api("GET", f"/v1/rollouts/{rollout_id}")
    assert status == 200, body
    return body


def wait_rollout(plane: Plane, rollout_id: str, predicate, message: str, timeout=20) -> dict:
    def check():
        doc = rollout(plane, rollout_id)
        return doc if predicate(doc) else None

    return wait_until(check, timeout, interval=0.02, message=message)


def recorded(phase: str):
    """A rollout in `phase` with the transition recorded: the engine sets the phase, then waits
    for the Envoys' ACK, and only then appends the history entry."""
    return lambda doc: doc["phase"] == phase and doc["history"][-1]["event"] == phase


def finished(doc: dict) -> bool:
    return doc["phase"] not in ("progressing", "paused") and recorded(doc["phase"])(doc)


def split(v2: int) -> dict[str, int]:
    return {"v1": 100 - v2, "v2": v2}


def expected_weights(steps: list[dict], step_index: int) -> list[dict[str, int]]:
    """The weights a rollout may show at `step_index`: the last set_weight before it, or (while
    that step's own set_weight is being pushed) the one at it."""
    done = [s["set_weight"] for s in steps[:step_index] if "set_weight" in s]
    options = [split(done[-1] if done else 0)]
    if step_index < len(steps) and "set_weight" in steps[step_index]:
        options.append(split(steps[step_index]["set_weight"]))
    return options


def model_weights(plane: Plane) -> tuple[dict[str, int], str]:
    status, model = plane.api("GET", f"/v1/models/{MODEL}")
    assert status == 200, model
    return {v["name"]: v["weight"] for v in model["versions"]}, model["stable"]


# -- the tests ----------------------------------------------------------------------------------


def test_a_rollout_survives_a_killed_control_plane_mid_pause(plane):
    steps = [
        {"set_weight": 20},
        {"pause": {"seconds": 3}},
        {"set_weight": 50},
        {"pause": {"seconds": 3}},
        {"set_weight": 100},
    ]
    with Load(plane.proxy) as load:
        status, doc = plane.api(
            "POST",
            "/v1/rollouts",
            {"model": MODEL, "to": "v2", "strategy": "canary", "steps": steps},
        )
        assert status == 201, doc
        rollout_id = doc["id"]
        before = wait_rollout(
            plane,
            rollout_id,
            lambda d: d["step_index"] == 1 and d["pause_until"] is not None,
            "the rollout to pause after 20 %",
        )
        assert before["phase"] == "progressing", before
        assert before["weights"] == split(20), before
        pause_until = before["pause_until"]

        killed_at = time.time()
        plane.kill()
        time.sleep(1.0)
        # No control plane: Envoy serves on with its last configuration (20 % to v2).
        assert plane.envoy is not None and plane.envoy.process.poll() is None
        while_down = load.between(killed_at, time.time())

        plane.restart()
        restarted_at = time.time()
        after = rollout(plane, rollout_id)
        read_at = time.time()
        assert after["phase"] == "progressing", after
        if read_at < pause_until:
            assert after["step_index"] == 1, after
        else:
            assert after["step_index"] in (1, 2, 3), after
        if after["step_index"] == 1:
            assert after["pause_until"] == pause_until, (after, pause_until)
        assert after["weights"] in expected_weights(steps, after["step_index"]), after
        assert after["history"][: len(before["history"])] == before["history"], after
        assert after["created_at"] == before["created_at"]
        active = plane.api("GET", "/v1/rollouts?active=true")[1]["rollouts"]
        assert [r["id"] for r in active] == [rollout_id], active
        # The restored split, not the config file's v1=100 (it may have moved on to 50 %).
        assert model_weights(plane) in ((split(20), "v1"), (split(50), "v1")), after

        done = wait_rollout(
            plane,
            rollout_id,
            finished,
            "the rollout to finish",
            timeout=30,
        )
        assert done["phase"] == "succeeded", done
        assert done["weights"] == split(100), done
        assert model_weights(plane) == (split(100), "v2")
        finished_at = time.time()
        wait_until(
            lambda: load.between(finished_at, time.time())["v2"] >= 20,
            15,
            message="traffic after the rollout",
        )
        after_done = load.between(finished_at, time.time())

    assert load.failures == [], load.failures[:20]
    totals = Counter(version for _, version in load.served)
    assert totals["v1"] > 0 and totals["v2"] > 0, totals
    # While the control plane was down (until the new one was up), the 80/20 split held.
    assert sum(while_down.values()) >= 20, while_down
    assert 0.05 <= while_down["v2"] / sum(while_down.values()) <= 0.45, while_down
    downtime = load.between(killed_at, restarted_at)
    assert downtime["v1"] > 0 and downtime["v2"] > 0, downtime
    assert after_done["v1"] == 0, after_done

    # The history survived the restart, and the rest of the pause was honoured.
    events = [(h["event"], h["step_index"], h["weights"]) for h in done["history"]]
    assert events[0][0] == "started" and events[-1][0] == "succeeded", events
    taken = [h for h in done["history"] if h["event"] == "step"]
    assert [(h["step_index"], h["weights"]["v2"]) for h in taken] == [(0, 20), (2, 50), (4, 100)]
    steps_taken = {h["step_index"]: h for h in taken}
    assert steps_taken[0]["time"] < killed_at
    assert steps_taken[2]["time"] >= pause_until, (steps_taken[2], pause_until)
    assert steps_taken[4]["time"] >= steps_taken[2]["time"] + 3, steps_taken


def test_a_manual_gate_survives_a_killed_control_plane(plane):
    steps = [{"set_weight": 20}, {"pause": {}}, {"set_weight": 100}]
    with Load(plane.proxy) as load:
        status, doc = plane.api(
            "POST",
            "/v1/rollouts",
            {"model": MODEL, "to": "v2", "strategy": "canary", "steps": steps},
        )
        assert status == 201, doc
        rollout_id = doc["id"]
        before = wait_rollout(
            plane, rollout_id, recorded("paused"), "the rollout to reach the gate"
        )
        assert before["step_index"] == 1 and before["weights"] == split(20), before

        killed_at = time.time()
        plane.kill()
        time.sleep(1.0)
        assert plane.envoy is not None and plane.envoy.process.poll() is None
        plane.restart()
        restarted_at = time.time()

        after = rollout(plane, rollout_id)
        assert after["phase"] == "paused", after
        assert after["step_index"] == 1, after
        assert after["weights"] == split(20), after
        assert after["history"] == before["history"], after
        # Still held at the gate a little later: nothing moves it but resume or promote.
        time.sleep(1.0)
        held = rollout(plane, rollout_id)
        assert (held["phase"], held["step_index"], held["weights"]) == ("paused", 1, split(20))
        assert model_weights(plane) == (split(20), "v1")

        status, resumed = plane.api("POST", f"/v1/rollouts/{rollout_id}/resume")
        assert status == 200, resumed
        assert resumed["phase"] in ("progressing", "succeeded"), resumed
        done = wait_rollout(
            plane,
            rollout_id,
            finished,
            "the resumed rollout to finish",
        )
        assert done["phase"] == "succeeded", done
        assert model_weights(plane) == (split(100), "v2")
        finished_at = time.time()
        wait_until(
            lambda: load.between(finished_at, time.time())["v2"] >= 20,
            15,
            message="traffic after the rollout",
        )

    assert load.failures == [], load.failures[:20]
    down = load.between(killed_at, restarted_at)
    assert down["v1"] > 0 and down["v2"] > 0, down
    events = [h["event"] for h in done["history"]]
    assert events[: len(before["history"])] == [h["event"] for h in before["history"]]
    assert "resumed" in events[len(before["history"]) :], events
    assert events[-1] == "succeeded", events


def test_a_crash_while_the_final_switch_awaits_the_ack_keeps_the_candidate_stable(plane):
    """Promote persists `succeeded` with 100 % to the candidate, pushes it, then waits for the
    Envoys' ACK. A control plane killed in that wait comes back with the rollout over and the
    candidate stable and serving (its history may lack the final entry: that is written after
    the ACK)."""
    steps = [{"set_weight": 20}, {"pause": {}}]
    status, doc = plane.api(
        "POST", "/v1/rollouts", {"model": MODEL, "to": "v2", "strategy": "canary", "steps": steps}
    )
    assert status == 201, doc
    rollout_id = doc["id"]
    wait_rollout(plane, rollout_id, recorded("paused"), "the rollout to reach the gate")

    assert plane.envoy is not None
    envoy_pid = plane.envoy.process.pid
    control = plane.control
    answers: list = []
    promote = threading.Thread(
        target=lambda: answers.append(_call(control, f"/v1/rollouts/{rollout_id}/promote")),
        daemon=True,
    )
    os.kill(envoy_pid, signal.SIGSTOP)  # it will not ACK: promote waits for it
    try:
        promote.start()
        switching = wait_rollout(
            plane, rollout_id, lambda d: d["phase"] == "succeeded", "the promote to be under way"
        )
        assert promote.is_alive(), answers  # still waiting for the ACK
        assert switching["weights"] == split(100), switching
        assert model_weights(plane) == (split(100), "v2")
        plane.kill()
    finally:
        os.kill(envoy_pid, signal.SIGCONT)
    promote.join(30)

    plane.restart()
    after = rollout(plane, rollout_id)
    assert (after["phase"], after["weights"]) == ("succeeded", split(100)), after
    assert plane.api("GET", "/v1/rollouts?active=true")[1]["rollouts"] == []
    assert model_weights(plane) == (split(100), "v2")

    streak: list[str] = []

    def serving_v2() -> bool:
        try:
            status, version = complete_once(plane.proxy)
        except OSError:
            status, version = None, None
        streak[:] = [*streak, version][-20:] if status == 200 else []
        return streak == ["v2"] * 20

    wait_until(serving_v2, 20, message="the reconnected Envoy to send everything to v2")


def _call(control: Running, path: str):
    try:
        return control.api("POST", path)
    except OSError as exc:  # the control plane is killed while this call waits
        return exc


