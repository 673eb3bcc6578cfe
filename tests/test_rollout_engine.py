"""The rollout engine's rules, driven in-process with a scripted analysis.

No Envoy here: the engine's contract with Envoy (persist, push, wait for ACK) is exercised
end to end in test_rollouts.py; these tests pin down the phase table, gates and restarts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controlplane.config import parse_config
from controlplane.controller import Controller
from controlplane.errors import Conflict, Invalid, NotFound
from controlplane.health.verdict import Verdict
from controlplane.rollout.engine import RolloutEngine
from controlplane.state import Endpoint

CONFIG = {
    "models": [
        {
            "name": "chat",
            "versions": [
                {"name": "v1", "weight": 100, "backend": {"url": "http://127.0.0.1:1"}},
                {"name": "v2", "weight": 0, "backend": {"url": "http://127.0.0.1:2"}},
                {"name": "v3", "weight": 0, "backend": {"url": "http://127.0.0.1:3"}},
            ],
        }
    ]
}
ANALYSIS = {"interval_seconds": 0.02, "min_requests": 1, "max_error_rate": 0.1}


class ScriptedAnalysis:
    """The engine's `Analysis`, answering verdicts from a list in order; the last repeats."""

    def __init__(self, verdicts) -> None:
        self._verdicts = list(verdicts)
        self.calls = 0

    async def evaluate(self, rollout) -> Verdict:
        verdict = self._verdicts[min(self.calls, len(self._verdicts) - 1)]
        self.calls += 1
        return verdict


def _controller(state_dir: Path, ready=("v1", "v2", "v3")) -> Controller:
    controller = Controller(parse_config(CONFIG), state_dir)
    for name in ready:
        version = controller.state.models["chat"].versions[name]
        controller.set_endpoints("chat", name, [Endpoint(version.backend.url)], "active")
    return controller


async def _until(predicate, timeout: float = 5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


@pytest.fixture
async def engine(tmp_path):
    engines = []

    def make(analysis=None, ready=("v1", "v2", "v3")) -> RolloutEngine:
        controller = _controller(tmp_path, ready)
        engine = RolloutEngine(controller, (lambda rollout: analysis) if analysis else None)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


def canary(*steps, **extra) -> dict:
    return {"model": "chat", "to": "v2", "strategy": "canary", "steps": list(steps), **extra}


async def test_canary_walks_its_steps_and_makes_the_candidate_stable(engine):
    eng = engine()
    doc = await eng.create(
        canary({"set_weight": 20}, {"pause": {"seconds": 0.05}}, {"set_weight": 60})
    )
    # The phase reads `succeeded` from the push on; the rollout ends once Envoy ACKed it.
    await _until(lambda: doc["phase"] == "succeeded" and doc["id"] not in eng.rollouts)
    model = eng.controller.state.models["chat"]
    assert model.weights == {"v1": 0, "v2": 100, "v3": 0}
    assert (model.stable, model.last_good, model.active_rollout) == ("v2", "v1", None)
    seen = [entry["weights"]["v2"] for entry in doc["history"] if entry["event"] == "step"]
    assert seen == [20, 60]
    assert doc["history"][-1]["event"] == "succeeded"
    assert doc["history"][-1]["weights"]["v2"] == 100


async def test_manual_gate_waits_for_resume(engine):
    eng = engine()
    doc = await eng.create(canary({"set_weight": 30}, {"pause": {}}, {"set_weight": 70}))
    await _until(lambda: doc["phase"] == "paused")
    await asyncio.sleep(0.1)
    assert doc["weights"]["v2"] == 30  # holds
    await eng.command(doc["id"], "resume")
    await _until(lambda: doc["phase"] == "succeeded")


async def test_failing_analysis_rolls_back_after_the_failure_limit(engine):
    verdicts = [Verdict("fail", "error rate 0.50 > max_error_rate 0.10")] * 2
    eng = engine(ScriptedAnalysis([Verdict("pass"), *verdicts]))
    spec = canary(
        {"set_weight": 10}, {"pause": {"seconds": 5}}, analysis={**ANALYSIS, "failure_limit": 2}
    )
    doc = await eng.create(spec)
    await _until(lambda: doc["phase"] == "rolled_back")
    assert "error rate 0.50 > max_error_rate 0.10" in doc["message"]
    assert doc["analysis_status"]["result"] == "fail"
    assert eng.controller.state.models["chat"].weights == {"v1": 100, "v2": 0, "v3": 0}
    assert eng.controller.state.models["chat"].stable == "v1"


async def test_inconclusive_holds_the_step(engine):
    scripted = ScriptedAnalysis([Verdict("inconclusive", "3 requests < min_requests 20")])
    eng = engine(scripted)
    doc = await eng.create(canary({"set_weight": 10}, {"set_weight": 50}, analysis=ANALYSIS))
    await _until(lambda: scripted.calls >= 10)
    assert doc["phase"] == "progressing"
    assert doc["weights"]["v2"] == 10
    assert "min_requests" in doc["message"]


async def test_candidate_not_ready_gets_no_traffic(engine):
    eng = engine(ready=("v1",))
    doc = await eng.create(canary({"set_weight": 50}))
    await asyncio.sleep(0.3)
    assert doc["phase"] == "progressing"
    assert "ready endpoint" in doc["message"]
    assert eng.controller.state.models["chat"].weights["v2"] == 0
    eng.controller.set_endpoints("chat", "v2", [Endpoint("http://127.0.0.1:2")], "active")
    await _until(lambda: doc["phase"] == "succeeded")


async def test_transitions_follow_the_phase_table(engine):
    eng = engine()
    doc = await eng.create(canary({"set_weight": 10}, {"pause": {}}))
    await _until(lambda: doc["phase"] == "paused")
    assert (await eng.command(doc["id"], "pause"))["phase"] == "paused"  # a repeat is a no-op
    with pytest.raises(Conflict):
        await eng.create(canary({"set_weight": 10}))
    await eng.command(doc["id"], "abort")
    assert doc["phase"] == "aborted"
    assert eng.controller.state.models["chat"].weights["v1"] == 100
    for action in ("pause", "resume", "promote"):
        with pytest.raises(Conflict):
            await eng.command(doc["id"], action)
    with pytest.raises(NotFound):
        await eng.command("ro-nope", "pause")


async def test_promote_skips_the_remaining_steps(engine):
    eng = engine()
    doc = await eng.create(canary({"set_weight": 10}, {"pause": {}}, {"set_weight": 50}))
    await _until(lambda: doc["phase"] == "paused")
    await eng.command(doc["id"], "promote")
    assert doc["phase"] == "succeeded"
    assert [h["event"] for h in doc["history"]][-2:] == ["promoted", "succeeded"]
    assert eng.controller.state.models["chat"].stable == "v2"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"model": "chat", "to": "v9", "strategy": "immediate"}, "to"),
        ({"model": "chat", "to": "v1", "strategy": "immediate"}, "to"),
        ({"model": "chat", "to": "v2", "from": "v7", "strategy": "immediate"}, "from"),
        ({"model": "chat", "to": "v2", "strategy": "warp"}, "strategy"),
        ({"model": "chat", "to": "v2", "strategy": "canary", "steps": []}, "steps"),
        (
            {"model": "chat", "to": "v2", "strategy": "canary", "steps": [{"set_weight": 101}]},
            "steps[0].set_weight",
        ),
        (
            {
                "model": "chat",
                "to": "v2",
                "strategy": "canary",
                "steps": [{"pause": {"seconds": -1}}],
            },
            "steps[0].pause.seconds",
        ),
        ({"model": "chat", "to": "v2", "strategy": "ab", "weight": 10}, "sticky"),
        ({"model": "chat", "to": "v2", "strategy": "immediate", "weight": 10}, "weight"),
        ({"model": "chat", "to": "v2", "strategy": "immediate", "colour": "red"}, "colour"),
    ],
)
async def test_bad_specs_name_the_field_and_start_nothing(engine, spec, field):
    eng = engine()
    with pytest.raises(Invalid) as caught:
        await eng.create(spec)
    assert caught.value.field == field
    assert eng.list() == ([], None)
    assert eng.controller.state.models["chat"].active_rollout is None


