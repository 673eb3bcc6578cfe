"""Scrape vLLM's `/metrics` on every ready endpoint and push per-second deltas to HealthSignals.

What comes from here: time to first token, inter-token latency (`time_per_output_token`
on vLLM before 0.11) and end-to-end latency (histogram deltas between two scrapes) and the
queue gauges (requests running and waiting), per version, with the endpoint URL as the
delta's `source` so that gauges are summed across endpoints. vLLM labels every series with
`model_name` and `engine`; series are summed over every label but the model.

What does not: `requests` and `errors` stay 0 in these deltas on purpose. Envoy's stats are
the one source of traffic counts (they see every request, including the ones a backend never
answered); taking vLLM's `request_success_total` as well would count each request twice.

Cost: one GET per distinct address per round, all concurrent on one shared session with a
short timeout, so one slow backend never delays the others or the next round; the text is
parsed once for every version served there (many LoRA models on one server), and versions
without series of their own share one delta computation. Before parsing, a regex keeps only
the lines of the series we use (a real vLLM exposes hundreds of lines of other histograms),
so `text_string_to_metric_families` sees a few dozen lines. Only *hot* versions are scraped
every second: those of a model with an active rollout (its analysis), with `alerts`, or
whose traffic changed in the last two minutes (a version drained before it is parked); the
others every COLD_EVERY seconds, spread over the rounds by address. Their histogram deltas
then span several seconds: no observation is lost, only time resolution. A version with
nothing to report (no new observation, nothing running or waiting) pushes a delta every
QUIET_PUSH_S instead of every round, so a thousand idle versions keep almost no history.

Counters are cumulative in vLLM; a value lower than at the previous scrape means the backend
restarted, and then the current value is the delta. The first scrape of an endpoint (or the
first after it was unready) only records the counters, and pushes the gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from controlplane import logs
from controlplane.health.signals import Delta, HealthSignals, Histogram
from controlplane.state import State

log = logs.get("health.vllm")

TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
TPOT = "vllm:time_per_output_token_seconds"  # vLLM before 0.11: its name for ITL
E2E = "vllm:e2e_request_latency_seconds"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = "vllm:kv_cache_usage_perc"
SLEEP_STATE = "vllm:engine_sleep_state"  # awake=1, or weights_offloaded/discard_all=1
HISTOGRAMS = {TTFT: "ttft_s", ITL: "itl_s", TPOT: "tpot_s", E2E: "e2e_s"}  # -> Delta field
GAUGES = {RUNNING: "running", WAITING: "waiting", KV_CACHE: "kv_cache", SLEEP_STATE: "awake"}
DELTA_GAUGES = ("running", "waiting")  # what HealthSignals keeps of them
MODEL_LABEL = "model_name"

# The `# TYPE` lines and the samples of the series we use; nothing else is parsed.
_NAMES = "|".join(re.escape(name) for name in (*GAUGES, *(f"{h}_bucket" for h in HISTOGRAMS)))
_FAMILIES = "|".join(re.escape(name) for name in (*GAUGES, *HISTOGRAMS))
_WANTED = re.compile(rf"^(?:(?:{_NAMES})[{{ ].*|# TYPE (?:{_FAMILIES}) .*)$", re.MULTILINE)

Key = tuple[str, str, str]  # model, version, endpoint url
Due = Callable[[str, list[tuple[str, str]]], bool]  # (url, its (model, version)s) -> scrape?
COLD_EVERY = 10  # rounds between two scrapes of an address whose versions nobody judges
HOT_AFTER_CHANGE_S = 120.0  # a model stays hot this long after its traffic changed
QUIET_PUSH_S = 5.0  # a version with nothing to report (no observation, nothing in flight)
# pushes a delta this often, not every round: a thousand idle versions keep no history


@dataclass
class Scrape:
    """One endpoint's parsed `/metrics`: cumulative buckets per histogram, gauge values."""

    histograms: dict[str, tuple[tuple[float, ...], list[float]]]  # field -> (bounds, cumulative)
    gauges: dict[str, float]  # field -> value: running, waiting, kv_cache (usage, 0-1)
    asleep: bool | None = None  # vllm:engine_sleep_state says so (None: no such series)


def parse(text: str, served_model: str) -> Scrape:
    """The series of `served_model` (or, if no series names it, all of them: one vLLM process
    serves one model), summed over every other label (vLLM may add `engine="0"`, ...)."""
    return Parsed(text).scrape_for(served_model)


