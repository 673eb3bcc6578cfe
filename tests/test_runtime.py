"""The local runtime end to end: versions added and removed at run time, parking with vLLM
sleep mode, waking for rollbacks and rollouts, and scale to zero with the activator.

Real `switchyard up` (Envoy + simulator processes with their real sleep endpoints), the
openai SDK through Envoy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from tests.conftest import InBackground, free_port, switchyard, wait_until


def one_model(name: str = "llama-3-8b", **options) -> list[dict]:
    return [{"name": name, "versions": [{"name": "v1", "weight": 100, "backend": {"sim": {}}}],
             **options}]  # fmt: skip


def client_for(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.proxy}/v1", api_key="unused", max_retries=0)


def served_by(client: openai.OpenAI, model: str = "llama-3-8b") -> str:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    return raw.headers["x-switchyard-version"]


def version_of(stack, name: str, model: str = "llama-3-8b") -> dict:
    status, body = stack.api("GET", f"/v1/models/{model}")
    assert status == 200, body
    return next(v for v in body["versions"] if v["name"] == name)


def is_sleeping(endpoint: str) -> bool:
    with urllib.request.urlopen(f"{endpoint}/is_sleeping", timeout=5) as response:
        return json.load(response)["is_sleeping"]


def cli(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "controlplane", *args, "--server", stack.admin],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


class Load(InBackground):
    """Requests through Envoy in a background thread, counting failures."""

    join_timeout = 10.0

    def __init__(self, stack) -> None:
        self.client = client_for(stack)
        self.ok, self.failed, self.errors = 0, 0, []
        super().__init__()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                served_by(self.client)
                self.ok += 1
            except openai.APIError as exc:
                self.failed += 1
                self.errors.append(repr(exc))
            time.sleep(0.01)



@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with switchyard("up", tmp_path_factory.mktemp("runtime"), one_model()) as running:
        yield running


def test_add_a_version_roll_out_to_it_and_remove_the_old_one(stack):
    client = client_for(stack)
    added = cli(stack, "models", "add-version", "llama-3-8b", "v2=sim:ttft_ms=1")
    assert added.returncode == 0, added.stderr
    assert "ready at http://" in added.stdout  # the CLI showed progress until ready
    v2 = version_of(stack, "v2")
    assert (v2["weight"], v2["ready"], v2["state"]) == (0, True, "active")
    assert {served_by(client) for _ in range(10)} == {"v1"}  # weight 0: no traffic yet

    status, rollout = stack.api("POST", "/v1/rollouts",
                                {"model": "llama-3-8b", "to": "v2", "strategy": "immediate"})
    assert status == 201, rollout
    wait_until(lambda: stack.api("GET", f"/v1/rollouts/{rollout['id']}")[1]["phase"]
               == "succeeded", message="rollout to the added version")  # fmt: skip
    assert {served_by(client) for _ in range(10)} == {"v2"}

    status, body = stack.api("DELETE", "/v1/models/llama-3-8b/versions/v1")
    assert status == 204, body
    status, model = stack.api("GET", "/v1/models/llama-3-8b")
    assert [v["name"] for v in model["versions"]] == ["v2"]
    assert {served_by(client) for _ in range(5)} == {"v2"}
    pinned = urllib.request.Request(
        f"{stack.proxy}/v1/chat/completions", method="POST",
        data=json.dumps({"model": "llama-3-8b", "messages": []}).encode(),
        headers={"x-switchyard-version": "v1", "content-type": "application/json"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as gone:
        urllib.request.urlopen(pinned, timeout=10)
    assert gone.value.code == 404  # the removed version is gone from Envoy too


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field", "fragment"),
    [
        ("POST", "/v1/models/llama-3-8b/versions", {"name": "v2", "backend": {"sim": {}}},
         409, "name", "already has a version"),
        ("POST", "/v1/models/llama-3-8b/versions", {"name": "v9", "backend": {"docker": {}}},
         422, "backend", "unknown backend kind 'docker'"),
        ("POST", "/v1/models/llama-3-8b/versions", {"name": "bad name", "backend": {"sim": {}}},
         422, "name", "letters, digits"),
        ("POST", "/v1/models/llama-3-8b/versions", {"name": "v9", "backend": {"sim": {}},
                                                      "weight": 10},
         422, "weight", "weight 0"),
        ("DELETE", "/v1/models/llama-3-8b/versions/v2", None, 409, "version", "weight 100%"),
        ("DELETE", "/v1/models/llama-3-8b/versions/v7", None, 404, "version", "no version"),
        ("POST", "/v1/models", {"name": "llama-3-8b", "versions": [
            {"name": "v1", "weight": 100, "backend": {"sim": {}}}]}, 409, "name", "exists"),
        ("POST", "/v1/models", {"name": "m2", "versions": [
            {"name": "v1", "weight": 50, "backend": {"sim": {}}}]}, 422, None, "sum to 100"),
    ],
)  # fmt: skip
def test_bad_model_and_version_changes_are_refused_and_change_nothing(
    stack, method, path, body, status, field, fragment
):
    before = stack.api("GET", "/v1/models")[1]
    got, error = stack.api(method, path, body)
    assert got == status, error
    assert fragment in error["error"]["message"]
    assert error["error"].get("field") == field
    assert stack.api("GET", "/v1/models")[1] == before


def test_a_model_added_at_run_time_serves_and_survives_a_restart(tmp_path):
    with switchyard("up", tmp_path, one_model()) as stack:
        status, body = stack.api("POST", "/v1/models", {
            "name": "mistral-7b", "versions": [{"name": "a", "weight": 100, "backend": {"sim": {}}}]
        })  # fmt: skip
        assert status == 201, body
        wait_until(lambda: version_of(stack, "a", "mistral-7b")["ready"], message="ready")
        assert served_by(client_for(stack), "mistral-7b") == "a"
        status, body = stack.api("POST", "/v1/models/mistral-7b/versions",
                                 {"name": "b", "backend": {"sim": {}}})  # fmt: skip
        assert status == 201, body
    with switchyard("up", tmp_path, one_model()) as stack:  # same state_dir and config
        status, model = stack.api("GET", "/v1/models/mistral-7b")
        assert status == 200, model
        assert [(v["name"], v["weight"]) for v in model["versions"]] == [("a", 100), ("b", 0)]
        wait_until(lambda: version_of(stack, "b", "mistral-7b")["ready"], message="b ready")
        assert served_by(client_for(stack), "mistral-7b") == "a"


def test_the_old_stable_sleeps_after_a_rollout_and_a_rollback_wakes_it(tmp_path):
    models = [{"name": "llama-3-8b", "versions": [
        {"name": "v1", "weight": 100, "backend": {"sim": {"wake_ms": 200}}},
        {"name": "v2", "weight": 0, "backend": {"sim": {}}},
    ]}]  # fmt: skip
    with switchyard("up", tmp_path, models) as stack:
        v1_url = version_of(stack, "v1")["endpoints"][0]
        status, rollout = stack.api("POST", "/v1/rollouts", {
            "model": "llama-3-8b", "to": "v2", "strategy": "canary",
            "steps": [{"set_weight": 50}, {"pause": {"seconds": 0.3}}, {"set_weight": 100}],
        })  # fmt: skip
        assert status == 201, rollout
        wait_until(lambda: version_of(stack, "v1")["state"] == "sleeping", timeout=20,
                   message="v1 parked after the rollout")  # fmt: skip
        # The simulator itself says so: told to sleep once every Envoy has it out of EDS,
        # a moment after the state says so.
        wait_until(lambda: is_sleeping(v1_url), timeout=10, message="v1's backend asleep")
        assert version_of(stack, "v1")["endpoints"] == []  # out of Envoy's EDS

        with Load(stack) as load:
            wait_until(lambda: load.ok >= 20, message="load running")
            back = cli(stack, "rollback", "llama-3-8b")
            assert back.returncode == 0, back.stderr
            assert "all traffic on v1" in back.stdout
            wait_until(lambda: load.ok >= 60, message="load after the rollback")
        assert load.failed == 0, load.errors[:3]
        assert not is_sleeping(v1_url)
        assert version_of(stack, "v1")["state"] == "active"
        assert served_by(client_for(stack)) == "v1"

        # v2 (now at 0 %) is not parked by a rollback; a rollout back to a parked version
        # wakes it first and reports how long that took.
        status, _ = stack.api("POST", "/v1/rollouts",
                              {"model": "llama-3-8b", "to": "v2", "strategy": "immediate"})
        assert status == 201
        wait_until(lambda: version_of(stack, "v1")["state"] == "sleeping", timeout=20,
                   message="v1 parked again")  # fmt: skip
        status, rollout = stack.api("POST", "/v1/rollouts",
                                    {"model": "llama-3-8b", "to": "v1", "strategy": "immediate"})
        assert status == 201, rollout
        done = wait_until(lambda: (r := stack.api("GET", f"/v1/rollouts/{rollout['id']}")[1])
                          ["phase"] == "succeeded" and r, timeout=20, message="rollout to v1")
        events = [entry["event"] for entry in done["history"]]
        assert events.index("waking") < events.index("woken") < events.index("step")
        assert done["wake_seconds"] >= 0.2  # the simulator's wake_ms
        assert served_by(client_for(stack)) == "v1"


def test_a_refused_rollback_wakes_nothing(tmp_path):
    """`rollback --all` is refused (409) when one model has no version to go back to; the
    others stay as they were: a parked version is not woken for nothing."""
    models = [{"name": "llama-3-8b", "versions": [
        {"name": "v1", "weight": 100, "backend": {"sim": {}}},
        {"name": "v2", "weight": 0, "backend": {"sim": {}}},
    ]}]  # fmt: skip
    with switchyard("up", tmp_path, models) as stack:
        v1_url = version_of(stack, "v1")["endpoints"][0]
        dead = {"url": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
        status, body = stack.api("POST", "/v1/models", {
            "name": "embed", "versions": [{"name": "v1", "weight": 100, "backend": dead}]})
        assert status == 201, body
        assert not version_of(stack, "v1", "embed")["ready"]
        status, _ = stack.api("POST", "/v1/rollouts",
                              {"model": "llama-3-8b", "to": "v2", "strategy": "immediate"})
        assert status == 201
        wait_until(lambda: version_of(stack, "v1")["state"] == "sleeping", timeout=20,
                   message="v1 parked after the rollout")  # fmt: skip

        status, body = stack.api("POST", "/v1/rollback", {"all": True})
        assert status == 409, body
        assert body["error"]["field"] == "to" and "'embed'" in body["error"]["message"]
        assert version_of(stack, "v1")["state"] == "sleeping" and is_sleeping(v1_url)
        assert version_of(stack, "v2")["weight"] == 100

        status, body = stack.api("POST", "/v1/rollback", {"model": "llama-3-8b"})
        assert status == 200, body  # one model alone: v1 is woken, then takes the traffic
        assert version_of(stack, "v1")["state"] == "active" and not is_sleeping(v1_url)


def test_a_traffic_change_before_parking_keeps_the_old_stable_awake(tmp_path):
    """Parking waits for the old stable to drain; a rollout started meanwhile (which leaves
    it at 0 % as its `from`) must not find its rollback target put to sleep under it."""
    models = [{"name": "llama-3-8b", "versions": [
        {"name": "v1", "weight": 100, "backend": {"sim": {}}},
        {"name": "v2", "weight": 0, "backend": {"sim": {}}},
    ]}]  # fmt: skip
    with switchyard("up", tmp_path, models) as stack:
        status, first = stack.api("POST", "/v1/rollouts",
                                  {"model": "llama-3-8b", "to": "v2", "strategy": "immediate"})
        assert status == 201
        wait_until(lambda: stack.api("GET", f"/v1/rollouts/{first['id']}")[1]["phase"]
                   == "succeeded", message="first rollout done")  # fmt: skip
        status, body = stack.api("PUT", "/v1/models/llama-3-8b/weights",
                                 {"weights": {"v1": 100, "v2": 0}})
        assert status == 200, body
        status, rollout = stack.api("POST", "/v1/rollouts", {
            "model": "llama-3-8b", "to": "v2", "strategy": "canary",
            "steps": [{"set_weight": 100}, {"pause": {}}],
        })  # fmt: skip
        assert status == 201, rollout
        wait_until(lambda: "backend.park_skipped" in stack.log_path.read_text()
                   or version_of(stack, "v1")["state"] != "active",
                   timeout=20, message="the stale parking dropped or done")  # fmt: skip
        assert version_of(stack, "v1")["state"] == "active"
        assert not is_sleeping(version_of(stack, "v1")["endpoints"][0])
        status, rollout = stack.api("GET", f"/v1/rollouts/{rollout['id']}")
        assert rollout["phase"] == "paused" and rollout["weights"] == {"v1": 0, "v2": 100}


def test_scale_to_zero_holds_the_next_request_while_waking(tmp_path):
    models = [
        # 4 s: long enough that the test reads v1's backend before it idles out, however
        # slowly a loaded machine started the stack.
        {"name": "llama-3-8b", "idle_timeout_seconds": 4,
         "versions": [{"name": "v1", "weight": 100, "backend": {"sim": {"wake_ms": 300}}}]},
        {"name": "slow-to-wake", "idle_timeout_seconds": 1.5, "wake_timeout_seconds": 0.5,
         "versions": [{"name": "v1", "weight": 100, "backend": {"sim": {"wake_ms": 3000}}}]},
    ]  # fmt: skip
    with switchyard("up", tmp_path, models) as stack:
        client = client_for(stack)
        url = version_of(stack, "v1")["endpoints"][0]
        wait_until(lambda: version_of(stack, "v1")["state"] == "sleeping", timeout=15,
                   message="idle version scaled to zero")  # fmt: skip
        # Out of EDS first, then told to sleep once every Envoy has it out: a moment later.
        wait_until(lambda: is_sleeping(url), timeout=10, message="its backend asleep")
        assert version_of(stack, "v1")["endpoints"] == []  # no backend serves (the activator does)
        assert served_by(client) == "v1"  # held while waking, then answered
        assert version_of(stack, "v1")["state"] == "active"
        assert not is_sleeping(url)

        wait_until(lambda: version_of(stack, "v1", "slow-to-wake")["state"] == "sleeping",
                   timeout=15, message="second model scaled to zero")  # fmt: skip
        status, body = _raw_chat(stack, "slow-to-wake")
        assert status == 503
        assert "waking" in body["body"]["error"]["message"]
        assert body["headers"].get("retry-after")
        metrics = urllib.request.urlopen(f"{stack.admin}/metrics", timeout=5).read().decode()
        assert 'switchyard_scale_events_total{direction="down",model="llama-3-8b"' in metrics


def _raw_chat(stack, model: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{stack.proxy}/v1/chat/completions", method="POST",
        data=json.dumps({"model": model, "messages": [], "max_tokens": 1}).encode(),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {"body": json.load(response), "headers": {}}
    except urllib.error.HTTPError as exc:
        headers = {k.lower(): v for k, v in exc.headers.items()}
        return exc.code, {"body": json.loads(exc.read()), "headers": headers}


def test_a_url_backend_is_probed_not_owned(tmp_path):
    port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "controlplane", "sim", "--port", str(port),
                            "--model", "llama-3-8b"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: _ok(f"http://127.0.0.1:{port}/health"), message="sim up")
        models = [{"name": "llama-3-8b", "versions": [
            {"name": "v1", "weight": 100, "backend": {"sim": {}}},
            {"name": "ext", "weight": 0, "backend": {"url": f"http://127.0.0.1:{port}"}},
        ]}]  # fmt: skip
        with switchyard("up", tmp_path, models) as stack:
            assert version_of(stack, "ext")["ready"]
            sim.terminate()
            sim.wait(10)
            wait_until(lambda: not version_of(stack, "ext")["ready"], timeout=10,
                       message="a dead url backend leaves EDS")  # fmt: skip
            assert version_of(stack, "ext")["endpoints"] == []
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_a_slow_backend_gets_no_traffic_until_ready_and_a_killed_one_comes_back(stack):
    client = client_for(stack)
    status, body = stack.api("POST", "/v1/models/llama-3-8b/versions",
                             {"name": "slow", "backend": {"sim": {"startup_ms": 1500}}})
    assert status == 201, body
    assert version_of(stack, "slow")["state"] == "starting"
    pinned = _raw_pinned(stack, "slow")
    assert pinned == 503  # routed nowhere while it loads: no endpoint in EDS
    wait_until(lambda: version_of(stack, "slow")["ready"], timeout=15, message="slow is ready")
    # Envoy learns of it a moment later (EDS push, then its first health check).
    wait_until(lambda: _raw_pinned(stack, "slow") == 200, timeout=5, message="Envoy routes it")

    endpoint = version_of(stack, "slow")["endpoints"][0]
    pid = int(next((stack.state_dir / "pids").glob("sim-llama-3-8b@slow.pid")).read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: version_of(stack, "slow")["endpoints"] != [endpoint], timeout=5,
               message="the killed backend leaves EDS")  # fmt: skip
    wait_until(lambda: version_of(stack, "slow")["ready"], timeout=15, message="restarted")
    assert version_of(stack, "slow")["endpoints"] != [endpoint]  # a new process, a new port
    wait_until(lambda: _raw_pinned(stack, "slow") == 200, timeout=5, message="routed again")
    assert served_by(client) in {"v2"}  # the model's own traffic never noticed
    status, _ = stack.api("DELETE", "/v1/models/llama-3-8b/versions/slow")
    assert status == 204


def test_a_backend_that_cannot_start_ends_in_error(stack):
    status, body = stack.api("POST", "/v1/models/llama-3-8b/versions", {
        "name": "broken", "backend": {"vllm": {"model": "/no/such/model"}}})  # fmt: skip
    assert status == 201, body
    wait_until(lambda: version_of(stack, "broken")["state"] == "error", timeout=20,
               message="repeated failed starts mark the version error")  # fmt: skip
    assert not version_of(stack, "broken")["ready"]
    status, _ = stack.api("DELETE", "/v1/models/llama-3-8b/versions/broken")
    assert status == 204


def _raw_pinned(stack, version: str) -> int:
    request = urllib.request.Request(
        f"{stack.proxy}/v1/chat/completions", method="POST",
        data=json.dumps({"model": "llama-3-8b", "max_tokens": 1,
                         "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"x-switchyard-version": version, "content-type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
