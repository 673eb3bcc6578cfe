"""Several backend servers per version on one machine (`replicas: N`, or `url` as a list).

Real `switchyard up` (Envoy, simulator processes), the openai SDK through Envoy: a version's
replicas are all in Envoy and share its traffic, one that dies leaves and comes back while
the others serve, parking and waking take every replica along, and `switchyard models`
and the API show how many serve.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections import Counter

import openai
import pytest

from tests.conftest import free_port, stop_process, switchyard, wait_until
from tests.test_runtime import Load, cli, client_for, is_sleeping, version_of


def replica_of(client: openai.OpenAI, model: str = "llama-3-8b") -> tuple[str, str]:
    """(version, replica) that answered one chat request through Envoy."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    return raw.headers["x-switchyard-version"], raw.headers.get("x-sim-replica", "-")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    models = [{"name": "llama-3-8b", "versions": [
        {"name": "v1", "weight": 100, "replicas": 3, "backend": {"sim": {}}},
    ]}]  # fmt: skip
    with switchyard("up", tmp_path_factory.mktemp("replicas"), models) as running:
        yield running


def test_every_replica_is_in_envoy_and_takes_a_share_of_the_traffic(stack):
    v1 = version_of(stack, "v1")
    assert (v1["replicas"], v1["state"], v1["ready"]) == (3, "active", True)
    assert len(set(v1["endpoints"])) == 3  # three processes, three ports

    listing = cli(stack, "models")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if " v1" in line)
    assert "yes 3/3" in row and all(url in row for url in v1["endpoints"])

    client = client_for(stack)
    served = Counter(replica_of(client) for _ in range(60))
    assert set(served) == {("v1", "0"), ("v1", "1"), ("v1", "2")}, served


def test_a_killed_replica_leaves_envoy_and_comes_back_while_the_others_serve(stack):
    before = version_of(stack, "v1")["endpoints"]
    pid_file = stack.state_dir / "pids" / "sim-llama-3-8b@v1.1.pid"
    with Load(stack) as load:
        wait_until(lambda: load.ok >= 20, message="load running")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        wait_until(lambda: len(version_of(stack, "v1")["endpoints"]) == 2, timeout=5,
                   message="the killed replica leaves EDS")  # fmt: skip
        assert version_of(stack, "v1")["state"] == "active"  # the version kept serving
        wait_until(lambda: len(version_of(stack, "v1")["endpoints"]) == 3, timeout=15,
                   message="the replica is restarted")  # fmt: skip
        ok_before = load.ok
        wait_until(lambda: load.ok >= ok_before + 20, message="load after the restart")
    # At most the one request that was inside the process when it was killed.
    assert load.failed <= 1, load.errors[:3]
    after = version_of(stack, "v1")["endpoints"]
    assert len(set(before) & set(after)) == 2  # the two others never moved


def test_a_version_added_with_replicas_starts_them_all(stack):
    added = cli(stack, "models", "add-version", "llama-3-8b", "v2=sim", "--replicas", "2")
    assert added.returncode == 0, added.stderr
    wait_until(lambda: len(version_of(stack, "v2")["endpoints"]) == 2, timeout=15,
               message="both replicas of the added version ready")  # fmt: skip
    assert version_of(stack, "v2")["replicas"] == 2
    status, _ = stack.api("DELETE", "/v1/models/llama-3-8b/versions/v2")
    assert status == 204
    assert not list((stack.state_dir / "pids").glob("sim-llama-3-8b@v2*"))  # all stopped


@pytest.mark.parametrize("park", ["sleep1", "stop"])
def test_parking_and_waking_take_every_replica(tmp_path, park):
    models = [{"name": "llama-3-8b", "park": park, "versions": [
        {"name": "v1", "weight": 100, "replicas": 2, "backend": {"sim": {}}},
        {"name": "v2", "weight": 0, "backend": {"sim": {}}},
    ]}]  # fmt: skip
    with switchyard("up", tmp_path, models) as stack:
        urls = version_of(stack, "v1")["endpoints"]
        assert len(urls) == 2
        status, rollout = stack.api("POST", "/v1/rollouts",
                                    {"model": "llama-3-8b", "to": "v2", "strategy": "immediate"})
        assert status == 201, rollout
        parked = "sleeping" if park == "sleep1" else "stopped"
        wait_until(lambda: version_of(stack, "v1")["state"] == parked, timeout=20,
                   message=f"v1 {parked} after the rollout")  # fmt: skip
        assert version_of(stack, "v1")["endpoints"] == []
        if park == "sleep1":  # each simulator says so, once the controller told it: the
            # state shows 'sleeping' as soon as v1 is out of EDS, before the engines are told
            wait_until(lambda: all(is_sleeping(url) for url in urls), timeout=20,
                       message="both replicas' engines asleep")  # fmt: skip
        else:  # the processes are stopped right after the state says so
            wait_until(lambda: not list((stack.state_dir / "pids").glob("sim-llama-3-8b@v1*")),
                       timeout=10, message="both processes stopped")  # fmt: skip

        back = cli(stack, "rollback", "llama-3-8b")
        assert back.returncode == 0, back.stderr
        wait_until(lambda: len(version_of(stack, "v1")["endpoints"]) == 2, timeout=20,
                   message="both replicas back")  # fmt: skip
        if park == "sleep1":
            assert sorted(version_of(stack, "v1")["endpoints"]) == sorted(urls)
            assert not any(is_sleeping(url) for url in urls)
        client = client_for(stack)
        served = {replica_of(client) for _ in range(40)}
        assert served == {("v1", "0"), ("v1", "1")}, served


def test_a_url_list_is_one_endpoint_per_server(tmp_path):
    ports = [free_port(), free_port()]
    sims = [subprocess.Popen([sys.executable, "-m", "controlplane", "sim", "--port", str(port),
                              "--model", "llama-3-8b", "--version", name],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for port, name in zip(ports, ("a", "b"), strict=True)]  # fmt: skip
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        wait_until(lambda: all(_ok(f"{url}/health") for url in urls), message="sims up")
        models = [{"name": "llama-3-8b", "versions": [
            {"name": "v1", "weight": 100, "backend": {"url": urls}}]}]  # fmt: skip
        with switchyard("up", tmp_path, models) as stack:
            assert sorted(version_of(stack, "v1")["endpoints"]) == sorted(urls)
            client = client_for(stack)
            wait_until(lambda: _servers(client, 30) == {"a", "b"}, timeout=10,
                       message="both servers take requests")  # fmt: skip

            stop_process(sims[0])
            wait_until(lambda: version_of(stack, "v1")["endpoints"] == [urls[1]], timeout=10,
                       message="the dead server leaves EDS")  # fmt: skip
            assert version_of(stack, "v1")["state"] == "active"
            assert _servers(client, 10) == {"b"}

            stop_process(sims[1])
            wait_until(lambda: version_of(stack, "v1")["state"] == "error", timeout=10,
                       message="no server left: error")  # fmt: skip
    finally:
        for sim in sims:
            stop_process(sim)


def _servers(client: openai.OpenAI, count: int) -> set[str]:
    """The x-sim-version labels of the servers that answered `count` requests."""
    seen = set()
    for _ in range(count):
        raw = client.chat.completions.with_raw_response.create(
            model="llama-3-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        seen.add(raw.headers["x-sim-version"])
    return seen


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read() or b"{}") is not None
    except (OSError, ValueError):
        return False
