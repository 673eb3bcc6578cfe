"""The endpoint picker over real gRPC and real HTTP: the Gateway API Inference Extension's
protocol, and ext_proc's `http_service` (the same messages as JSON).

A picker served in this process (`service.serve`, both transports), asked as Envoy asks it
(an ext_proc stream: gRPC metadata naming the version and its candidates, the body in one
message; or a chunked JSON POST with them as request attributes), and as a GIE gateway
would (candidates in metadata `envoy.lb.subset_hint`, or a headers-only exchange). Real
simulators behind it give the load it reads. The JSON is written and read with protobuf's
own JSON mapping, as Envoy writes and reads it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.request

import aiohttp
import grpc
import pytest
from aiohttp import web
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from google.protobuf import json_format

from controlplane import prompt
from controlplane.picker import http_service
from controlplane.picker.service import Picker, Settings, serve
from controlplane.sim import SimConfig, make_app
from controlplane.xds.resources import EXT_PROC, PICKER_ATTRIBUTES, PICKER_HTTP_PATH
from tests.conftest import free_port, require_native_picker, wait_until

DESTINATION = "x-gateway-destination-endpoint"
SYSTEM = " ".join(f"rule{i}" for i in range(200))


class Servers:
    """Simulators on free ports, in a thread of their own (the picker reads their metrics)."""

    def __init__(self, count: int, **config) -> None:
        self.ports = [free_port() for _ in range(count)]
        self.loop = asyncio.new_event_loop()
        self.runners: list[web.AppRunner] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        for port in self.ports:
            asyncio.run_coroutine_threadsafe(self._start(port, config), self.loop).result(10)

    async def _start(self, port: int, config: dict) -> None:
        runner = web.AppRunner(make_app(SimConfig(model="m", **config)))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.runners.append(runner)

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]

    def close(self) -> None:
        for runner in self.runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def servers():
    running = Servers(3)
    yield running
    running.close()


ENGINES = ("native", "python")  # every behaviour below holds for both (service.Picker)


@pytest.fixture(params=ENGINES)
def served(request):
    """A picker serving both transports on free ports: its gRPC channel and HTTP port."""
    with serving(scrape_interval_s=0.05, engine=request.param) as ports:
        yield ports


@contextlib.contextmanager
def serving(**settings):
    """Serve a picker with these settings on free ports: its gRPC channel and HTTP port.
    The native engine must be built (`make test` builds it): if not, this skips, under CI
    it fails."""
    if settings.get("engine") == "native":
        require_native_picker()
    port, http_port = free_port(), free_port()
    stop = threading.Event()
    settings = Settings(listen=f"127.0.0.1:{port}", http=f"127.0.0.1:{http_port}", **settings)
    thread = threading.Thread(target=serve, args=(settings, stop), daemon=True)
    thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel, http_port
    finally:
        channel.close()
        stop.set()
        thread.join(10)


@pytest.fixture
def picker(served):
    """The picker's gRPC channel."""
    return served[0]


@pytest.fixture
def over_http(served):
    """Ask the picker over HTTP as Envoy's http_service does, on one kept-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", served[1], timeout=5)
    yield lambda *args, **kwargs: ask_http(connection, *args, **kwargs)
    connection.close()


def ask(channel, body: dict | None, metadata=(), hint: list[str] | None = None,
        headers_only: bool = False) -> ext_proc.ProcessingResponse:  # fmt: skip
    """One ext_proc stream as Envoy opens it; the picker's answer."""
    process = channel.stream_stream(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
        request_serializer=ext_proc.ProcessingRequest.SerializeToString,
        response_deserializer=ext_proc.ProcessingResponse.FromString,
    )
    request = processing_request(body, hint, headers_only)
    return next(iter(process(iter([request]), metadata=metadata, timeout=5)))


def processing_request(body: dict | None, hint: list[str] | None,
                       headers_only: bool) -> ext_proc.ProcessingRequest:  # fmt: skip
    """The message Envoy sends: the buffered body (or only the headers), GIE's subset hint."""
    request = ext_proc.ProcessingRequest()
    if headers_only:
        request.request_headers.SetInParent()
        request.protocol_config.request_body_mode = processing_mode_pb2.ProcessingMode.NONE
    else:
        request.request_body.body = json.dumps(body).encode()
        request.request_body.end_of_stream = True
        request.protocol_config.request_body_mode = processing_mode_pb2.ProcessingMode.BUFFERED
    if hint is not None:
        subset = request.metadata_context.filter_metadata["envoy.lb.subset_hint"]
        subset.fields["x-gateway-destination-endpoint-subset"].list_value.extend(hint)
    return request


