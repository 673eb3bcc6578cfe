"""Scrape vLLM's `/metrics` on every ready endpoint and push per-second deltas to HealthSignals.

What comes from here: time to first token, inter-token latency (`time_per_output_token`
on vLLM before 0.11) and end-to-end latency (histogram deltas between two scrapes) and the
queue gauges (requests running and waiting), per version, with the endpoint URL as the
delta's `source` so that gauges are summed across endpoints. vLLM labels every series with
`model_name` and `engine`; series are summed over every label but the model.

What does not: `requests` and `errors` stay 0 in these deltas on purpose. Envoy's stats are
the one source of traffic counts (they see every request, including the ones a backend never
answered); taking vLLM's `request_success_total` as well would count each request twice.

Cost: one GET per ready endpoint per interval, all concurrent on one shared session with a
short timeout, so one slow backend never delays the others or the next round. Before parsing,
a regex keeps only the lines of the five series we use (a real vLLM exposes hundreds of lines
of other histograms), so `text_string_to_metric_families` sees a few dozen lines.

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


@dataclass
class Scrape:
    """One endpoint's parsed `/metrics`: cumulative buckets per histogram, gauge values."""

    histograms: dict[str, tuple[tuple[float, ...], list[float]]]  # field -> (bounds, cumulative)
    gauges: dict[str, float]  # field -> value: running, waiting, kv_cache (usage, 0-1)
    asleep: bool | None = None  # vllm:engine_sleep_state says so (None: no such series)


def parse(text: str, served_model: str) -> Scrape:
    """The series of `served_model` (or, if no series names it, all of them: one vLLM process
    serves one model), summed over every other label (vLLM may add `engine="0"`, ...)."""
    wanted = "\n".join(_WANTED.findall(text))
    # field -> {series names the model?: {le: cumulative count}}
    buckets: dict[str, dict[bool, dict[float, float]]] = {f: {} for f in HISTOGRAMS.values()}
    gauges: dict[str, dict[bool, float]] = {field: {} for field in GAUGES.values()}
    for family in text_string_to_metric_families(wanted):
        for sample in family.samples:
            name = sample.name
            mine = sample.labels.get(MODEL_LABEL) == served_model
            if name == SLEEP_STATE and sample.labels.get("sleep_state") != "awake":
                continue  # only the `awake` series: 1 awake, 0 asleep
            if name in GAUGES:
                per = gauges[GAUGES[name]]
                per[mine] = per.get(mine, 0.0) + sample.value
                continue
            field = HISTOGRAMS.get(name.removesuffix("_bucket"))
            le = sample.labels.get("le")
            if field is None or le is None:
                continue
            per_le = buckets[field].setdefault(mine, {})
            bound = float(le)
            per_le[bound] = per_le.get(bound, 0.0) + sample.value
    histograms = {}
    for field, by_mine in buckets.items():
        per_le = by_mine.get(True, by_mine.get(False))
        if not per_le or math.inf not in per_le:
            continue
        bounds = sorted(per_le)
        histograms[field] = (tuple(bounds[:-1]), [per_le[bound] for bound in bounds])
    tpot = histograms.pop("tpot_s", None)
    if "itl_s" not in histograms and tpot is not None:
        histograms["itl_s"] = tpot  # an older vLLM
    values = {
        field: by_mine.get(True, by_mine.get(False)) for field, by_mine in gauges.items() if by_mine
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
    """Every `interval` seconds, scrape every ready endpoint of every active version."""

    def __init__(
        self,
        state: State,
        signals: HealthSignals,
        interval: float = 1.0,
        timeout: float | None = None,
    ) -> None:
        self.state = state
        self.signals = signals
        self.interval = interval
        # Shorter than the interval, so a hung backend never makes a round late.
        self.timeout = timeout if timeout is not None else min(0.8, 0.8 * interval)
        self._previous: dict[Key, Scrape] = {}
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
                await self.scrape_once()
            except Exception:  # a bug here must not end health scraping for good
                log.exception("vllm.scrape_round_failed", extra={"fields": {}})
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    def targets(self) -> list[Key]:
        """(model, version, url) of every ready endpoint of every active version."""
        return [
            (model.name, version.name, endpoint.url)
            for model in list(self.state.models.values())
            for version in list(model.versions.values())
            if version.state == "active"
            for endpoint in list(version.endpoints)
            if endpoint.ready
        ]

    async def scrape_once(self) -> None:
        """One round: all endpoints concurrently; failures are logged at debug and skipped."""
        targets = self.targets()
        wanted = set(targets)
        # An endpoint that left (unready, version parked, removed) starts over when it returns.
        for key in [key for key in self._previous if key not in wanted]:
            del self._previous[key]
        if not targets:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=0),  # one connection per endpoint anyway
            )
        results = await asyncio.gather(
            *(self._scrape(key) for key in targets), return_exceptions=True
        )
        for (_, _, url), result in zip(targets, results, strict=True):
            if isinstance(result, Exception):  # a bug, not a backend problem: say so louder
                logs.event(log, "vllm.scrape_error", logging.WARNING, url=url, error=repr(result))

    async def _scrape(self, key: Key) -> None:
        model, version, url = key
        assert self._session is not None
        try:
            async with self._session.get(f"{url}/metrics") as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                text = await response.text()
            scrape = parse(text, model)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # incl. bad text
            logs.event(log, "vllm.scrape_failed", logging.DEBUG, url=url, error=repr(exc))
            return
        previous = self._previous.get(key)
        self._previous[key] = scrape
        delta = Delta(time=time.time(), source=url)
        for field in DELTA_GAUGES:
            setattr(delta, field, scrape.gauges.get(field))
        if previous is not None:
            for field, current in scrape.histograms.items():
                setattr(delta, field, histogram_delta(current, previous.histograms.get(field)))
        self.signals.add(model, version, delta)


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("vllm.scraper_crashed", exc_info=task.exception(), extra={"fields": {}})
