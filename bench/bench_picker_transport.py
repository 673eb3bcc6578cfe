"""The endpoint picker's transport alone: how long Envoy waits for an ext_proc answer over
gRPC and over ext_proc's `http_service` (JSON over HTTP/1.1), and what each costs in CPU.

    python bench/bench_picker_transport.py             # stubs and the real picker, 400 each
    python bench/bench_picker_transport.py --requests 1000 --variants grpc-stub,http-stub

One static Envoy (`--concurrency 1`) with one listener per variant, each with the ext_proc
filter configured as Switchyard configures it (the body only, BUFFERED, a 50 ms message
timeout, fail-open) in front of a route to a cluster with the `override_host` policy:

- `grpc-stub`: a synchronous grpcio server (as the picker's) answering at once with a fixed
  decision; `http-stub`: a raw asyncio HTTP/1.1 server (keep-alive, as the picker's)
  answering at once with the same decision in JSON; `aiohttp-stub`: the same from aiohttp's
  low-level server (what a web framework adds);
- `grpc-picker`, `http-picker`: the real picker (`switchyard picker`, one process serving
  both transports, its default engine: native where built) choosing among 4 simulated
  endpoints from the same body; `http-python`: a second picker, `--engine python`. Its CPU
  includes its reads of the 4 endpoints' /metrics every 100 ms (on its event loop), shared
  between the two by the time their blocks take.

The client sends `--requests` sequential requests per variant with a ~13 KB chat body,
interleaved in blocks of `--block` (A, B, C, D, A, ...), each variant on its own keep-alive
connection. Measured per variant: Envoy's own wait for the processor
(`request_body_total_latency_us` from ext_proc's filter state, in the access log) p50 / p90 /
p99, the processor's CPU per request and Envoy's (both from /proc, per block). A stub's
process serves one variant; the real picker serves two (its CPU is counted per block, so
per variant). The load average is printed first and last.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, free_port, percentile, stop, wait_http

CHOICE_HEADER = "x-gateway-destination-endpoint"
EXT_PROC = "envoy.filters.http.ext_proc"
VARIANTS = ("grpc-stub", "http-stub", "aiohttp-stub", "grpc-picker", "http-picker",
            "http-python")
STUBS = {"grpc-stub": "grpc", "http-stub": "http", "aiohttp-stub": "aiohttp"}


# -- the stubs (run as `--stub grpc|http --port N`) -------------------------------------------


def grpc_stub(port: int, choice: str) -> None:
    """A synchronous grpcio ext_proc server that answers the body at once."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

    response = ext_proc.ProcessingResponse()
    header = base_pb2.HeaderValue(key=CHOICE_HEADER, raw_value=choice.encode())
    response.request_body.response.header_mutation.set_headers.append(
        base_pb2.HeaderValueOption(header=header)
    )
    response.dynamic_metadata.fields["envoy.lb"].struct_value.fields[
        CHOICE_HEADER
    ].string_value = choice
    payload = response.SerializeToString()

    def process(requests, context):
        for _ in requests:
            yield payload
            return

    server = grpc.server(ThreadPoolExecutor(16), options=[("grpc.so_reuseport", 0)])
    handler = grpc.stream_stream_rpc_method_handler(
        process,
        request_deserializer=ext_proc.ProcessingRequest.FromString,
        response_serializer=bytes,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "envoy.service.ext_proc.v3.ExternalProcessor", {"Process": handler}),))  # fmt: skip
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def http_stub(port: int, choice: str) -> None:
    """A raw asyncio HTTP/1.1 server that answers every POST at once, keeping the
    connection (Envoy sends the ProcessingRequest chunked)."""
    answer = json.dumps({
        "request_body": {"response": {"header_mutation": {"set_headers": [{"header": {
            "key": CHOICE_HEADER, "raw_value": base64.b64encode(choice.encode()).decode()}}]}}},
        "dynamic_metadata": {"envoy.lb": {CHOICE_HEADER: choice}},
    }).encode()  # fmt: skip
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(answer), answer)  # fmt: skip

    class Stub(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport, self.buffer = transport, b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := _request_end(self.buffer)) is not None:
                self.buffer = self.buffer[end:]
                self.transport.write(reply)

    async def main() -> None:
        await asyncio.get_running_loop().create_server(Stub, "127.0.0.1", port)
        await asyncio.Event().wait()

    asyncio.run(main())