def ask_http(connection, body: dict | None, candidates: list[str] | None = None,
             version: str = "m@v1", hint: list[str] | None = None,
             headers_only: bool = False) -> ext_proc.ProcessingResponse:  # fmt: skip
    """One ProcessingRequest as Envoy's http_service POSTs it (JSON with proto field names,
    chunked, the route's attributes); the JSON answer read as Envoy reads it."""
    request = processing_request(body, hint, headers_only)
    if candidates is not None:
        attributes = request.attributes[EXT_PROC]
        attributes.update({PICKER_ATTRIBUTES[0]: version,
                           PICKER_ATTRIBUTES[1]: ",".join(candidates)})  # fmt: skip
    # Compact, fields in proto order: byte for byte what Envoy writes (its body leads).
    message = json.dumps(json_format.MessageToDict(request, preserving_proto_field_name=True),
                         separators=(",", ":")).encode()  # fmt: skip
    connection.putrequest("POST", PICKER_HTTP_PATH)
    connection.putheader("content-type", "application/json")
    connection.putheader("transfer-encoding", "chunked")
    connection.endheaders()
    connection.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(message), message))
    response = connection.getresponse()
    payload = response.read()
    assert response.status == 200, payload
    return json_format.Parse(payload, ext_proc.ProcessingResponse())


def chosen(response: ext_proc.ProcessingResponse) -> list[str]:
    """The endpoints the picker answered with, as Envoy's override_host reads them; the
    header mutation must say the same (the GIE protocol sets both)."""
    lb = response.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DESTINATION]
    kind = response.WhichOneof("response")
    headers = getattr(response, kind).response.header_mutation.set_headers
    header = next(h.header for h in headers if h.header.key == DESTINATION)
    assert header.raw_value.decode() == lb.string_value
    return lb.string_value.split(",")


def chat(conversation: str, turns: int) -> dict:
    messages = [{"role": "system", "content": SYSTEM}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"{conversation} turn {turn} " * 20})
        messages.append({"role": "assistant", "content": "the quick brown fox " * 5})
    messages.append({"role": "user", "content": f"{conversation} next question " * 20})
    return {"model": "m", "messages": messages}


def pool(servers: Servers, version: str = "m@v1") -> tuple[tuple[str, str], ...]:
    return (("x-switchyard-pool", version),
            ("x-gateway-destination-endpoint-subset", ",".join(servers.endpoints)))  # fmt: skip


def test_each_conversation_goes_back_to_the_endpoint_that_has_its_prefix(picker, servers):
    homes = {}
    for conversation in ("alpha", "beta", "gamma", "delta"):
        first = chosen(ask(picker, chat(conversation, 0), pool(servers)))
        assert sorted(first) == sorted(servers.endpoints)  # every candidate, best first
        homes[conversation] = first[0]
    for turn in range(1, 4):
        time.sleep(0.12)  # the last turns are over: a read of the metrics says so
        for conversation, home in homes.items():
            assert chosen(ask(picker, chat(conversation, turn), pool(servers)))[0] == home


@pytest.mark.parametrize("engine", ENGINES)
def test_a_sequential_client_keeps_its_conversations_at_home_without_pausing(engine):
    """Each turn is sent to the endpoint the picker chose and answered before the next one
    is asked, back to back, at the default pace of reads (100 ms): once the picker has read
    how long requests stay in those engines, requests that ended between two reads do not
    make an endpoint look busy enough to move a conversation from its history (from the
    second turn on, three blocks more than the system prompt every endpoint has)."""
    servers = Servers(3, prefill_ms_per_token=0.01)  # short requests: many between reads
    with (serving(engine=engine) as (_, http_port), contextlib.closing(servers),
          contextlib.closing(http.client.HTTPConnection("127.0.0.1", http_port,
                                                        timeout=5)) as connection):  # fmt: skip
        conversations = {f"chat{index}": [{"role": "system", "content": SYSTEM}]
                         for index in range(10)}  # fmt: skip
        homes: dict[str, set] = {name: set() for name in conversations}
        for turn in range(4):
            if turn == 1:
                time.sleep(0.25)  # the first turns are over: reads measure how long they took
            for name, messages in conversations.items():
                messages.append({"role": "user", "content": f"{name} asks {turn} " * 60})
                body = {"model": "m", "messages": messages, "max_tokens": 4}
                home = chosen(ask_http(connection, body, servers.endpoints))[0]
                homes[name].add(home)
                messages.append({"role": "assistant", "content": complete(home, body)})
    assert all(len(served) == 1 for served in homes.values()), homes