async def test_unknown_model_is_not_found(engine):
    with pytest.raises(NotFound):
        await engine().create({"model": "nope", "to": "v2", "strategy": "immediate"})


async def test_a_restart_resumes_at_the_same_step_with_the_pause_left(engine):
    first = engine()
    doc = await first.create(
        canary({"set_weight": 25}, {"pause": {"seconds": 1.5}}, {"set_weight": 75})
    )
    await _until(lambda: doc["pause_until"] is not None)
    await first.stop()  # as if the process died: nothing is finished or aborted
    first.controller.store.close()

    second = engine()
    assert second.controller.state.models["chat"].weights["v2"] == 25  # restored from the store
    await second.start()
    resumed = second.rollouts[doc["id"]]
    assert resumed["step_index"] == 1
    assert resumed["pause_until"] == pytest.approx(doc["pause_until"])
    assert second.controller.state.models["chat"].active_rollout == doc["id"]
    await _until(lambda: resumed["phase"] == "succeeded", timeout=10)


async def test_emergency_rollback_after_success_undoes_it(engine):
    eng = engine()
    doc = await eng.create({"model": "chat", "to": "v2", "strategy": "immediate"})
    await _until(lambda: doc["phase"] == "succeeded")
    models = await eng.rollback("chat")
    assert models[0]["stable"] == "v1"
    assert eng.controller.state.models["chat"].weights == {"v1": 100, "v2": 0, "v3": 0}


async def test_emergency_rollback_refuses_a_target_without_endpoints(engine):
    eng = engine(ready=("v1", "v2"))
    with pytest.raises(Conflict, match="no ready endpoint"):
        await eng.rollback("chat", to="v3")
    assert eng.controller.state.models["chat"].weights["v1"] == 100


async def test_a_candidate_without_endpoints_is_rolled_back_after_the_grace(engine):
    eng = engine(ScriptedAnalysis([Verdict("pass")]))
    analysis = {**ANALYSIS, "unready_grace_seconds": 0.2}
    doc = await eng.create(
        canary({"set_weight": 30}, {"pause": {"seconds": 30}}, analysis=analysis)
    )
    await _until(lambda: doc["weights"]["v2"] == 30)
    eng.controller.set_endpoints("chat", "v2", [], "error")
    await _until(lambda: doc["phase"] == "rolled_back")
    assert "v2 had no ready endpoint" in doc["message"]
    assert eng.controller.state.models["chat"].weights["v2"] == 0
