"""The rollout engine: one asyncio task per active rollout, walking its strategy's plan.

Phases and the commands that move between them are an explicit table (TRANSITIONS). Every
change of a rollout goes through `_commit`: the rollout document and the model's traffic are
persisted in one transaction, pushed to every Envoy, and only then recorded as done (history,
event). A restart reloads active rollouts from the store and resumes them at the same step,
honouring the pause time left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from controlplane import logs, metrics
from controlplane.config import validate_body
from controlplane.controller import PARKED_STATES, Controller, Traffic
from controlplane.errors import Conflict, EnvoyRejected, Invalid, NotFound, SwitchyardError
from controlplane.rollout.analysis import Analysis, NoAnalysis, Verdict
from controlplane.rollout.spec import RolloutSpec
from controlplane.rollout.strategies import Pause, Plan, SetWeight, plan_for
from controlplane.state import Model, TrafficPolicy

log = logs.get("rollout")
ACTIVE = ("progressing", "paused")
PHASES = ("progressing", "paused", "succeeded", "aborted", "rolled_back")
# command -> {phase it may start from: phase it leads to}. Same-phase entries make repeats no-ops.
TRANSITIONS: dict[str, dict[str, str]] = {
    "pause": {"progressing": "paused", "paused": "paused"},
    "resume": {"paused": "progressing", "progressing": "progressing"},
    "promote": {"progressing": "succeeded", "paused": "succeeded"},
    "abort": {"progressing": "aborted", "paused": "aborted", "aborted": "aborted"},
}
WAIT_FOR_READY_S = 0.2
WAKE_RETRY_S = 2.0
HISTORY_LIMIT = 500

AnalysisFactory = Callable[[dict[str, Any]], Analysis]


class RolloutEngine:
    def __init__(self, controller: Controller, analysis_for: AnalysisFactory | None = None) -> None:
        self.controller = controller
        self.analysis_for = analysis_for or (lambda rollout: NoAnalysis())
        self.rollouts: dict[str, dict[str, Any]] = {}  # active rollouts by id
        self._tasks: dict[str, asyncio.Task] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._lock = asyncio.Lock()  # transitions one at a time, commands and steps alike
        self._side_tasks: set[asyncio.Task] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume the rollouts that were active when the control plane stopped."""
        for doc in self.controller.store.active_rollouts():
            model = self.controller.state.models.get(doc["model"])
            if model is None or {doc["from"], doc["to"]} - set(model.versions):
                doc.update(phase="aborted", message="model or version no longer configured")
                self.controller.store.save(rollouts=[doc])
                continue
            model.active_rollout = doc["id"]
            self.rollouts[doc["id"]] = doc
            self.controller.rebuild([model.name])  # its routes retry as during any rollout
            logs.event(log, "rollout.resumed_after_restart", id=doc["id"], step=doc["step_index"])
            self._spawn(doc)

    async def stop(self) -> None:
        """Stop the tasks, not the rollouts: they resume on the next start."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- queries -----------------------------------------------------------------------------

    def get(self, rollout_id: str) -> dict[str, Any]:
        """An active rollout (the live document), else any stored one, however old."""
        doc = self.rollouts.get(rollout_id) or self.controller.store.rollout(rollout_id)
        if doc is None:
            raise NotFound(f"unknown rollout {rollout_id!r}", field="id")
        return doc

    def list(
        self,
        model: str | None = None,
        active: bool | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page, newest first, and the cursor of the next page (None on the last)."""
        return self.controller.store.rollouts(model, active, limit, before)

    # -- commands ----------------------------------------------------------------------------

    async def create(self, body: Any) -> dict[str, Any]:
        """Validate a rollout spec against the model; start it. Raises before changing anything."""
        spec = parse_spec(body)
        model = self.controller.state.model(spec.model)
        source = spec.from_ or model.stable
        for field, version in (("to", spec.to), ("from", source)):
            if version not in model.versions:
                raise Invalid(
                    f"model {model.name!r} has no version {version!r} "
                    f"(versions: {', '.join(model.versions)})",
                    field=field,
                )
        if spec.to == source:
            raise Invalid(f"'to' and 'from' are both {source!r}: nothing to roll out", field="to")
        _check_adapter_analysis(model, (spec.to, source), spec.analysis)
        async with self._lock:
            if model.active_rollout:
                raise Conflict(
                    f"model {model.name!r} already has an active rollout ({model.active_rollout})",
                    field="model",
                )
            now = time.time()
            doc = {
                **spec.to_json(),
                "id": f"ro-{uuid.uuid4().hex[:10]}",
                "from": source,
                "phase": "progressing",
                "step_index": 0,
                "steps_total": len(plan_for(spec).steps),
                "weights": model.weights,
                "message": "starting",
                "analysis_status": None,
                "history": [],
                "created_at": now,
                "updated_at": now,
                "pause_until": None,
                "pause_left": None,
                "failures": 0,
                "unready_since": None,
                "candidate_crashes": model.versions[spec.to].crashes,
            }
            _record(doc, "started", "starting")
            self.controller.store.save(rollouts=[doc])
            model.active_rollout = doc["id"]
            self.rollouts[doc["id"]] = doc
        metrics.rollouts_started.labels(model.name, spec.strategy).inc()
        self._emit("rollout.started", doc)
        self._spawn(doc)
        return doc

    async def command(self, rollout_id: str, action: str) -> dict[str, Any]:
        """pause | resume | promote | abort; 409 when the phase does not allow it."""
        async with self._lock:
            doc = self.get(rollout_id)
            target = TRANSITIONS[action].get(doc["phase"])
            if target is None:
                raise Conflict(f"cannot {action} a rollout that is {doc['phase']}", field="phase")
            if target == doc["phase"]:
                return doc  # a repeat: nothing to do
            try:
                if action == "pause":
                    self._hold_pause_timer(doc)
                    await self._commit(doc, "paused", "paused", "paused by request")
                elif action == "resume":
                    self._resume_from_gate(doc)
                    await self._commit(doc, "resumed", "progressing", "resumed")
                elif action == "promote":
                    await self._cancel_task(doc["id"])
                    await self._finish(
                        doc, "succeeded", "promoted", "promoted: all traffic to the candidate"
                    )
                else:
                    await self._cancel_task(doc["id"])
                    await self._finish(doc, "aborted", "aborted", "aborted: all traffic back")
            finally:
                # A rollout still active has a task: after a refused promotion (its task was
                # cancelled) and on resume after its task stopped on an error (see _halt).
                if doc["phase"] in ACTIVE and rollout_id not in self._tasks:
                    self._spawn(doc)
        self._wake_task(rollout_id)
        return doc

    async def rollback(
        self, model_name: str | None = None, everything: bool = False, to: str | None = None
    ) -> list[dict[str, Any]]:
        """The emergency brake: abort, and 100 % to the last known-good version, ACKed.

        No analysis and no waiting on anything but the Envoys' ACK: one snapshot for all
        the models concerned.
        """
        state = self.controller.state
        models = list(state.models.values()) if everything else [state.model(model_name or "")]
        self._check_targets(models, to, parked_ok=True)  # refused before anything is woken
        woken = await self._wake_targets(models, to)
        async with self._lock:
            targets = self._check_targets(models, to, parked_ok=False)
            docs = []
            for model in models:
                if model.active_rollout:
                    doc = self.rollouts[model.active_rollout]
                    await self._cancel_task(doc["id"])
                    message = f"emergency rollback to {targets[model.name]}"
                    if model.name in woken:
                        message += f" (woken in {woken[model.name]:.2f}s)"
                    doc.update(phase="aborted", message=message)
                    _record(doc, "aborted", doc["message"])
                    docs.append(doc)
            changes = {name: Traffic(_all_to(state.models[name], t)) for name, t in targets.items()}
            try:
                await self.controller.apply_traffic(changes, rollouts=docs, undo_on_reject=False)
            except EnvoyRejected:
                for doc in docs:  # applied and persisted all the same: the rollouts are over
                    self._close(doc, "aborted")
                raise
            for doc in docs:
                self._close(doc, "aborted")
            for name, target in targets.items():
                metrics.rollbacks.labels(name, "emergency").inc()
                logs.event(log, "rollback.emergency", logging.WARNING, model=name, to=target,
                           woken_s=f"{woken[name]:.3f}" if name in woken else "-")  # fmt: skip
        return [state.models[name].to_json() for name in targets]

    def _check_targets(
        self, models: list[Model], to: str | None, parked_ok: bool
    ) -> dict[str, str]:
        """Each model's rollback target, by name; Invalid or Conflict (naming `to`) if one has
        none to go to. With `parked_ok`, a parked target passes: it is woken next."""
        targets = {}
        for model in models:
            target = to or self._known_good(model)
            version = model.versions.get(target)
            if version is None:
                raise Invalid(f"model {model.name!r} has no version {target!r}", field="to")
            if not version.ready and not (parked_ok and version.state in PARKED_STATES):
                raise Conflict(
                    f"cannot roll {model.name!r} back to {target!r}: it has no ready endpoint",
                    field="to",
                )
            targets[model.name] = target
        return targets

    async def _wake_targets(self, models: list[Model], to: str | None) -> dict[str, float]:
        """Wake the parked versions a rollback goes to, all at once; seconds per model."""
        wanted = {}
        for model in models:
            target = to or self._known_good(model)
            version = model.versions.get(target)
            if version is not None and version.state in PARKED_STATES:
                wanted[model.name] = target
        seconds = await asyncio.gather(
            *(self.controller.wake(name, target) for name, target in wanted.items())
        )
        return dict(zip(wanted, seconds, strict=True))

    # -- the task that walks a plan --------------------------------------------------------------

    def _spawn(self, doc: dict[str, Any]) -> None:
        self._wake[doc["id"]] = asyncio.Event()
        self._tasks[doc["id"]] = asyncio.create_task(self._run(doc), name=f"rollout-{doc['id']}")

    async def _run(self, doc: dict[str, Any]) -> None:
        try:
            await self._walk(doc, plan_for(spec_of(doc)), self._analysis(doc))
        except asyncio.CancelledError:
            raise
        except EnvoyRejected as exc:  # the change was undone, or kept by those who took it
            logs.event(log, "rollout.envoy_rejected", logging.WARNING, id=doc["id"],
                       error=exc.message)  # fmt: skip
            await self._halt(doc, f"{exc.message}; paused")
        except Exception as exc:
            log.exception("rollout.task_failed", extra={"fields": {"id": doc["id"]}})
            await self._halt(
                doc, f"internal error in the rollout task ({type(exc).__name__}: {exc}), "
                "paused; see the logs",
            )  # fmt: skip
        finally:
            self._tasks.pop(doc["id"], None)

    async def _halt(self, doc: dict[str, Any], message: str) -> None:
        """Pause a rollout whose task failed, at the weights Envoy runs; no push (the failure
        may be the push), so an operator can resume, promote or abort it."""
        async with self._lock:
            if doc["phase"] not in ACTIVE:
                return
            doc["weights"] = dict(self._model(doc).weights)
            doc["phase"], doc["message"] = "paused", message
            _record(doc, "paused", message)
            self.controller.store.save(rollouts=[_touch(doc)])
            self._emit("rollout.paused", doc)

    def _analysis(self, doc: dict[str, Any]) -> Analysis | None:
        return self.analysis_for(doc) if doc.get("analysis") else None

    async def _walk(self, doc: dict[str, Any], plan: Plan, analysis: Analysis | None) -> None:
        interval = doc.get("analysis", {}).get("interval_seconds", 1.0) if analysis else None
        while doc["phase"] in ACTIVE:
            if doc["phase"] == "paused":
                if analysis and await self._judge(doc, analysis) == "rolled_back":
                    return
                await self._sleep(doc["id"], interval, analysis, doc)
                continue
            if not self._candidate_ready(doc):
                await self._wait_for_candidate(doc)
                continue
            if self._parked(doc, doc["from"]):  # a `from` given explicitly may be parked
                await self._wake_version(doc, doc["from"])
                continue
            if doc["step_index"] >= len(plan.steps):
                async with self._lock:
                    if doc["phase"] == "progressing":
                        await self._finish(doc, "succeeded", "succeeded", "all steps done")
                return
            step = plan.steps[doc["step_index"]]
            if isinstance(step, SetWeight):
                async with self._lock:
                    if doc["phase"] != "progressing":
                        continue
                    doc["weights"] = _split(self._model(doc), doc["from"], doc["to"], step.weight)
                    await self._commit(
                        doc, "step", "progressing", f"candidate at {step.weight}%", plan.policy
                    )
            elif step.seconds is None:
                async with self._lock:
                    if doc["phase"] != "progressing":
                        continue
                    message = f"waiting at step {doc['step_index'] + 1} for resume or promote"
                    await self._commit(doc, "paused", "paused", message)
                continue
            else:
                if not await self._timed_pause(doc, step, analysis, interval):
                    continue
            if analysis and not await self._gate(doc, analysis, interval):
                continue
            async with self._lock:
                if doc["phase"] == "progressing":
                    doc["step_index"] += 1
                    doc["pause_until"] = None
                    self.controller.store.save(rollouts=[_touch(doc)])

    async def _timed_pause(self, doc, step: Pause, analysis, interval) -> bool:
        """True once the pause has fully elapsed while progressing."""
        if doc["pause_until"] is None:
            async with self._lock:
                doc["pause_until"] = time.time() + (step.seconds or 0)
                doc["message"] = f"pausing {step.seconds:g}s at step {doc['step_index'] + 1}"
                self.controller.store.save(rollouts=[_touch(doc)])
        while doc["phase"] == "progressing":
            left = doc["pause_until"] - time.time()
            if left <= 0:
                return True
            await self._sleep(doc["id"], min(left, interval) if interval else left, analysis, doc)
            judging = analysis is not None and doc["phase"] == "progressing"
            if judging and await self._judge(doc, analysis) == "rolled_back":
                return False
        return False

    async def _gate(self, doc, analysis: Analysis, interval: float) -> bool:
        """Hold until the analysis passes (True); False if the rollout left `progressing`."""
        while doc["phase"] == "progressing":
            result = await self._judge(doc, analysis)
            if result == "pass":
                return True
            if result == "rolled_back":
                return False
            await self._sleep(doc["id"], interval, analysis, doc)
        return False

    async def _judge(self, doc, analysis: Analysis) -> str:
        """Ask the analysis once; roll back after `failure_limit` consecutive fails."""
        if await self._unready_too_long(doc) or await self._candidate_crashed(doc):
            return "rolled_back"
        verdict: Verdict = await analysis.evaluate(doc)
        metrics.analysis_verdicts.labels(doc["model"], verdict.result).inc()
        async with self._lock:
            if doc["phase"] not in ACTIVE:
                return doc["phase"]
            doc["analysis_status"] = verdict.to_json()
            if verdict.result == "fail":
                doc["failures"] += 1
                if doc["failures"] >= doc["analysis"].get("failure_limit", 1):
                    await self._finish(
                        doc, "rolled_back", "rolled_back", f"rolled back: {verdict.reason}"
                    )
                    metrics.rollbacks.labels(doc["model"], _reason_label(verdict)).inc()
                    return "rolled_back"
            else:
                doc["failures"] = 0
            if verdict.result == "inconclusive":
                doc["message"] = f"holding step {doc['step_index'] + 1}: {verdict.reason}"
            self.controller.store.save(rollouts=[_touch(doc)])
        return verdict.result

    async def _unready_too_long(self, doc) -> bool:
        """With analysis on: a candidate that has traffic but no ready endpoint for longer
        than `unready_grace_seconds` is rolled back (True)."""
        if not doc.get("analysis") or self._candidate_ready(doc):
            doc["unready_since"] = None
            return False
        if not doc["weights"].get(doc["to"]):
            return False  # no traffic on it: waiting costs nothing
        now = time.time()
        since = doc.get("unready_since") or now
        doc["unready_since"] = since
        grace = doc["analysis"].get("unready_grace_seconds", 10.0)
        if now - since < grace:
            return False
        reason = f"{doc['to']} had no ready endpoint for {now - since:.1f}s (grace {grace:g}s)"
        return await self._roll_back(doc, reason, "unready")

    async def _candidate_crashed(self, doc) -> bool:
        """With analysis on: a candidate whose backend died during the rollout is rolled back
        (True), even if it was restarted before a request failed: it will crash again."""
        crashes = self._model(doc).versions[doc["to"]].crashes
        baseline = doc.setdefault("candidate_crashes", crashes)
        if crashes <= baseline:
            return False
        reason = f"crashed: {doc['to']}'s backend exited {crashes - baseline} time(s)"
        return await self._roll_back(doc, reason, "crashed")

    async def _roll_back(self, doc, reason: str, label: str) -> bool:
        """End the rollout as rolled back (unless a command ended it first); True."""
        async with self._lock:
            if doc["phase"] not in ACTIVE:
                return True
            await self._finish(doc, "rolled_back", "rolled_back", f"rolled back: {reason}")
        metrics.rollbacks.labels(doc["model"], label).inc()
        return True

    async def _wait_for_candidate(self, doc) -> None:
        if await self._unready_too_long(doc):
            return
        if self._parked(doc, doc["to"]):
            await self._wake_version(doc, doc["to"])
            return
        message = f"waiting for {doc['to']} to have a ready endpoint"
        if doc["message"] != message:
            async with self._lock:
                doc["message"] = message
                self.controller.store.save(rollouts=[_touch(doc)])
        await self._sleep(doc["id"], WAIT_FOR_READY_S)

    def _parked(self, doc, version: str) -> bool:
        return self._model(doc).versions[version].state in PARKED_STATES

    async def _wake_version(self, doc, to: str) -> None:
        """A parked version is woken before it gets traffic; the time goes in the history."""
        async with self._lock:
            doc["message"] = f"waking {to}"
            _record(doc, "waking", doc["message"])
            self.controller.store.save(rollouts=[doc])
        self._emit("rollout.waking", doc)
        try:
            seconds = await self.controller.wake(doc["model"], to)
        except SwitchyardError as exc:
            async with self._lock:
                doc["message"] = f"could not wake {to}: {exc.message}; retrying"
                self.controller.store.save(rollouts=[_touch(doc)])
            await self._sleep(doc["id"], WAKE_RETRY_S)
            return
        async with self._lock:
            doc["message"] = f"{to} woke in {seconds:.2f}s"
            doc["wake_seconds"] = round(seconds, 3)
            _record(doc, "woken", doc["message"])
            self.controller.store.save(rollouts=[doc])
        self._emit("rollout.woken", doc)

    def _background(self, coroutine) -> None:
        """Work a transition starts but must not wait for (parking a version)."""
        task = asyncio.create_task(coroutine)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # -- transitions -----------------------------------------------------------------------------

    async def _commit(
        self, doc, event: str, phase: str, message: str, policy: TrafficPolicy | None = None
    ) -> None:
        """Persist and push `doc`'s phase and weights; record it once every Envoy ACKed."""
        model = self._model(doc)
        before = doc["phase"], doc["message"]
        doc["phase"], doc["message"] = phase, message
        keep = policy if policy is not None else model.policy
        try:
            await self.controller.apply_traffic(
                {model.name: Traffic(doc["weights"], keep)}, rollouts=[_touch(doc)]
            )
        except EnvoyRejected:  # undone: the rollout stays as it was
            doc["phase"], doc["message"] = before
            doc["weights"] = dict(model.weights)
            self.controller.store.save(rollouts=[doc])
            raise
        _record(doc, event, message)
        self.controller.store.save(rollouts=[doc])
        self._emit(f"rollout.{event}", doc)
        metrics.rollout_step.labels(doc["model"]).set(doc["step_index"])

    async def _finish(self, doc, phase: str, event: str, message: str) -> None:
        """End a rollout: succeeded (candidate 100 %), or aborted / rolled back (`from` 100 %)."""
        model = self._model(doc)
        winner = doc["to"] if phase == "succeeded" else doc["from"]
        before = {key: doc[key] for key in ("weights", "phase", "message", "pause_until")}
        doc.update(weights=_all_to(model, winner), phase=phase, message=message, pause_until=None)
        # Persisted with the push, so a crash while waiting for the ACKs still ends the
        # rollout; the history entry follows the ACKs. A refused promotion is undone; a
        # refused abort or rollback stays with the Envoys that took it (as emergency ones do).
        try:
            await self.controller.apply_traffic(
                {model.name: Traffic(doc["weights"], TrafficPolicy())},
                rollouts=[_touch(doc)],
                undo_on_reject=phase == "succeeded",
            )
        except EnvoyRejected:
            if phase == "succeeded":
                doc.update(before)
                self.controller.store.save(rollouts=[doc])
            else:
                _record(doc, event, message)
                self._close(doc, phase)
            raise
        if phase == "succeeded":
            model.stable, model.last_good = doc["to"], doc["from"]
            self.controller.store.save(models=[model])
            self._background(
                self.controller.park(model.name, doc["from"], model.traffic_generation)
            )
        _record(doc, event, message)
        if event == "promoted":
            self._emit("rollout.promoted", doc)
            _record(doc, "succeeded", message)
        self._close(doc, phase)

    def _close(self, doc, phase: str) -> None:
        self.controller.store.save(rollouts=[doc])
        self._model(doc).active_rollout = None
        self.controller.rebuild([doc["model"]])  # the routes' rollout-time retries end
        self.rollouts.pop(doc["id"], None)
        self._wake.pop(doc["id"], None)
        metrics.rollouts_finished.labels(doc["model"], phase).inc()
        self._emit(f"rollout.{phase}", doc)
        logs.event(
            log, f"rollout.{phase}", id=doc["id"], model=doc["model"], message=doc["message"]
        )

    def _hold_pause_timer(self, doc) -> None:
        if doc["pause_until"] is not None:
            doc["pause_left"] = max(0.0, doc["pause_until"] - time.time())
            doc["pause_until"] = None

    def _resume_from_gate(self, doc) -> None:
        """Resuming from a manual gate moves past it; from a timed pause, restarts its timer."""
        plan = plan_for(spec_of(doc))
        if doc["pause_left"] is not None:
            doc["pause_until"], doc["pause_left"] = time.time() + doc["pause_left"], None
        elif doc["step_index"] < len(plan.steps):
            step = plan.steps[doc["step_index"]]
            if isinstance(step, Pause) and step.seconds is None:
                doc["step_index"] += 1

    # -- helpers ---------------------------------------------------------------------------------

    def _model(self, doc) -> Model:
        return self.controller.state.model(doc["model"])

    def _candidate_ready(self, doc) -> bool:
        return self._model(doc).versions[doc["to"]].ready

    def _known_good(self, model: Model) -> str:
        if model.active_rollout:
            return self.rollouts[model.active_rollout]["from"]
        return model.last_good or model.stable

    async def _cancel_task(self, rollout_id: str) -> None:
        task = self._tasks.pop(rollout_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sleep(
        self, rollout_id: str, seconds: float | None, analysis: Analysis | None = None,
        doc: dict[str, Any] | None = None,
    ) -> None:
        """Sleep, but wake at once on a command for this rollout, or (given an analysis that
        can tell) when new health data for its model arrives: verdicts follow the data."""
        wake = self._wake.get(rollout_id)
        if wake is None:
            return
        waiters = [asyncio.ensure_future(wake.wait())]
        data = getattr(analysis, "wait_for_data", None)
        if data is not None:
            waiters.append(asyncio.ensure_future(data(doc, seconds)))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        wake.clear()

    def _wake_task(self, rollout_id: str) -> None:
        if rollout_id in self._wake:
            self._wake[rollout_id].set()

    def _emit(self, event: str, doc) -> None:
        metrics.rollout_phase.labels(doc["model"]).set(PHASES.index(doc["phase"]))
        self.controller.events.publish(
            event, id=doc["id"], model=doc["model"], phase=doc["phase"],
            step_index=doc["step_index"], weights=doc["weights"], message=doc["message"],
        )  # fmt: skip


def parse_spec(body: Any) -> RolloutSpec:
    """Validate a spec from the API; Invalid names the field at fault."""
    if not isinstance(body, dict):
        raise Invalid("the rollout spec must be a JSON object")
    return validate_body(RolloutSpec, body)


def spec_of(doc: dict[str, Any]) -> RolloutSpec:
    """The spec inside a stored rollout document (which carries engine fields too)."""
    return RolloutSpec.model_validate({k: v for k, v in doc.items() if k in SPEC_KEYS})


SPEC_KEYS = {field.alias or name for name, field in RolloutSpec.model_fields.items()}


def _reason_label(verdict: Verdict) -> str:
    """A bounded label for the rollback metric: the first figure that crossed its threshold."""
    figure = verdict.reason.split(" ", 1)[0] if verdict.reason else ""
    return figure if figure in REASON_FIGURES else "analysis"


REASON_FIGURES = {
    "error_rate", "latency_p95_ms", "ttft_p95_ms", "itl_p95_ms", "stalled", "unhealthy"
}


def _split(model: Model, source: str, candidate: str, weight: int) -> dict[str, int]:
    weights = dict.fromkeys(model.versions, 0)
    weights[source], weights[candidate] = 100 - weight, weight
    return weights


def _all_to(model: Model, version: str) -> dict[str, int]:
    return {name: 100 if name == version else 0 for name in model.versions}


def _touch(doc: dict[str, Any]) -> dict[str, Any]:
    doc["updated_at"] = time.time()
    return doc


# Thresholds on vLLM's own figures, which it keeps per server, not per LoRA adapter.
VLLM_FIGURES = {"max_ttft_p95_ms": "time to first token", "max_itl_p95_ms": "inter-token "
                "latency", "max_ttft_ratio": "time to first token"}  # fmt: skip


def _check_adapter_analysis(model: Model, versions: tuple[str, ...], analysis) -> None:
    """LoRA adapter versions are judged on Envoy's stats of their own requests: a threshold
    on time to first token or inter-token latency could never be checked (the rollout would
    hold, inconclusive), so it is refused."""
    if analysis is None:
        return
    adapter = next((v for v in versions if model.versions[v].backend.adapter is not None), None)
    for key, figure in VLLM_FIGURES.items() if adapter else ():
        if getattr(analysis, key) is not None:
            raise Invalid(
                f"{model.name}@{adapter} is a LoRA adapter: vLLM measures {figure} per server, "
                "not per adapter, so no verdict could use it; use max_latency_p95_ms or "
                "max_latency_ratio (Envoy's, per version)",
                field=f"analysis.{key}",
            )


def _record(doc: dict[str, Any], event: str, message: str) -> None:
    doc["history"].append(
        {
            "time": time.time(),
            "event": event,
            "phase": doc["phase"],
            "step_index": doc["step_index"],
            "weights": dict(doc["weights"]),
            "message": message,
        }
    )
    del doc["history"][:-HISTORY_LIMIT]
    _touch(doc)
