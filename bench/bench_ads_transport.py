"""The per-push cost of the ADS transport alone: the same bytes to N streams, ACKed.

Section 11.2 found ~360 us of control-plane CPU per client push, 46 % of it on grpc.aio's
`context.write`. This bench takes Switchyard out and measures only the transport, each
way a Python server can push one serialized DiscoveryResponse (one model's route
configuration, ~2.9 KB, + its nonce) to N ADS streams and collect their ACKs:

- `aio`: grpc.aio, as controlplane/xds/server.py: per stream a reader (`async for`) and a
  writer task woken by an event (`await context.write(bytes)`);
- `sync`: grpc's thread-pool server, a thread per stream writing (a generator woken by a
  condition) and one reading;
- `aioxK` / `syncxK`: K such server processes on one port (SO_REUSEPORT: the kernel spreads
  the streams), each told to push through a pipe, as worker processes fed the serialized
  snapshot by the controller would be;
- `raw`: the floor: asyncio TCP with length-prefixed frames and no HTTP/2 or gRPC at all
  (not a transport Envoy speaks; what Python's event loop costs per message).

Clients: grpc.aio ADS streams (raw TCP for `raw`), one channel (one TCP connection) each,
in `--client-processes` processes of their own; each ACKs every response with its nonce,
as Envoy does.

    python bench/bench_ads_transport.py [--modes aio,sync,aiox2,raw] [--clients 1,100,1000]
                                        [--pushes 50] [--gap 0.05]
    python bench/bench_ads_transport.py --modes aio --clients 1 --pushes 500   # one stream

Per mode and N: push -> last ACK (the servers' own clocks, from the push order to the last
ACK read), p50/p90/p99; server CPU (utime + stime of every server process) per push and per
client push. Every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from common import cpu_seconds, free_port, percentile, stop

HERE = Path(__file__).resolve().parent
ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
METHOD = f"/{ADS_SERVICE}/StreamAggregatedResources"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def run_loop(main) -> None:
    """asyncio's loop, or uvloop's with --loop uvloop (pip install uvloop: not a dependency)."""
    if os.environ.get("BENCH_LOOP") == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def route_payload() -> bytes:
    """One model's RDS response as the control plane sends it (no nonce)."""
    sys.path.insert(0, str(HERE.parent))
    from bench_snapshot import PROXY, make_state

    from controlplane.xds.resources import scope_name
    from controlplane.xds.snapshot import ROUTE, SnapshotBuilder

    state = make_state(1)
    snapshot = SnapshotBuilder(PROXY).build(state)
    name = next(iter(state.models))
    return snapshot.payload(ROUTE, frozenset([scope_name(name)]))


def nonce_field(nonce: str) -> bytes:
    data = nonce.encode()
    return b"\x2a" + bytes([len(data)]) + data  # nonces here are short


def nonce_of(request: bytes) -> bytes:
    """DiscoveryRequest.response_nonce (field 6) of a request as bytes, or b''."""
    from envoy.service.discovery.v3 import discovery_pb2

    return discovery_pb2.DiscoveryRequest.FromString(request).response_nonce.encode()


# -- servers: one process each; stdin "push\n" -> stdout "done <seconds>\n" -------------------


class Pushes:
    """What every server shares: the push under way, and who has ACKed it."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.seq = 0
        self.streams = 0
        self.acked = 0
        self.started = 0.0

    def ack_done(self) -> float | None:
        self.acked += 1
        if self.acked == self.streams:
            return time.perf_counter() - self.started
        return None


def report(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def command_loop(pushes: Pushes, push) -> None:
    """The bench's commands on stdin, for an asyncio server: `streams` (how many are
    connected) and `push` (start a push: `push()` sends it to every stream)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        if line == "streams":
            report(f"streams {pushes.streams}")
        elif line == "push":
            pushes.seq += 1
            pushes.acked = 0
            pushes.started = time.perf_counter()
            if pushes.streams == 0:
                report("done 0")
            push()


def serve_aio(port: int, payload: bytes) -> None:
    pushes = Pushes(payload)
    wakes: set[asyncio.Event] = set()

    async def handler(request_iterator, context):
        wake = asyncio.Event()
        state = {"nonce": b""}

        async def writer():
            seq = 0
            while True:
                await wake.wait()
                wake.clear()
                if pushes.seq != seq:
                    seq = pushes.seq
                    state["nonce"] = str(seq).encode()
                    await context.write(pushes.payload + nonce_field(str(seq)))

        task = asyncio.create_task(writer())
        wakes.add(wake)
        pushes.streams += 1
        try:
            async for request in request_iterator:
                nonce = nonce_of(request)
                if nonce and nonce == state["nonce"]:
                    took = pushes.ack_done()
                    if took is not None:
                        report(f"done {took}")
        finally:
            pushes.streams -= 1
            wakes.discard(wake)
            task.cancel()

    async def main():
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        rpc = grpc.stream_stream_rpc_method_handler(handler, response_serializer=bytes)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ADS_SERVICE, {"StreamAggregatedResources": rpc}),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        report("listening")

        def push() -> None:
            for wake in wakes:
                wake.set()

        await command_loop(pushes, push)
        await server.stop(0)

    run_loop(main())