class Parsed:
    """One `/metrics` text, parsed once for every model served there (a thousand LoRA models
    on one server are one GET and one parse): sums per `model_name` and over all series."""

    def __init__(self, text: str) -> None:
        wanted = "\n".join(_WANTED.findall(text))
        # field -> model_name (None: every series) -> {le: cumulative count} / value
        self.buckets: dict[str, dict[str | None, dict[float, float]]] = {
            field: {} for field in HISTOGRAMS.values()
        }
        self.gauges: dict[str, dict[str | None, float]] = {field: {} for field in GAUGES.values()}
        self._scrapes: dict[str | None, Scrape] = {}
        for family in text_string_to_metric_families(wanted):
            for sample in family.samples:
                name = sample.name
                label = sample.labels.get(MODEL_LABEL)
                if name == SLEEP_STATE and sample.labels.get("sleep_state") != "awake":
                    continue  # only the `awake` series: 1 awake, 0 asleep
                if name in GAUGES:
                    per = self.gauges[GAUGES[name]]
                    for key in {label, None}:
                        per[key] = per.get(key, 0.0) + sample.value
                    continue
                field = HISTOGRAMS.get(name.removesuffix("_bucket"))
                le = sample.labels.get("le")
                if field is None or le is None:
                    continue
                bound = float(le)
                for key in {label, None}:
                    per_le = self.buckets[field].setdefault(key, {})
                    per_le[bound] = per_le.get(bound, 0.0) + sample.value
        self.models = {key for per in (*self.buckets.values(), *self.gauges.values())
                       for key in per if key is not None}  # fmt: skip

    def scrape_for(self, served_model: str) -> Scrape:
        """Per field, the series that name `served_model`, else all of them. Models without
        series of their own share one Scrape object (so their deltas are computed once)."""
        key = served_model if served_model in self.models else None
        scrape = self._scrapes.get(key)
        if scrape is None:
            scrape = self._scrapes[key] = self._scrape(key)
        return scrape

    def _scrape(self, model: str | None) -> Scrape:
        histograms = {}
        for field, by_model in self.buckets.items():
            per_le = by_model.get(model, by_model.get(None))
            if not per_le or math.inf not in per_le:
                continue
            bounds = sorted(per_le)
            histograms[field] = (tuple(bounds[:-1]), [per_le[bound] for bound in bounds])
        tpot = histograms.pop("tpot_s", None)
        if "itl_s" not in histograms and tpot is not None:
            histograms["itl_s"] = tpot  # an older vLLM
        values = {
            field: by_model.get(model, by_model.get(None))
            for field, by_model in self.gauges.items()
            if by_model
        }
        awake = values.pop("awake", None)
        return Scrape(histograms, values, None if awake is None else awake < 1)


def histogram_delta(
    current: tuple[tuple[float, ...], list[float]],
    previous: tuple[tuple[float, ...], list[float]] | None,
) -> Histogram | None:
    """Observations between two cumulative scrapes; None when there were none.

    No previous series (it appeared since), different buckets, or a bucket that went down (the
    backend restarted): everything the current scrape counts is new.
    """
    bounds, cumulative = current
    if previous is not None and previous[0] == bounds:
        pairs = list(zip(cumulative, previous[1], strict=True))
        if all(now >= before for now, before in pairs):
            cumulative = [now - before for now, before in pairs]
    delta = Histogram.from_cumulative(bounds, cumulative)
    return delta if delta.total > 0 else None


