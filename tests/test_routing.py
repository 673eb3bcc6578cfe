"""Inference-aware routing inside each version, end to end: `routing: prefix_aware`.

Real `switchyard up` (Envoy, the endpoint picker process, simulator replicas), the openai SDK
through Envoy. A conversation's turns go back to the replica that has its prefix; new
conversations spread; a killed or stopped picker costs no request (Envoy falls back to least
request); and the version split, pins, sticky A/B and mirroring behave exactly as without
the picker (the rollout tests of test_rollouts.py, run again on this stack).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections import Counter, defaultdict

import openai
import pytest

from tests.conftest import InBackground, near_share, switchyard, wait_until
from tests.test_rollouts import (  # noqa: F401  (a fixture and tests, collected here again)
    clean,
    start,
    test_abort_returns_all_traffic_to_from,
    test_blue_green_preview_then_flip,
    test_canary_split_follows_each_step_and_the_gate_holds,
    test_mirror_copies_traffic_to_the_candidate,
    test_sticky_ab_keeps_every_user_on_one_version,
    wait_phase,
)

MODELS = [
    {"name": "llama-3-8b", "routing": "prefix_aware", "versions": [
        {"name": "v1", "weight": 100, "replicas": 3, "backend": {"sim": {}}},
        {"name": "v2", "weight": 0, "backend": {"sim": {}}},
    ]},
    {"name": "qwen-2-7b", "versions": [
        {"name": "v1", "weight": 100, "backend": {"sim": {}}},
        {"name": "v2", "weight": 0, "backend": {"sim": {}}},
    ]},
    # Slow enough that a burst is still in the engines when the picker next reads their load.
    {"name": "mistral-7b", "routing": "prefix_aware", "versions": [
        {"name": "v1", "weight": 100, "replicas": 3, "backend": {"sim": {"ttft_ms": 150}}},
    ]},
]  # fmt: skip
SYSTEM = "You are a helpful assistant. " + " ".join(f"rule{i}" for i in range(150))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with switchyard("up", tmp_path_factory.mktemp("routing"), MODELS) as running:
        yield running


def client_for(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.proxy}/v1", api_key="unused", max_retries=0)


class Conversation:
    """A chat whose every turn resends the whole history, as chat clients do."""

    def __init__(self, name: str, model: str = "llama-3-8b") -> None:
        self.messages = [{"role": "system", "content": SYSTEM}]
        self.name = name
        self.model = model
        self.turns = 0

    def ask(self, client: openai.OpenAI, headers: dict | None = None) -> tuple[str, str]:
        """One turn: (version, replica) that answered."""
        self.messages.append({"role": "user", "content": f"{self.name} question {self.turns} "
                              + " ".join(f"{self.name}{i}" for i in range(40))})  # fmt: skip
        raw = client.chat.completions.with_raw_response.create(
            model=self.model, messages=self.messages, max_tokens=8, extra_headers=headers
        )
        answer = raw.parse().choices[0].message.content
        self.messages.append({"role": "assistant", "content": answer})
        self.turns += 1
        return raw.headers["x-switchyard-version"], raw.headers.get("x-sim-replica", "0")


def picker_metric(stack, name: str) -> float:
    """A series of the picker's, summed, as the controller's /metrics serves it."""
    with urllib.request.urlopen(f"{stack.admin}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))  # fmt: skip


def picker_exchanges(stack) -> dict[str, float]:
    """Envoy's ext_proc counters for the picker: messages it answered, and gRPC streams
    (an HTTP exchange opens none)."""
    url = f"http://{stack.config['listen']['envoy_admin']}/stats?filter=ext_proc.picker"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    counters = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    prefix = "http.switchyard.ext_proc.picker."
    return {"answered": float(counters.get(prefix + "stream_msgs_received", 0)),
            "grpc_streams": float(counters.get(prefix + "streams_started", 0))}  # fmt: skip


def conversations_keep_their_replica(stack, names, model: str = "llama-3-8b") -> None:
    """Every turn of each conversation goes to one replica: the picker's choice, followed
    (least request would move a sequential conversation among idle replicas)."""
    client = client_for(stack)
    conversations = [Conversation(name, model) for name in names]
    homes: dict[str, set] = defaultdict(set)
    for _ in range(4):
        for conversation in conversations:
            homes[conversation.name].add(conversation.ask(client))
    assert all(len(served) == 1 for served in homes.values()), dict(homes)


def test_each_conversation_goes_back_to_the_replica_that_has_its_prefix(stack):
    """On the default transport: Envoy asks the picker over HTTP/1.1 (ext_proc's
    http_service), its choice is followed."""
    conversations_keep_their_replica(stack, ("ana", "bo", "cy", "dee", "eve"))
    assert picker_metric(stack, "switchyard_picker_picks_total") >= 20
    assert picker_metric(stack, "switchyard_picker_matched_blocks_total") > 0
    exchanges = picker_exchanges(stack)
    assert exchanges["answered"] >= 20 and exchanges["grpc_streams"] == 0, exchanges


def test_the_grpc_transport_still_serves_envoy(tmp_path):
    """`picker.transport: grpc`: Envoy asks over gRPC (GIE's protocol) as before, with the
    same choices; the picker still serves both."""
    models = [{"name": "llama-3-8b", "routing": "prefix_aware", "versions": [
        {"name": "v1", "weight": 100, "replicas": 3, "backend": {"sim": {}}}]}]  # fmt: skip
    with switchyard("up", tmp_path, models, picker={"transport": "grpc"}) as stack:
        conversations_keep_their_replica(stack, ("gus", "hal", "ivy"))
        assert picker_metric(stack, "switchyard_picker_picks_total") >= 12
        exchanges = picker_exchanges(stack)
        assert exchanges["answered"] >= 12 and exchanges["grpc_streams"] >= 12, exchanges


def test_new_conversations_arriving_together_are_spread_over_the_replicas(stack):
    """A shared system prompt cached on one replica must not draw a burst of new chats
    there: once it is busier than the others by more than the prefix is worth, they win."""
    client = client_for(stack)
    Conversation("warm", "mistral-7b").ask(client)  # the system prompt is cached on one
    served = Counter()
    lock = threading.Lock()
    together = threading.Barrier(24)

    def one(index: int) -> None:
        conversation = Conversation(f"new{index}x", "mistral-7b")
        together.wait(30)
        result = conversation.ask(client)
        with lock:
            served[result] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(served.values()) == 24, served
    assert set(served) == {("v1", "0"), ("v1", "1"), ("v1", "2")}, served
    assert max(served.values()) < 24 * 2 / 3, served  # no replica takes the burst


class Chats(InBackground):
    """Conversations through Envoy from a thread, counting failures."""

    def __init__(self, stack) -> None:
        self.client = client_for(stack)
        self.ok, self.failed, self.errors = 0, 0, []
        super().__init__()

    def run(self) -> None:
        index = 0
        while not self.stopping.is_set():
            conversation = Conversation(f"load{index}x")
            index += 1
            for _ in range(3):
                try:
                    conversation.ask(self.client)
                    self.ok += 1
                except openai.APIError as exc:
                    self.failed += 1
                    self.errors.append(repr(exc))


def test_a_killed_or_stopped_picker_costs_no_request(stack):
    pid_file = stack.state_dir / "pids" / "picker.pid"
    picks = picker_metric(stack, "switchyard_picker_picks_total")
    with Chats(stack) as chats:
        wait_until(lambda: chats.ok >= 20, message="chats running")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # dead: Envoy goes on without it
        ok = chats.ok
        wait_until(lambda: chats.ok >= ok + 20, message="requests answered without the picker")
        wait_until(lambda: picker_metric(stack, "switchyard_picker_picks_total") > 0,
                   timeout=20, message="the picker restarted and picks again")  # fmt: skip
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGSTOP)  # hung: Envoy waits picker.timeout_ms, then goes on
        try:
            ok = chats.ok
            wait_until(lambda: chats.ok >= ok + 10, message="requests answered past a hung picker")
        finally:
            os.kill(pid, signal.SIGCONT)
        ok = chats.ok
        wait_until(lambda: chats.ok >= ok + 10, message="requests after it resumed")
    assert chats.failed == 0, chats.errors[:3]
    assert picks > 0 and "picker.exited" in stack.logs()


def test_a_canary_split_holds_while_each_version_keeps_its_prefixes(stack, clean):  # noqa: F811
    rollout = start(stack, strategy="canary", steps=[{"set_weight": 20}, {"pause": {}}])
    wait_phase(stack, rollout["id"], "paused")
    client = client_for(stack)
    conversations = [Conversation(f"canary{i}x") for i in range(12)]
    versions: Counter = Counter()
    homes: dict[str, set] = defaultdict(set)
    for _ in range(12):
        for conversation in conversations:
            version, replica = conversation.ask(client)
            versions[version] += 1
            if version == "v1":
                homes[conversation.name].add(replica)
    total = sum(versions.values())
    assert near_share(versions["v2"], total, 0.2), versions
    # Inside v1 a conversation keeps to one replica, whichever turns the split sent there.
    assert all(len(replicas) == 1 for replicas in homes.values()), dict(homes)
    pinned = Conversation("pinned").ask(client, headers={"x-switchyard-version": "v2"})
    assert pinned[0] == "v2"
    stack.api("POST", f"/v1/rollouts/{rollout['id']}/promote")
    wait_phase(stack, rollout["id"], "succeeded")
    assert {Conversation(f"after{i}").ask(client)[0] for i in range(10)} == {"v2"}


def test_the_routes_of_a_least_request_model_never_reach_the_picker(stack):
    picks = picker_metric(stack, "switchyard_picker_picks_total")
    client = client_for(stack)
    for _ in range(10):
        client.completions.create(model="qwen-2-7b", prompt="hello " * 50, max_tokens=1)
    time.sleep(0.2)
    assert picker_metric(stack, "switchyard_picker_picks_total") == picks


def test_a_prefix_aware_model_added_at_run_time_starts_the_picker(tmp_path):
    models = [{"name": "qwen-2-7b", "versions": [
        {"name": "v1", "weight": 100, "backend": {"sim": {}}}]}]  # fmt: skip
    with switchyard("up", tmp_path, models) as stack:
        assert not (stack.state_dir / "pids" / "picker.pid").exists()  # no model needs it
        status, body = stack.api("POST", "/v1/models", {
            "name": "llama-3-8b", "routing": "prefix_aware",
            "versions": [{"name": "v1", "weight": 100, "replicas": 2, "backend": {"sim": {}}}],
        })  # fmt: skip
        assert status == 201, body
        wait_until(lambda: len(stack.api("GET", "/v1/models/llama-3-8b")[1]["versions"][0]
                               ["endpoints"]) == 2, timeout=20, message="both replicas ready")
        client = client_for(stack)
        conversation = Conversation("late")
        wait_until(lambda: conversation.ask(client) and
                   picker_metric(stack, "switchyard_picker_picks_total") > 0, timeout=20,
                   message="the picker started and picks")  # fmt: skip