def complete(endpoint: str, body: dict) -> str:
    """The simulator at `endpoint` answers this chat request: its answer."""
    request = urllib.request.Request(f"http://{endpoint}/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def test_a_burst_of_new_prompts_is_spread_over_the_endpoints(picker, servers):
    firsts = [chosen(ask(picker, {"model": "m", "prompt": f"unrelated prompt {i} " * 30},
                         pool(servers)))[0] for i in range(9)]  # fmt: skip
    assert set(firsts) == set(servers.endpoints)  # sent ones count until the next read


def test_an_endpoint_busier_than_the_others_and_short_of_kv_cache_loses_its_prefix(picker):
    busy_servers = Servers(3, max_num_seqs=1, kv_cache_tokens=512, ttft_ms=5000)
    try:
        home = chosen(ask(picker, chat("alpha", 1), pool(busy_servers)))[0]
        # Six long requests straight to that server: one runs, five wait, KV cache ~90 % full.
        hog = json.dumps({"model": "m", "prompt": "x " * 400, "max_tokens": 50}).encode()
        index = busy_servers.endpoints.index(home)
        url = f"http://{home}/v1/completions"
        tasks = [asyncio.run_coroutine_threadsafe(_post(url, hog), busy_servers.loop)
                 for _ in range(6)]  # fmt: skip
        wait_until(lambda: _waiting(busy_servers, index) >= 5, message="the server queues")
        time.sleep(0.2)  # two reads of its metrics
        assert chosen(ask(picker, chat("alpha", 2), pool(busy_servers)))[0] != home
        for task in tasks:
            task.cancel()
    finally:
        busy_servers.close()


def test_an_endpoint_that_does_not_answer_is_listed_last_until_it_is_back(picker, servers):
    """Its metrics cannot be read (nothing listens): every answer names it last. Once a
    server listens there, it is read again and chosen like the others."""
    port = free_port()
    candidates = [*servers.endpoints, f"127.0.0.1:{port}"]
    metadata = (("x-switchyard-pool", "m@v1"),
                ("x-gateway-destination-endpoint-subset", ",".join(candidates)))  # fmt: skip
    ask(picker, {"model": "m", "prompt": "first"}, metadata)
    time.sleep(0.2)  # a few reads
    for i in range(6):
        answer = ask(picker, {"model": "m", "prompt": f"while down {i} " * 30}, metadata)
        assert chosen(answer)[-1] == candidates[-1]
    asyncio.run_coroutine_threadsafe(servers._start(port, {}), servers.loop).result(10)
    time.sleep(0.2)
    firsts = [chosen(ask(picker, {"model": "m", "prompt": f"back {i} " * 30}, metadata))[0]
              for i in range(8)]  # fmt: skip
    assert candidates[-1] in firsts


def test_a_gateway_may_send_the_candidates_as_gie_subset_hint(picker, servers):
    answer = ask(picker, {"model": "m", "prompt": "hello " * 100}, hint=servers.endpoints)
    assert sorted(chosen(answer)) == sorted(servers.endpoints)


def test_without_a_body_the_choice_is_made_on_the_headers_by_load(picker, servers):
    answer = ask(picker, None, pool(servers), headers_only=True)
    assert answer.WhichOneof("response") == "request_headers"
    assert sorted(chosen(answer)) == sorted(servers.endpoints)


def test_without_candidates_the_picker_changes_nothing(picker):
    """Envoy then picks by least request: no endpoint named, no metadata."""
    answer = ask(picker, {"model": "m", "prompt": "hello"})
    assert answer.WhichOneof("response") == "request_body"
    assert not answer.dynamic_metadata.fields
    assert not answer.request_body.response.header_mutation.set_headers


def test_over_http_each_conversation_goes_back_to_the_endpoint_that_has_its_prefix(
    over_http, servers
):
    homes = {}
    for conversation in ("alpha", "beta", "gamma"):
        first = chosen(over_http(chat(conversation, 0), servers.endpoints))
        assert sorted(first) == sorted(servers.endpoints)
        homes[conversation] = first[0]
    for turn in range(1, 3):
        time.sleep(0.12)
        for conversation, home in homes.items():
            assert chosen(over_http(chat(conversation, turn), servers.endpoints))[0] == home


def test_both_transports_serve_one_picker(picker, over_http, servers):
    """One decision, one memory: a conversation begun over gRPC goes on over HTTP (a GIE
    gateway and Switchyard's Envoy in front of the same picker)."""
    home = chosen(ask(picker, chat("omega", 0), pool(servers)))[0]
    time.sleep(0.12)
    assert chosen(over_http(chat("omega", 1), servers.endpoints))[0] == home


def test_over_http_a_gateway_may_send_the_candidates_as_gie_subset_hint(over_http, servers):
    answer = over_http({"model": "m", "prompt": "hello " * 100}, hint=servers.endpoints)
    assert sorted(chosen(answer)) == sorted(servers.endpoints)


def test_over_http_without_a_body_the_choice_is_made_on_the_headers(over_http, servers):
    answer = over_http(None, servers.endpoints, headers_only=True)
    assert answer.WhichOneof("response") == "request_headers"
    assert sorted(chosen(answer)) == sorted(servers.endpoints)


def test_over_http_without_candidates_the_picker_changes_nothing(over_http):
    answer = over_http({"model": "m", "prompt": "hello"})
    assert answer.WhichOneof("response") == "request_body"
    assert not answer.dynamic_metadata.fields
    assert not answer.request_body.response.header_mutation.set_headers


def test_a_body_envoy_did_not_write_first_or_plainly_is_read_the_same():
    """The body is decoded straight from Envoy's compact JSON where it leads; any other
    spelling of the same request (indented, body later, an escaped `/`) gives the same
    request and body through the JSON parser."""
    body = json.dumps(chat("delta", 2)).encode() + bytes(range(256))  # base64 with + and /
    encoded = base64.b64encode(body).decode()
    assert "/" in encoded and "+" in encoded
    rest = {"attributes": {EXT_PROC: {PICKER_ATTRIBUTES[0]: "m@v1"}}}
    spellings = [
        json.dumps({"request_body": {"body": encoded, "end_of_stream": True}, **rest},
                   separators=(",", ":")),  # what Envoy writes
        json.dumps({"request_body": {"body": encoded, "end_of_stream": True}, **rest},
                   indent=2),
        json.dumps({**rest, "request_body": {"end_of_stream": True, "body": encoded}}),
        json.dumps({"request_body": {"body": encoded, "end_of_stream": True}, **rest},
                   separators=(",", ":")).replace("/", "\\/"),
    ]  # fmt: skip
    for spelling in spellings:
        request, decoded = http_service._parse(spelling.encode())
        assert decoded == body, spelling[:60]
        assert request["attributes"] == rest["attributes"]
        assert request["request_body"]["end_of_stream"] is True


def test_the_http_service_answers_only_ext_proc_posts(served):
    """Anything else gets an error status (Envoy would go on without the picker); what it
    cannot frame also closes the connection."""
    port = served[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for method, path, body, status in (("GET", PICKER_HTTP_PATH, None, 405),
                                       ("POST", "/other", b"{}", 404),
                                       ("POST", PICKER_HTTP_PATH, b"not json", 400),
                                       ("POST", PICKER_HTTP_PATH, b"[1]", 400)):  # fmt: skip
        connection.request(method, path, body)
        response = connection.getresponse()
        response.read()
        assert response.status == status, (method, path, body)
    connection.request("POST", PICKER_HTTP_PATH, b'{"request_trailers": {}}')
    answer = connection.getresponse()  # the same kept-alive connection, still answering
    assert json.loads(answer.read()) == {"request_trailers": {}}
    connection.close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"POST /ext_proc HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
        reply = b""
        while chunk := raw.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 400 ") and b"connection: close" in reply


def test_a_request_arriving_in_pieces_is_taken_once_whole():
    """TCP may cut Envoy's chunked POST anywhere; two may follow on one connection."""
    from controlplane.picker.http_service import next_request

    message = b'{"request_body": {"body": "e30="}}'
    one = (b"POST /ext_proc HTTP/1.1\r\nhost: p\r\ntransfer-encoding: chunked\r\n\r\n"
           b"%x\r\n%s\r\n0\r\n\r\n" % (len(message), message))  # fmt: skip
    for cut in range(len(one)):
        assert next_request(bytearray(one[:cut])) is None
    two = b"POST /ext_proc HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}"
    method, path, body, keep_alive, taken = next_request(bytearray(one + two))
    assert (method, path, body, keep_alive, taken) == (b"POST", b"/ext_proc", message, True,
                                                       len(one))  # fmt: skip
    assert next_request(bytearray(two))[2] == b"{}"


def test_the_picker_and_the_simulator_cut_a_prompt_into_the_same_blocks():
    """The picker's view of a server's cache is only as good as this agreement."""
    body = chat("alpha", 2)
    text = prompt.prompt_text(body)
    assert text.startswith("system\n" + SYSTEM)
    size = prompt.block_chars()
    hashes = prompt.block_hashes(text, size)
    assert len(hashes) == len(text) // size == len(text) // 64
    longer = prompt.block_hashes(prompt.prompt_text(chat("alpha", 3)), size)
    shared = len(prompt.prompt_text(chat("alpha", 2)).rsplit("\nuser\n", 1)[0]) // size
    assert longer[:shared] == hashes[:shared]  # one conversation: a common prefix
    assert prompt.block_hashes(text, size, limit=5) == hashes[:5]


async def _post(url: str, body: bytes) -> None:
    async with aiohttp.ClientSession() as session, session.post(
        url, data=body, headers={"content-type": "application/json"}
    ) as response:
        await response.read()


def _waiting(servers: Servers, index: int) -> float:
    with urllib.request.urlopen(f"http://{servers.endpoints[index]}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vllm:num_requests_waiting{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0



def test_the_picker_reads_real_vllm_metrics():
    """An exposition captured from vLLM 0.32 (tests/fixtures/vllm/): the series the picker
    scores on are found there, under vLLM's names and labels."""
    from pathlib import Path

    from controlplane.picker.load import parse

    found = parse((Path(__file__).parent / "fixtures" / "vllm" / "metrics.txt").read_bytes())
    assert set(found) == {"waiting", "running", "kv_cache", "queries", "finished", "finished_s"}
    assert found["queries"] > 0
    assert found["finished"] > 0 and found["finished_s"] > 0  # how long requests stay


@pytest.mark.parametrize("engine", ENGINES)
def test_every_answer_is_counted_in_the_pickers_metrics(engine, servers):
    """switchyard_picker_*: picks by version and reason, the blocks looked up and found, and
    the time per answer, whichever engine decides and over either transport."""
    from prometheus_client.parser import text_string_to_metric_families

    metrics_port = free_port()
    with (serving(engine=engine, metrics=f"127.0.0.1:{metrics_port}") as (channel, http_port),
          contextlib.closing(http.client.HTTPConnection("127.0.0.1", http_port,
                                                        timeout=5)) as connection):  # fmt: skip
        for turn in range(3):
            ask_http(connection, chat("alpha", turn), servers.endpoints)
        ask_http(connection, {"model": "m", "prompt": "hello"})  # no candidates
        ask(channel, chat("beta", 0), pool(servers))
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            exposition = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples[(sample.name, labels)] = sample.value

    def value(name: str, **labels) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    version = {"model": "m", "version": "v1"}
    picks = sum(value("switchyard_picker_picks_total", **version, reason=reason)
                for reason in ("prefix", "load"))  # fmt: skip
    assert picks == 4
    assert value("switchyard_picker_picks_total", model="", version="", reason="none") == 1
    assert value("switchyard_picker_picks_total", **version, reason="prefix") >= 2  # turns 1, 2
    prompt_blocks = value("switchyard_picker_prompt_blocks_total", **version)
    assert prompt_blocks > value("switchyard_picker_matched_blocks_total", **version) > 0
    assert value("switchyard_picker_pick_seconds_count") == 5
    assert value("switchyard_picker_pick_seconds_bucket", le="+Inf") == 5


def test_the_native_engine_cuts_prompts_into_the_blocks_the_python_one_does():
    """Both count characters (code points, whatever the JSON escapes) and hash each block
    chained over the ones before it: the same number of blocks, a shared prefix gives the
    same leading hashes, and a different one does not."""
    require_native_picker()
    picker = Picker(Settings(engine="native"))
    try:
        size, limit = prompt.block_chars(64), 8192 // 64
        for body in (chat("alpha", 2), {"model": "m", "prompt": "héllo wörld 😀 \u2028 " * 80},
                     {"model": "m", "messages": [{"role": "user", "content": [
                         {"type": "text", "text": "part one " * 40},
                         {"type": "image_url", "image_url": {"url": "x"}},
                         {"type": "text", "text": "part two " * 40}]}]}):  # fmt: skip
            text = prompt.prompt_text(body)
            hashes, tokens = picker.native.blocks(json.dumps(body).encode())
            assert len(hashes) == len(prompt.block_hashes(text, size, limit)) > 0
            assert tokens == len(text) // prompt.CHARS_PER_TOKEN
        two, _ = picker.native.blocks(json.dumps(chat("alpha", 2)).encode())
        three, _ = picker.native.blocks(json.dumps(chat("alpha", 3)).encode())
        shared = len(prompt.prompt_text(chat("alpha", 2)).rsplit("\nuser\n", 1)[0]) // size
        assert three[:shared] == two[:shared]
        other, _ = picker.native.blocks(json.dumps(chat("beta", 2)).encode())
        system = len("system\n" + SYSTEM) // size
        assert other[:system] == two[:system] and other[system + 1] != two[system + 1]
        assert picker.native.blocks(b"not json") == ([], 0)
    finally:
        picker.close()


def test_both_engines_count_a_pick_time_in_the_same_bucket():
    """switchyard_picker_pick_seconds' bounds are written twice (metrics.py, _native.c): on
    each bound, just above it, below the first and beyond the last, the same bucket."""
    from controlplane.picker.metrics import PICK_BUCKETS, Decisions

    require_native_picker()
    picker, python = Picker(Settings(engine="native")), Decisions()
    try:
        for seconds in (0.0, *PICK_BUCKETS, *(bound * 1.01 for bound in PICK_BUCKETS), 5.0):
            picker.native.observe(seconds)
            python.observe(seconds)
        native = picker.native.stats()
        assert native["pick_buckets"] == python.stats()["pick_buckets"]
        assert native["pick_sum"] == pytest.approx(python.stats()["pick_sum"])
    finally:
        picker.close()


def test_without_the_native_engine_auto_decides_in_python_and_native_refuses(monkeypatch):
    """An install without a C compiler: `auto` (the default) runs the Python engine; asking
    for `native` is an error that says why, not a silent fallback."""
    from controlplane.picker import service

    monkeypatch.setattr(service, "native_missing", lambda: "not built at install")
    assert service.Picker(Settings(engine="auto")).engine == "python"
    with pytest.raises(RuntimeError, match="not built at install"):
        service.Picker(Settings(engine="native"))


def _json_values():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=12)  # fmt: skip


def test_the_native_http_port_answers_or_closes_whatever_it_is_sent():
    """The native engine parses HTTP, JSON and base64 in C: any bytes, any JSON in the
    envelope or the body, get an HTTP answer or a closed connection, never a crash, and the
    port goes on answering Envoy's requests. (Loopback only, but treated as hostile.)"""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    def post(message: bytes, chunked: bool) -> bytes:
        if chunked:
            return (b"POST /ext_proc HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
                    b"%x\r\n%s\r\n0\r\n\r\n" % (len(message), message))  # fmt: skip
        return b"POST /ext_proc HTTP/1.1\r\ncontent-length: %d\r\n\r\n%s" % (len(message),
                                                                              message)  # fmt: skip

    envelopes = st.builds(
        lambda body, rest, first: json.dumps(
            {"request_body": {"body": base64.b64encode(json.dumps(body).encode()).decode()},
             **rest} if first else {**rest, "request_body": {"body": body}}).encode(),
        _json_values(), st.dictionaries(st.text(max_size=12), _json_values(), max_size=3),
        st.booleans())  # fmt: skip
    messages = st.one_of(
        st.binary(max_size=600),
        st.builds(post, st.binary(max_size=400) | envelopes, st.booleans()),
        st.builds(lambda head, tail: head + tail,
                  st.sampled_from([b"POST /ext_proc HTTP/1.1\r\n", b"GET / HTTP/1.0\r\n",
                                   b"POST /ext_proc HTTP/1.1\r\ntransfer-encoding: chunked\r\n"]),
                  st.binary(max_size=300)),
    )  # fmt: skip

    with serving(engine="native") as (_, http_port):

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
        @given(messages)
        def exchange(data: bytes) -> None:
            with socket.create_connection(("127.0.0.1", http_port), timeout=5) as raw:
                raw.sendall(data)
                raw.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := raw.recv(65536):
                    reply += chunk
            assert reply == b"" or reply.startswith(b"HTTP/1.1 "), reply[:80]
            assert b"HTTP/1.1 500" not in reply

        exchange()
        with contextlib.closing(http.client.HTTPConnection("127.0.0.1", http_port,
                                                           timeout=5)) as connection:
            answer = ask_http(connection, {"model": "m", "prompt": "still here"},
                              ["127.0.0.1:1", "127.0.0.1:2"])  # fmt: skip
            assert sorted(chosen(answer)) == ["127.0.0.1:1", "127.0.0.1:2"]