def serve_sync(port: int, payload: bytes) -> None:
    pushes = Pushes(payload)
    changed = threading.Condition()
    lock = threading.Lock()

    def handler(request_iterator, context):
        state = {"nonce": b"", "seq": pushes.seq}

        def read():
            for request in request_iterator:
                nonce = nonce_of(request)
                if nonce and nonce == state["nonce"]:
                    with lock:
                        took = pushes.ack_done()
                    if took is not None:
                        report(f"done {took}")

        with lock:
            pushes.streams += 1
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            while context.is_active():
                with changed:
                    changed.wait_for(lambda: pushes.seq != state["seq"], timeout=1.0)
                    seq = pushes.seq
                if seq != state["seq"]:
                    state["seq"], state["nonce"] = seq, str(seq).encode()
                    yield pushes.payload + nonce_field(str(seq))
        finally:
            with lock:
                pushes.streams -= 1

    pool = futures.ThreadPoolExecutor(max_workers=4000)
    server = grpc.server(pool, options=[("grpc.so_reuseport", 1)],
                         maximum_concurrent_rpcs=None)  # fmt: skip
    rpc = grpc.stream_stream_rpc_method_handler(handler, response_serializer=bytes)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ADS_SERVICE, {"StreamAggregatedResources": rpc}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    report("listening")
    for line in sys.stdin:
        line = line.strip()
        if line == "streams":
            report(f"streams {pushes.streams}")
        elif line == "push":
            with changed:
                pushes.acked = 0
                pushes.started = time.perf_counter()
                pushes.seq += 1
                if pushes.streams == 0:
                    report("done 0")
                changed.notify_all()
        elif not line:
            break
    server.stop(0)


