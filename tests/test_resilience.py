"""What survives what: a killed Envoy, a stopped control plane, a killed `up`; and what is
refused without harm: bad configuration files, bad admin API calls, bad CLI input.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    EnvoyProcess,
    Running,
    free_ports,
    http_json,
    listen_ports,
    start_switchyard,
    switchyard,
    two_version_models,
    wait_for_proxy,
    wait_until,
    write_config,
)

MODEL = "llama-3-8b"
TOKEN = "s3cret-token"
COMPLETION = b'{"model": "llama-3-8b", "prompt": "x", "max_tokens": 1}'


# -- helpers -------------------------------------------------------------------------------


def complete_once(proxy: str) -> str:
    """One completion through the proxy; the version that served it (raises unless 200)."""
    request = urllib.request.Request(
        f"{proxy}/v1/completions",
        data=COMPLETION,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        return response.headers["x-switchyard-version"]


def served(proxy: str, count: int) -> Counter:
    return Counter(complete_once(proxy) for _ in range(count))


def weights(running: Running) -> dict[str, int]:
    status, model = running.api("GET", f"/v1/models/{MODEL}")
    assert status == 200, model
    return {version["name"]: version["weight"] for version in model["versions"]}


def set_weights(running: Running, **split: int) -> None:
    status, body = running.api("PUT", f"/v1/models/{MODEL}/weights", {"weights": split})
    assert status == 200, body


def get_text(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def healthy(port: int) -> bool:
    try:
        return get_text(f"http://127.0.0.1:{port}/health")[0] == 200
    except OSError:
        return False


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def refuses(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "controlplane", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def sim_args(port: int, version: str) -> list[str]:
    return ["--port", str(port), "--model", MODEL, "--version", version]


def kill_leftovers(pids) -> None:
    """Stop what a failed test left running (only our own children, by pid)."""
    for pid in pids:
        if alive(pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"envoy" in cmdline or b"controlplane" in cmdline:
                os.kill(pid, signal.SIGKILL)


# -- one guarded `switchyard up` (admin token set) for the API, CLI and Envoy-restart tests --


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Iterator[Running]:
    directory = tmp_path_factory.mktemp("guarded")
    env = {"SWITCHYARD_ADMIN_TOKEN": TOKEN}
    with switchyard("up", directory, two_version_models(), env=env) as running:
        wait_for_proxy(running.proxy)
        yield running


@pytest.mark.parametrize(
    ("body", "status", "field", "fragment"),
    [
        ({"weights": {"v3": 100}}, 422, "weights.v3", "no version 'v3'"),
        ({"weights": {"v1": 50, "v2": 49}}, 422, "weights", "sum to 100"),
        ({"weights": {"v1": -10, "v2": 110}}, 422, "weights.v1", "from 0 to 100"),
        ({"weights": {"v1": "100"}}, 422, "weights.v1", "integer"),
        ({"weights": {"v1": 99.5, "v2": 0.5}}, 422, "weights.v1", "integer"),
        ({"weights": "v1=100"}, 422, "weights", "object"),
        ({"weights": {"v2": 100}, "mode": "fast"}, 422, "mode", "unknown field"),
        ({}, 422, "weights", "weights"),
        (b"{not json", 400, None, "not valid JSON"),
        ([{"v2": 100}], 400, None, "JSON object"),
    ],
)
def test_bad_weight_changes_are_refused_and_change_nothing(guarded, body, status, field, fragment):
    before = weights(guarded)
    url = f"{guarded.admin}/v1/models/{MODEL}/weights"
    if isinstance(body, bytes):
        got, answer = http_json("PUT", url, raw=body, token=TOKEN)
    else:
        got, answer = http_json("PUT", url, body, token=TOKEN)
    assert got == status, answer
    error = answer["error"]
    assert error["type"] and fragment in error["message"], error
    assert error.get("field") == field, error
    assert weights(guarded) == before


def test_unknown_model_is_404(guarded):
    status, body = guarded.api("PUT", "/v1/models/gpt-9/weights", {"weights": {"v1": 100}})
    assert status == 404, body
    assert body["error"]["type"] == "not_found"
    assert body["error"]["field"] == "model"
    assert "gpt-9" in body["error"]["message"]
    status, body = guarded.api("GET", "/v1/models/gpt-9")
    assert status == 404, body


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no-token", "wrong-token"])
def test_calls_without_the_right_token_are_401_and_change_nothing(guarded, token):
    before = weights(guarded)
    flip = {v: 100 - w for v, w in before.items()}
    url = f"{guarded.admin}/v1/models/{MODEL}/weights"
    status, body = http_json("PUT", url, {"weights": flip}, token=token)
    assert status == 401, body
    assert body["error"]["type"] == "unauthorized"
    for path in ("/v1/models", "/v1/envoys", "/v1/rollouts"):
        status, body = http_json("GET", guarded.admin + path, token=token)
        assert status == 401, (path, body)
    mutating = [
        ("POST", "/v1/rollouts", {"model": MODEL, "to": "v2", "strategy": "immediate"}),
        ("POST", "/v1/rollback", {"all": True}),
        *[("POST", f"/v1/rollouts/ro-any/{verb}", None)
          for verb in ("pause", "resume", "promote", "abort")],
    ]  # fmt: skip
    for method, path, body in mutating:
        status, answer = http_json(method, guarded.admin + path, body, token=token)
        assert status == 401, (path, answer)
    assert weights(guarded) == before
    assert guarded.api("GET", "/v1/rollouts", token=TOKEN)[1]["rollouts"] == []


def test_health_metrics_and_openapi_need_no_token(guarded):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        status, text = get_text(guarded.admin + path)
        assert status == 200, (path, text)
    assert "switchyard_xds_connected_envoys" in get_text(guarded.admin + "/metrics")[1]


def test_cli_exit_codes_and_messages(guarded):
    env = {"SWITCHYARD_ADMIN_TOKEN": TOKEN}
    server = ("--server", guarded.admin)
    before = weights(guarded)

    done = cli("weights", MODEL, "v1=50", "v2=49", *server, env=env)
    assert done.returncode == 1, done
    assert "weights must sum to 100" in done.stderr
    assert "Traceback" not in done.stderr

    done = cli("weights", MODEL, "v1=fifty", *server, env=env)
    assert done.returncode == 2, done
    assert "v1=fifty" in done.stderr
    assert weights(guarded) == before

    done = cli("weights", MODEL, "v1=0", "v2=100", *server, env={"SWITCHYARD_ADMIN_TOKEN": "no"})
    assert done.returncode == 1, done
    assert "401" in done.stderr
    assert weights(guarded) == before

    done = cli("models", *server, env=env)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    assert [row[1] for row in rows if row[0] == MODEL] == ["v1", "v2"], done.stdout
    assert any(row[0] == "qwen-2-7b" for row in rows)

    nodes = wait_until(
        lambda: [e["node_id"] for e in guarded.api("GET", "/v1/envoys")[1]["envoys"]],
        15,
        message="the Envoy to be connected",
    )
    done = cli("envoys", *server, env=env)
    assert done.returncode == 0, done.stderr
    assert nodes[0] in done.stdout
    assert "rds" in done.stdout

    (dead_port,) = free_ports(1, avoid=listen_ports(guarded.config))
    dead = f"http://127.0.0.1:{dead_port}"
    done = cli("models", "--server", dead, env=env)
    assert done.returncode == 1, done
    assert "cannot reach" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_killed_envoy_comes_back_with_the_current_weights(guarded):
    set_weights(guarded, v1=0, v2=100)
    assert served(guarded.proxy, 20) == Counter({"v2": 20})
    pid_file = guarded.state_dir / "pids" / "envoy.pid"
    killed = int(pid_file.read_text())
    os.kill(killed, signal.SIGKILL)

    seen: Counter = Counter()
    streak = []

    def serving_again() -> bool:
        try:
            version = complete_once(guarded.proxy)
        except (OSError, AssertionError):
            streak.clear()
            return False
        seen[version] += 1
        streak.append(version)
        return len(streak) >= 20

    wait_until(serving_again, 15, message="the restarted Envoy to serve")
    assert seen["v1"] == 0, seen
    assert streak == ["v2"] * 20
    restarted = int(pid_file.read_text())
    assert restarted != killed and alive(restarted)
    _, text = get_text(guarded.admin + "/metrics")
    assert "switchyard_envoy_restarts_total 1.0" in text
    envoys = wait_until(
        lambda: (
            (envoys := guarded.api("GET", "/v1/envoys")[1]["envoys"])
            and len(envoys) == 1
            and envoys
        ),
        15,
        message="one Envoy stream",
    )
    assert all(t["nack"] is None for t in envoys[0]["types"].values())
    assert weights(guarded) == {"v1": 0, "v2": 100}


# -- the control plane stops; its Envoy and backends do not ----------------------------------


def test_envoy_serves_on_while_the_control_plane_is_down_and_resyncs_after(tmp_path):
    sim_ports = dict(zip(("v1", "v2"), free_ports(2), strict=True))
    sims = [
        subprocess.Popen(
            [sys.executable, "-m", "controlplane", "sim", *sim_args(port, version)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for version, port in sim_ports.items()
    ]
    envoy = control = None
    try:
        for port in sim_ports.values():
            wait_until(lambda port=port: healthy(port), 20, message=f"sim on {port}")
        models = [
            {
                "name": MODEL,
                "versions": [
                    {
                        "name": v,
                        "weight": 100 if v == "v1" else 0,
                        "backend": {"url": f"http://127.0.0.1:{port}"},
                    }
                    for v, port in sim_ports.items()
                ],
            }
        ]
        config_path, config = write_config(tmp_path, models)
        control = start_switchyard("serve", config_path, config)
        (admin_port,) = free_ports(1, avoid=listen_ports(config))
        envoy = EnvoyProcess(tmp_path, config_path, "edge", admin_port)
        wait_for_proxy(control.proxy)
        set_weights(control, v1=0, v2=100)
        assert served(control.proxy, 20) == Counter({"v2": 20})

        control.stop()
        assert control.process.returncode == 0, control.logs()
        assert refuses(config["listen"]["admin"])
        # No control plane: Envoy keeps its last configuration.
        assert served(control.proxy, 30) == Counter({"v2": 30})
        assert envoy.process.poll() is None

        # Restarted from the same file (which still says v1=100) and state_dir.
        assert yaml.safe_load(config_path.read_text())["models"][0]["versions"][0]["weight"] == 100
        control = start_switchyard("serve", config_path, config)
        assert weights(control) == {"v1": 0, "v2": 100}

        def resynced() -> bool:
            envoys = control.api("GET", "/v1/envoys")[1]["envoys"]
            return (
                [e["node_id"] for e in envoys] == ["edge"]
                and len(envoys[0]["types"]) == 5  # cds, eds, lds, srds, rds
                and all(
                    t["acked_version"] and not t["pending"] and t["nack"] is None
                    for t in envoys[0]["types"].values()
                )
            )

        wait_until(resynced, 20, message="the Envoy to reconnect and ACK")
        # This process pushed the routes and the Envoy ACKed them.
        _, text = get_text(control.admin + "/metrics")
        assert 'switchyard_xds_acks_total{type="rds"}' in text
        assert 'switchyard_xds_acks_total{type="rds"} 0.0' not in text
        assert served(control.proxy, 30) == Counter({"v2": 30})

        # And the reconnected Envoy follows the new control plane's changes.
        set_weights(control, v1=100, v2=0)
        assert served(control.proxy, 30) == Counter({"v1": 30})
    finally:
        if envoy is not None:
            envoy.stop()
        if control is not None:
            control.stop()
        for sim in sims:
            sim.terminate()
        for sim in sims:
            try:
                sim.wait(10)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait()


# -- `switchyard up` SIGKILLed --------------------------------------------------------------


def test_a_killed_up_takes_its_children_and_ports_with_it(tmp_path):
    config_path, config = write_config(tmp_path, two_version_models())
    running = start_switchyard("up", config_path, config)
    pids: dict[str, int] = {}
    try:
        pids = {f.stem: int(f.read_text()) for f in (running.state_dir / "pids").glob("*.pid")}
        assert "envoy" in pids and len(pids) == 4, pids  # Envoy and three simulators
        assert all(alive(pid) for pid in pids.values())
        wait_for_proxy(running.proxy)

        running.process.kill()
        running.process.wait()

        wait_until(
            lambda: not any(alive(pid) for pid in pids.values()),
            15,
            message="the children of the killed `up` to exit",
        )
        wait_until(lambda: refuses(config["listen"]["proxy"]), 15, message="the proxy port")
        assert refuses(config["listen"]["admin"])
    finally:
        running.stop()
        kill_leftovers(pids.values())

    again = start_switchyard("up", config_path, config)
    try:
        wait_for_proxy(again.proxy)
        assert served(again.proxy, 10) == Counter({"v1": 10})
    finally:
        again.stop()


# -- bad configuration files ----------------------------------------------------------------


def _config_text(case: str, state_dir: Path) -> str:
    keys = ("proxy", "admin", "xds", "envoy_admin")
    listen = {key: f"127.0.0.1:{port}" for key, port in zip(keys, free_ports(4), strict=True)}
    document = {"listen": listen, "state_dir": str(state_dir), "models": two_version_models()}
    versions = document["models"][0]["versions"]
    if case == "port":
        listen["proxy"] = "127.0.0.1:99999"
    elif case == "sum":
        versions[0]["weight"] = 99  # v1 + v2 = 99
    elif case == "duplicate":
        versions[1]["name"] = "v1"
    elif case == "unknown-key":
        document["colour"] = "red"
    elif case == "backend":
        versions[1]["backend"] = {"gpu": {"count": 1}}
    text = yaml.safe_dump(document, sort_keys=False)
    if case == "yaml-boolean":
        text = text.replace("name: qwen-2-7b", "name: on")
    return text


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("port", ["listen.proxy", "65535"]),
        ("sum", ["models[llama-3-8b]", "weights must sum to 100"]),
        ("duplicate", ["models[llama-3-8b]", "duplicate version"]),
        ("unknown-key", ["colour", "unknown key"]),
        ("backend", ["models[llama-3-8b].versions", "unknown backend kind"]),
        ("yaml-boolean", ["models[1].name", "quote it"]),
    ],
)
def test_a_bad_config_stops_up_with_one_line_and_exit_2(tmp_path, case, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(_config_text(case, tmp_path / "state"))
    done = cli("up", "--config", str(path))
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "state").exists(), "nothing may start on a bad config"


def test_a_missing_config_file_is_exit_2(tmp_path):
    done = cli("up", "--config", str(tmp_path / "absent.yaml"))
    assert done.returncode == 2, done
    assert "absent.yaml" in done.stderr and "cannot read" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("key", ["xds", "admin"])
def test_a_busy_listen_address_stops_up_with_a_clear_line(tmp_path, key):
    """Another control plane on the xDS port (gRPC, SO_REUSEPORT) or anything on the admin port."""
    config_path, config = write_config(tmp_path, two_version_models())
    (port,) = free_ports(1, avoid=listen_ports(config))
    if key == "xds":
        from concurrent import futures

        import grpc

        holder = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        holder.add_insecure_port(f"127.0.0.1:{port}")
        holder.start()
        release = lambda: holder.stop(None)  # noqa: E731
    else:
        holder = socket.socket()
        holder.bind(("127.0.0.1", port))
        holder.listen()
        release = holder.close
    try:
        config["listen"][key] = f"127.0.0.1:{port}"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        done = cli("up", "--config", str(config_path), timeout=30)
    finally:
        release()
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"switchyard: listen.{key}: cannot listen on 127.0.0.1:{port}"), last
    pid_dir = Path(config["state_dir"]) / "pids"
    leftovers = [int(f.read_text()) for f in pid_dir.glob("*.pid")] if pid_dir.exists() else []
    assert not any(alive(pid) for pid in leftovers)