def aiohttp_stub(port: int, choice: str) -> None:
    """The same answer from aiohttp's low-level server (what a framework costs)."""
    from aiohttp import web

    answer = json.dumps({
        "request_body": {"response": {"header_mutation": {"set_headers": [{"header": {
            "key": CHOICE_HEADER, "raw_value": base64.b64encode(choice.encode()).decode()}}]}}},
        "dynamic_metadata": {"envoy.lb": {CHOICE_HEADER: choice}},
    }).encode()  # fmt: skip

    async def handle(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/json")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(web.Server(handle), "127.0.0.1", port)
        await asyncio.Event().wait()

    asyncio.run(main())


def _request_end(buffer: bytes) -> int | None:
    """Where the first whole request in `buffer` ends (content-length or chunked), or None."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buffer[:head_end].lower()
    start = head_end + 4
    marker = head.find(b"content-length:")
    if marker >= 0:
        length = int(head[marker + 15:].split(b"\r\n", 1)[0])
        return start + length if len(buffer) >= start + length else None
    position = start
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(buffer[position:line_end].split(b";")[0], 16)
        position = line_end + 2 + size + 2
        if len(buffer) < position:
            return None
        if size == 0:
            return position


# -- Envoy -----------------------------------------------------------------------------------


def envoy_config(listeners: dict[str, int], processors: dict[str, dict], backend: int,
                 candidates: list[str], admin: int, access_log: Path) -> dict:  # fmt: skip
    """One listener per variant; ext_proc as Switchyard sets it; a direct-response backend."""
    from controlplane.xds import resources

    headers = ("request_header_mode", "response_header_mode", "request_trailer_mode",
               "response_trailer_mode")  # fmt: skip
    nothing = {key: "SKIP" for key in headers}
    nothing |= {"request_body_mode": "NONE", "response_body_mode": "NONE"}
    subset = ",".join(candidates)

    def listener(name: str, port: int, processor: dict) -> dict:
        ext_proc = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
                     "ExternalProcessor",
            "failure_mode_allow": True, "message_timeout": "0.05s", "processing_mode": nothing,
            "metadata_options": {"receiving_namespaces": {"untyped": ["envoy.lb"]}},
            "stat_prefix": "picker", **processor["filter"],
        }  # fmt: skip
        per_route = {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
                              "ExtProcPerRoute",
                     "overrides": {"processing_mode": nothing | {"request_body_mode": "BUFFERED"},
                                   **processor["route"]}}  # fmt: skip
        route = {
            "match": {"prefix": "/"},
            "metadata": {"filter_metadata": {resources.PICKER_METADATA: {
                "m@v1": {"pool": "m@v1", "subset": subset}}}},
            "typed_per_filter_config": {EXT_PROC: per_route},
            "route": {"cluster": "m@v1"},
        }  # fmt: skip
        fields = {"variant": name, "picker_us":
                  f"%FILTER_STATE({EXT_PROC}:FIELD:request_body_total_latency_us)%",
                  "picked": f"%DYNAMIC_METADATA(envoy.lb:{CHOICE_HEADER})%",
                  "endpoint": "%UPSTREAM_HOST%", "status": "%RESPONSE_CODE%"}  # fmt: skip
        return _listener(name, port, [
            {"name": EXT_PROC, "typed_config": ext_proc},
            {"name": "envoy.filters.http.buffer", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": 1048576}},
        ], [route], access_log=(access_log, fields))  # fmt: skip

    listeners_config = [listener(name, port, processors[name]) for name, port in listeners.items()]
    listeners_config.append(_listener("backend", backend, [], [{
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": "{}"}}}]))  # fmt: skip
    override_host = {"policies": [{"typed_extension_config": {
        "name": "envoy.load_balancing_policies.override_host", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies."
                     "override_host.v3.OverrideHost",
            "override_host_sources": [{"metadata": {"key": "envoy.lb",
                                                    "path": [{"key": CHOICE_HEADER}]}}],
            "fallback_policy": {"policies": [{"typed_extension_config": {
                "name": "envoy.load_balancing_policies.least_request", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies."
                             "least_request.v3.LeastRequest"}}}]}}}}]}  # fmt: skip
    clusters = [_static("m@v1", [("127.0.0.1", backend)], policy=override_host)]
    for processor in processors.values():
        clusters.append(processor["cluster"])
    return {"admin": {"address": _address(admin)},
            "static_resources": {"listeners": listeners_config, "clusters": clusters}}


def _address(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _listener(name, port, filters, routes, access_log=None) -> dict:
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
        "http_filters": [*filters, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }  # fmt: skip
    if access_log is not None:
        path, fields = access_log
        manager["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path), "log_format": {"json_format": fields}}}]  # fmt: skip
    return {"name": name, "address": _address(port), "filter_chains": [{"filters": [{
        "name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}]}


def _static(name: str, hosts: list[tuple[str, int]], http2: bool = False, policy=None) -> dict:
    cluster = {"name": name, "type": "STATIC", "connect_timeout": "0.05s",
               "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                   {"endpoint": {"address": {"socket_address": {"address": host,
                                                                "port_value": port}}}}
                   for host, port in hosts]}]}}  # fmt: skip
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                         "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}  # fmt: skip
    if policy is not None:
        cluster["load_balancing_policy"] = policy
    return cluster


def grpc_processor(name: str, port: int, subset: str) -> dict:
    """Switchyard's gRPC transport: the version and candidates as gRPC metadata."""
    from controlplane.xds import resources

    return {"filter": {"grpc_service": {"envoy_grpc": {"cluster_name": name}}},
            "route": {"grpc_initial_metadata": [
                {"key": resources.POOL_HEADER, "value": "m@v1"},
                {"key": resources.SUBSET_HEADER, "value": subset}]},
            "cluster": _static(name, [("127.0.0.1", port)], http2=True)}  # fmt: skip


def http_processor(name: str, port: int, subset: str) -> dict:
    """Switchyard's HTTP transport: the version and candidates as request attributes,
    from the route's metadata (`subset` is there: envoy_config)."""
    from controlplane.xds import resources

    return {"filter": {"http_service": {"http_service": {"http_uri": {
                "uri": f"http://127.0.0.1:{port}{resources.PICKER_HTTP_PATH}",
                "cluster": name, "timeout": "0.05s"}}},
                       "request_attributes": list(resources.PICKER_ATTRIBUTES)},
            "route": {},
            "cluster": _static(name, [("127.0.0.1", port)])}  # fmt: skip


# -- the run ---------------------------------------------------------------------------------


def chat_body() -> bytes:
    """A multi-turn chat of ~13 KB, as the routing benchmark sends."""
    words = [f"w{i % 97}x{i % 13}" for i in range(1800)]
    messages = [{"role": "system", "content": " ".join(words[:700])}]
    for turn in range(5):
        chunk = words[700 + turn * 220: 700 + (turn + 1) * 220]
        messages.append({"role": "user", "content": " ".join(chunk[:120])})
        messages.append({"role": "assistant", "content": " ".join(chunk[120:])})
    messages.append({"role": "user", "content": "and now?"})
    return json.dumps({"model": "m", "messages": messages, "max_tokens": 8}).encode()


def cpu_ns(pid: int) -> int:
    """Time on a CPU of all a process's threads, in ns (/proc schedstat: finer than ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread ended
            total += int((task / "schedstat").read_text().split()[0])
    return total


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="per variant")
    parser.add_argument("--block", type=int, default=20, help="requests per turn of a variant")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds between requests (0: back to back; the routing "
                        "benchmark's 24 req/s is ~0.04)")
    parser.add_argument("--stub", choices=("grpc", "http", "aiohttp"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--choice", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stub:
        {"grpc": grpc_stub, "http": http_stub, "aiohttp": aiohttp_stub}[args.stub](
            args.port, args.choice
        )
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)} (known: {', '.join(VARIANTS)})")
    print(f"load average at start: {loadavg()}", flush=True)
    run(variants, args.requests, args.block, args.pause)
    print(f"load average at end: {loadavg()}", flush=True)


def run(variants: list[str], requests: int, block: int, pause: float) -> None:
    from controlplane.proxy import envoy_binary

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(prefix="picker-transport-") as tmp:
        directory = Path(tmp)
        backend, admin = free_port(), free_port()
        children: list[subprocess.Popen] = []
        processes: dict[str, int] = {}  # variant -> the pid whose CPU it costs
        processors: dict[str, dict] = {}
        candidates = [f"127.0.0.1:{backend}"]
        try:
            if any(v.endswith(("-picker", "-python")) for v in variants):
                sims = [free_port() for _ in range(4)]
                for port in sims:
                    children.append(subprocess.Popen(
                        [sys.executable, "-m", "controlplane", "sim", "--port", str(port),
                         "--model", "m"], env=env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL))  # fmt: skip
                for port in sims:
                    wait_http(f"http://127.0.0.1:{port}/v1/models")
                # The backend stands in for every endpoint the picker names: Envoy's
                # override_host falls back to it (they are not the cluster's hosts).
                candidates = [f"127.0.0.1:{port}" for port in sims]
                for engine, served in (("auto", (("grpc-picker", grpc_processor),
                                                  ("http-picker", http_processor))),
                                       ("python", (("http-python", http_processor),))):  # fmt: skip
                    if not any(variant in variants for variant, _ in served):
                        continue
                    grpc_port, http_port, metrics = free_port(), free_port(), free_port()
                    picker = subprocess.Popen(
                        [sys.executable, "-m", "controlplane", "picker", "--engine", engine,
                         "--listen", f"127.0.0.1:{grpc_port}",
                         "--http", f"127.0.0.1:{http_port}", "--metrics", f"127.0.0.1:{metrics}"],
                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                    children.append(picker)
                    wait_http(f"http://127.0.0.1:{metrics}/metrics")
                    for variant, make in served:
                        port = grpc_port if make is grpc_processor else http_port
                        processors[variant] = make(variant, port, ",".join(candidates))
                        processes[variant] = picker.pid
            choice = ",".join(candidates)
            for variant, transport in STUBS.items():
                if variant not in variants:
                    continue
                port = free_port()
                stub = subprocess.Popen(
                    [sys.executable, __file__, "--stub", transport, "--port", str(port),
                     "--choice", choice], env=env)  # fmt: skip
                children.append(stub)
                processes[variant] = stub.pid
                make = grpc_processor if transport == "grpc" else http_processor
                processors[variant] = make(variant, port, choice)
            listeners = {variant: free_port() for variant in variants}
            access_log = directory / "access.log"
            config = envoy_config(listeners, {v: processors[v] for v in variants}, backend,
                                  candidates, admin, access_log)  # fmt: skip
            (directory / "envoy.json").write_text(json.dumps(config))
            with open(directory / "envoy.err", "w") as errors:
                envoy = subprocess.Popen(
                    [envoy_binary(), "-c", str(directory / "envoy.json"), "--concurrency", "1",
                     "--base-id", str(admin), "-l", "error", "--file-flush-interval-msec", "100"],
                    stdout=subprocess.DEVNULL, stderr=errors)  # fmt: skip
            children.append(envoy)
            wait_http(f"http://127.0.0.1:{admin}/ready")
            measure(variants, listeners, processes, envoy.pid, requests, block, access_log, pause)
        finally:
            for child in reversed(children):
                stop(child, grace=5)


def measure(variants, listeners, processes, envoy_pid, requests, block, access_log,
            pause) -> None:
    body = chat_body()
    connections = {v: http.client.HTTPConnection("127.0.0.1", listeners[v]) for v in variants}
    cpu = {v: 0.0 for v in variants}
    envoy_cpu = {v: 0.0 for v in variants}
    failed = {v: 0 for v in variants}
    headers = {"content-type": "application/json"}

    def send(variant: str) -> None:
        connection = connections[variant]
        connection.request("POST", "/v1/chat/completions", body, headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            failed[variant] += 1

    for variant in variants:  # warm up: connections to Envoy and from Envoy to each server
        for _ in range(20):
            send(variant)
    time.sleep(1.2)  # the warm-up's log lines are flushed: they are skipped below
    skip = len(access_log.read_text().splitlines()) if access_log.exists() else 0
    print(f"{len(variants)} variants x {requests} sequential requests, {len(body):,}-byte "
          f"body, blocks of {block}; load average {loadavg()}", flush=True)  # fmt: skip
    done = 0
    while done < requests:
        count = min(block, requests - done)
        for variant in variants:
            before, envoy_before = cpu_ns(processes[variant]), cpu_ns(envoy_pid)
            for _ in range(count):
                send(variant)
                if pause:
                    time.sleep(pause)
            cpu[variant] += (cpu_ns(processes[variant]) - before) / 1e9
            envoy_cpu[variant] += (cpu_ns(envoy_pid) - envoy_before) / 1e9
        done += count
    time.sleep(1.5)  # Envoy flushes its access log every second
    waits: dict[str, list[float]] = {v: [] for v in variants}
    picked: dict[str, int] = {v: 0 for v in variants}
    for line in access_log.read_text().splitlines()[skip:]:
        entry = json.loads(line)
        if entry.get("picker_us") not in (None, "-", ""):
            waits[entry["variant"]].append(int(entry["picker_us"]) / 1000)
        if entry.get("picked"):
            picked[entry["variant"]] += 1
    print(f"{'variant':<12} {'n':>5} {'answered':>8} {'failed':>6} {'wait p50':>9} "
          f"{'p90':>7} {'p99':>7} {'max':>7} {'server CPU/req':>14} {'Envoy CPU/req':>13}")
    for variant in variants:
        values = sorted(waits[variant])
        if not values:
            print(f"{variant:<12} no picker_us in the access log")
            continue
        print(f"{variant:<12} {len(values):>5} {picked[variant]:>8} {failed[variant]:>6} "
              f"{percentile(values, 50):>7.2f}ms {percentile(values, 90):>5.2f}ms "
              f"{percentile(values, 99):>5.2f}ms {values[-1]:>5.2f}ms "
              f"{cpu[variant] / requests * 1e6:>11.0f} us "
              f"{envoy_cpu[variant] / requests * 1e6:>10.0f} us")  # fmt: skip
    print("wait: Envoy's request_body_total_latency_us; answered: requests whose metadata "
          "envoy.lb carried the processor's choice", flush=True)


if __name__ == "__main__":
    main()
