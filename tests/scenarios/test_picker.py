"""The endpoint picker against a live server: under `make test-vllm`, real vLLM's own
/metrics, read by the picker's HTTP client on its event loop and judged by its native engine
(the simulator's, under `make test`). The picker's parsing of vLLM's series is checked on a
captured exposition too (tests/test_picker.py); here the server answers live, with its own
framing and keep-alive."""

from __future__ import annotations

import contextlib
import http.client
import subprocess
import sys
import urllib.request

from tests.conftest import ROOT, free_ports, require_native_picker, stop_process, wait_until
from tests.scenarios.conftest import MODEL, version_of
from tests.test_picker import ask_http, chosen


def reads(metrics_port: int) -> dict[str, float]:
    """The picker's reads of the endpoints' /metrics, by result."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    prefix = "switchyard_picker_endpoint_reads_total{result="
    return {line[len(prefix) + 1 : line.index('"}')]: float(line.rsplit(" ", 1)[1])
            for line in lines if line.startswith(prefix)}  # fmt: skip


def test_the_picker_reads_the_live_servers_metrics_and_lists_a_dead_endpoint_last(tiny):
    require_native_picker()
    server = version_of(tiny, "v1")["endpoints"][0].split("://", 1)[-1]
    grpc_port, http_port, metrics_port, dead_port = free_ports(4)
    dead = f"127.0.0.1:{dead_port}"  # nothing listens there
    picker = subprocess.Popen(
        [sys.executable, "-m", "controlplane", "picker", "--engine", "native",
         "--listen", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}",
         "--metrics", f"127.0.0.1:{metrics_port}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: _answers(metrics_port), 20, message="the picker serves")
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 40}]}
        with contextlib.closing(http.client.HTTPConnection("127.0.0.1", http_port,
                                                           timeout=5)) as connection:  # fmt: skip
            ask_http(connection, chat, [dead, server])  # both named: both read from now on
            wait_until(lambda: reads(metrics_port).get("ok", 0) >= 3, 10,
                       message="the live server's /metrics read, again and again")  # fmt: skip
            assert reads(metrics_port).get("failed", 0) >= 1  # the dead one
            for _ in range(3):
                assert chosen(ask_http(connection, chat, [dead, server])) == [server, dead]
    finally:
        stop_process(picker)
    assert "Traceback" not in picker.stderr.read()


def _answers(metrics_port: int) -> bool:
    try:
        reads(metrics_port)
    except OSError:
        return False
    return True