class VllmScraper:
    """Every `interval` seconds, scrape the ready endpoints of active versions (hot ones every
    round, the others every COLD_EVERY rounds), one GET per distinct address."""

    def __init__(
        self,
        state: State,
        signals: HealthSignals,
        interval: float = 1.0,
        timeout: float | None = None,
        changed: Callable[[], object] | None = None,
    ) -> None:
        self.state = state
        self.signals = signals
        self.interval = interval
        # A value that is another object whenever endpoints, versions or models may have
        # changed (the controller's snapshot, rebuilt on each such change): the endpoints to
        # scrape are worked out again only then. Without it, every round.
        self._changed = changed
        self._marker: object = object()
        self._by_url: dict[str, list[tuple[str, str]]] = {}
        self._models_at: dict[str, set[str]] = {}  # url -> the models served there
        # Shorter than the interval, so a hung backend never makes a round late.
        self.timeout = timeout if timeout is not None else min(0.8, 0.8 * interval)
        self._previous: dict[Key, Scrape] = {}
        self._quiet_pushed: dict[Key, float] = {}  # when a quiet delta was last pushed
        self._unanswered: set[Key] = set()  # whose last scrape got no answer
        self._traffic: dict[str, tuple[int, float]] = {}  # model -> (generation, changed at)
        self._rounds = 0
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="vllm-scraper")
        self._task.add_done_callback(_log_crash)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.scrape_round()
            except Exception:  # a bug here must not end health scraping for good
                log.exception("vllm.scrape_round_failed", extra={"fields": {}})
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    def targets(self) -> list[Key]:
        """(model, version, url) of every ready endpoint of every active version. Not LoRA
        adapter versions: their endpoints are their base's servers, whose vLLM figures are
        the base's and every adapter's together (they are judged on Envoy's stats)."""
        return [
            (model.name, version.name, endpoint.url)
            for model in list(self.state.models.values())
            for version in list(model.versions.values())
            if version.state == "active" and version.backend.adapter is None
            for endpoint in list(version.endpoints)
            if endpoint.ready
        ]

    async def scrape_round(self) -> None:
        """What the loop does each interval: every address with a hot version (module doc),
        and a tenth of the others, each address every COLD_EVERY rounds in turn."""
        self._rounds += 1
        hot = self._hot_models()
        turn = self._rounds % COLD_EVERY

        def due(url: str, members: list[tuple[str, str]]) -> bool:
            if zlib.crc32(url.encode()) % COLD_EVERY == turn:
                return True
            models = self._models_at.get(url)
            if models is None:
                models = self._models_at[url] = {model for model, _ in members}
            return not hot.isdisjoint(models)

        await self.scrape_once(due)

    def _hot_models(self) -> set[str]:
        """Models someone judges now: an active rollout, alerts, or traffic changed in the
        last HOT_AFTER_CHANGE_S (a version being drained before it is parked)."""
        now = time.monotonic()
        hot = set()
        models = self.state.models
        for name in [name for name in self._traffic if name not in models]:
            del self._traffic[name]
        for model in list(models.values()):
            seen = self._traffic.get(model.name)
            if seen is None:  # first sight (start-up): not a change
                seen = self._traffic[model.name] = (model.traffic_generation, -math.inf)
            elif seen[0] != model.traffic_generation:
                seen = self._traffic[model.name] = (model.traffic_generation, now)
            recent = now - seen[1] < HOT_AFTER_CHANGE_S
            if model.active_rollout or model.alerts is not None or recent:
                hot.add(model.name)
        return hot

    async def scrape_once(self, due: Due | None = None) -> None:
        """One round over every endpoint (with `due`, the addresses it accepts): each distinct
        address fetched once, concurrently, and parsed once for every version on it; failures
        are logged at debug and skipped."""
        marker = self._changed() if self._changed is not None else object()
        if marker is not self._marker:  # endpoints may have changed: work them out again
            self._marker = marker
            targets = self.targets()
            wanted = set(targets)
            # An endpoint that left (unready, parked, removed) starts over when it returns.
            for key in [key for key in self._previous if key not in wanted]:
                del self._previous[key]
                self._quiet_pushed.pop(key, None)
                self._unanswered.discard(key)
            self._by_url, self._models_at = {}, {}
            for model, version, url in targets:
                self._by_url.setdefault(url, []).append((model, version))
        by_url = self._by_url
        if due is not None:
            by_url = {url: members for url, members in by_url.items() if due(url, members)}
        if not by_url:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=0),  # one connection per endpoint anyway
            )
        results = await asyncio.gather(
            *(self._scrape(url, members) for url, members in by_url.items()),
            return_exceptions=True,
        )
        for url, result in zip(by_url, results, strict=True):
            if isinstance(result, Exception):  # a bug, not a backend problem: say so louder
                logs.event(log, "vllm.scrape_error", logging.WARNING, url=url, error=repr(result))

    async def _scrape(self, url: str, members: list[tuple[str, str]]) -> None:
        assert self._session is not None
        try:
            async with self._session.get(f"{url}/metrics") as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                text = await response.text()
            parsed = Parsed(text)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # No answer in time: a hung (or dead) process. The analysis may call a stall at
            # once then, where a slow but live engine gets several of its latencies.
            logs.event(log, "vllm.scrape_failed", logging.DEBUG, url=url, error=repr(exc))
            now = time.time()
            for model, version in members:
                self._unanswered.add((model, version, url))
                self.signals.add(model, version, Delta(time=now, source=url, unanswered=1.0))
            return
        except ValueError as exc:  # it answered, with something other than metrics
            logs.event(log, "vllm.scrape_failed", logging.DEBUG, url=url, error=repr(exc))
            return
        now = time.time()
        # Versions without series of their own share one Scrape, and so one delta.
        computed: dict[tuple[int, int], dict[str, Histogram | None]] = {}
        for model, version in members:
            key = (model, version, url)
            scrape = parsed.scrape_for(model)
            previous = self._previous.get(key)
            self._previous[key] = scrape
            pair = (id(previous), id(scrape))
            histograms = computed.get(pair)
            if histograms is None:
                histograms = computed[pair] = {} if previous is None else {
                    field: histogram_delta(current, previous.histograms.get(field))
                    for field, current in scrape.histograms.items()
                }  # fmt: skip
            gauges = {field: scrape.gauges.get(field) for field in DELTA_GAUGES}
            answered_again = key in self._unanswered  # say so at once, quiet or not
            self._unanswered.discard(key)
            quiet = not any(histograms.values()) and not any(gauges.values())
            if quiet and not answered_again:
                last = self._quiet_pushed.get(key)
                if last is not None and now - last < QUIET_PUSH_S:
                    continue  # nothing new since the last (quiet) delta
                self._quiet_pushed[key] = now
            else:
                self._quiet_pushed.pop(key, None)
            self.signals.add(model, version, Delta(time=now, source=url, unanswered=0.0,
                                                   **gauges, **histograms))  # fmt: skip


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("vllm.scraper_crashed", exc_info=task.exception(), extra={"fields": {}})