def serve_raw(port: int, payload: bytes) -> None:
    pushes = Pushes(payload)
    writers: dict = {}  # writer -> the nonce it was last sent

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers[writer] = b""
        pushes.streams += 1
        try:
            while True:
                header = await reader.readexactly(4)
                request = await reader.readexactly(struct.unpack(">I", header)[0])
                nonce = nonce_of(request)
                if nonce and nonce == writers[writer]:
                    took = pushes.ack_done()
                    if took is not None:
                        report(f"done {took}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            pushes.streams -= 1
            writers.pop(writer, None)

    async def main():
        server = await asyncio.start_server(on_client, "127.0.0.1", port, reuse_port=True)
        report("listening")

        def push() -> None:
            for writer in writers:
                writers[writer] = str(pushes.seq).encode()
                message = pushes.payload + nonce_field(str(pushes.seq))
                writer.write(struct.pack(">I", len(message)) + message)

        await command_loop(pushes, push)
        server.close()

    run_loop(main())


# -- clients -------------------------------------------------------------------------------


def run_clients(port: int, streams: int, raw: bool) -> None:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    def request(index: int, nonce: str = "", version: str = "") -> bytes:
        return discovery_pb2.DiscoveryRequest(
            node=base_pb2.Node(id=f"client-{index}") if not nonce else None,
            type_url=RDS, resource_names=["model/m"], response_nonce=nonce,
            version_info=version,
        ).SerializeToString()  # fmt: skip

    async def grpc_client(index: int, ready: asyncio.Event) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.stream_stream(METHOD, request_serializer=bytes,
                                         response_deserializer=bytes)()  # fmt: skip
            await call.write(request(index))
            ready.set()
            while (response := await call.read()) is not grpc.aio.EOF:
                parsed = discovery_pb2.DiscoveryResponse.FromString(response)
                await call.write(request(index, parsed.nonce, parsed.version_info))

    async def raw_client(index: int, ready: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        first = request(index)
        writer.write(struct.pack(">I", len(first)) + first)
        ready.set()
        while True:
            header = await reader.readexactly(4)
            response = await reader.readexactly(struct.unpack(">I", header)[0])
            parsed = discovery_pb2.DiscoveryResponse.FromString(response)
            ack = request(index, parsed.nonce, parsed.version_info)
            writer.write(struct.pack(">I", len(ack)) + ack)

    async def main():
        client = raw_client if raw else grpc_client
        readies = []
        tasks = []
        for index in range(streams):
            ready = asyncio.Event()
            readies.append(ready)
            tasks.append(asyncio.create_task(client(index, ready)))
            if index % 50 == 49:
                await asyncio.sleep(0.05)
        for ready in readies:
            await ready.wait()
        report("ready")
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await reader.read()  # until stdin closes
        for task in tasks:
            task.cancel()

    run_loop(main())


# -- the driver ------------------------------------------------------------------------------


def spawn(args: list[str], log) -> subprocess.Popen:
    """A server or client process of this script; its stderr (gRPC's complaints when the
    streams are cut at the end) goes to `log`."""
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=log, text=True, bufsize=1,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip


def expect(process: subprocess.Popen, prefix: str) -> str:
    line = process.stdout.readline()
    if not line.startswith(prefix):
        raise SystemExit(f"expected {prefix!r}, got {line!r}")
    return line


def measure(mode: str, clients: int, pushes: int, gap: float, client_processes: int) -> dict:
    kind, _, count = mode.partition("x")
    workers = int(count or 1)
    port = free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in `finally`, after the processes)
    servers = [spawn(["--serve", kind, "--port", str(port)], log) for _ in range(workers)]
    client_procs: list[subprocess.Popen] = []
    try:
        for server in servers:
            expect(server, "listening")
        per = [clients // client_processes + (i < clients % client_processes)
               for i in range(client_processes)]  # fmt: skip
        client_procs = [
            spawn(["--client", "--port", str(port), "--streams", str(n)]
                  + (["--raw"] if kind == "raw" else []), log)
            for n in per if n
        ]  # fmt: skip
        for process in client_procs:
            expect(process, "ready")
        deadline = time.monotonic() + 60
        while True:  # every stream accepted by some server
            total = 0
            for server in servers:
                server.stdin.write("streams\n")
                total += int(expect(server, "streams").split()[1])
            if total == clients or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        busy = [server for server in servers]
        for _ in range(3):  # warm-up
            push(busy)
            time.sleep(gap)
        cpu_before = sum(cpu_seconds(server.pid) for server in servers)
        took = []
        for _ in range(pushes):
            took.append(push(busy))
            time.sleep(gap)
        cpu = sum(cpu_seconds(server.pid) for server in servers) - cpu_before
        took.sort()
        return {"mode": mode, "clients": clients, "pushes": pushes,
                "p50": percentile(took, 50), "p90": percentile(took, 90),
                "p99": percentile(took, 99), "max": took[-1],
                "cpu_per_push_ms": cpu / pushes * 1000,
                "cpu_per_client_push_us": cpu / pushes / clients * 1e6}  # fmt: skip
    finally:
        for process in [*client_procs, *servers]:
            with contextlib.suppress(OSError):
                process.stdin.close()
        for process in [*client_procs, *servers]:
            stop(process, grace=5)
        log.close()


def push(servers: list[subprocess.Popen]) -> float:
    """Ask every server process to push; ms until the last of them had every ACK (its own
    clock: from the push order read to its last ACK read)."""
    for server in servers:
        server.stdin.write("push\n")
    return max(float(expect(server, "done").split()[1]) for server in servers) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="aio,sync,aiox2,raw")
    parser.add_argument("--clients", default="1,100,1000")
    parser.add_argument("--pushes", type=int, default=50)
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between pushes")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="the event loop of every process it starts (ADR 0006)")  # fmt: skip
    args = parser.parse_args()
    os.environ["BENCH_LOOP"] = args.loop  # the processes started below inherit it
    if args.serve:
        {"aio": serve_aio, "sync": serve_sync, "raw": serve_raw}[args.serve](
            args.port, route_payload()
        )
        return
    if args.client:
        run_clients(args.port, args.streams, args.raw)
        return
    print(f"load average at start: {os.getloadavg()}, loop {args.loop}", flush=True)
    print(f"payload: {len(route_payload())} bytes + nonce", flush=True)
    rows = []
    for clients in [int(c) for c in args.clients.split(",")]:
        for mode in args.modes.split(","):
            pushes = args.pushes if clients <= 1000 else max(5, args.pushes // 5)
            client_processes = min(args.client_processes, clients)
            row = measure(mode, clients, pushes, args.gap, client_processes)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nload average at the end: {os.getloadavg()}")
    print(f"\n{'mode':>8} {'clients':>7} {'pushes':>6} {'p50 ms':>8} {'p90':>8} {'p99':>8} "
          f"{'max':>8} {'CPU/push ms':>11} {'per client push us':>18}")  # fmt: skip
    for row in rows:
        print(f"{row['mode']:>8} {row['clients']:7d} {row['pushes']:6d} {row['p50']:8.2f} "
              f"{row['p90']:8.2f} {row['p99']:8.2f} {row['max']:8.2f} "
              f"{row['cpu_per_push_ms']:11.2f} {row['cpu_per_client_push_us']:18.1f}")  # fmt: skip


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    main()
