"""A vLLM stand-in: the OpenAI endpoints of `vllm serve`, its metrics, sleep mode, and faults.

Every test and benchmark of the project uses this instead of a GPU, so it has to answer like
vLLM (shapes, status codes, metric names) and stay out of the way of throughput numbers: the
hot path parses the body once, builds no models, and serializes the answer once (streams are
assembled from prebuilt JSON pieces).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import random
import signal
import struct
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web

from controlplane import logs
from controlplane.sim.metrics import SimMetrics

log = logs.get("sim")

# The vLLM release whose API this sim imitates; `/version` reports it when no label is set.
VLLM_VERSION = "0.0.0+sim"
EMBEDDING_DIM = 16
MAX_BODY_BYTES = 64 * 1024 * 1024  # long-context prompts are large; aiohttp's 1 MiB is too small
POLL_S = 0.1  # how often long waits look for a vanished client or a cleared hang

# Generated text cycles through these words, one word per token, so `completion_tokens` equals
# the word count of the answer and streamed deltas concatenate to the non-streamed text.
WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
    "wizards", "quietly", "hex", "an", "old", "jukebox", "near", "misty", "docks", "and",
    "vexed", "pilots", "fly", "home",
)
_FIRST_TOKEN_JSON = [json.dumps(word) for word in WORDS]
_NEXT_TOKEN_JSON = [json.dumps(" " + word) for word in WORDS]

JSON_TYPE = "application/json"
_dumps = json.JSONEncoder(separators=(",", ":")).encode  # compact, like vLLM's pydantic output
_FAULT_KEYS = ("error_rate", "status", "ttft_ms", "itl_ms", "hang")


@dataclass
class SimConfig:
    model: str = "sim-model"  # served model name
    ttft_ms: float = 0.0  # time to first token
    itl_ms: float = 0.0  # inter-token latency
    max_tokens_default: int = 16  # tokens generated when the request gives no max_tokens
    version: str | None = None  # when set, responses carry `x-sim-version: <version>`
    wake_ms: float = 0.0  # how long `/wake_up` takes
    startup_ms: float = 0.0  # like vLLM loading weights: the port opens only after this
    max_model_len: int = 8192  # context window, reported by /v1/models and enforced like vLLM
    seed: int = 0  # seeds the error_rate fault's RNG so runs are repeatable


class RequestError(Exception):
    """A request vLLM would reject; carries the status and OpenAI error type to answer with."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def _error_type(status: int) -> str:
    """vLLM names error types after the HTTP phrase: 503 -> ServiceUnavailableError."""
    try:
        name = HTTPStatus(status).phrase.title().replace(" ", "").replace("-", "")
    except ValueError:
        return "Error"
    return name if name.endswith("Error") else name + "Error"


def _words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def _chat_prompt_tokens(messages: list[Any]) -> int:
    """Approximate prompt tokens as the whitespace word count of all message text."""
    count = 0
    for message in messages:
        if not isinstance(message, dict):
            raise RequestError(400, "messages: each message must be an object")
        content = message.get("content")
        if isinstance(content, str):
            count += len(content.split())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    count += _words(part.get("text"))
    return max(count, 1)


def _completion_prompt_tokens(prompt: Any) -> int:
    """Strings count words; token-id lists count ids (vLLM accepts both, and lists of them)."""
    if isinstance(prompt, str):
        return max(len(prompt.split()), 1)
    if isinstance(prompt, list):
        count = 0
        for item in prompt:
            if isinstance(item, str):
                count += len(item.split())
            elif isinstance(item, list):
                count += len(item)
            else:
                count += 1  # a token id
        return max(count, 1)
    raise RequestError(400, "prompt: must be a string, a list of strings or of token ids")


def _embedding(text: str, dims: int) -> list[float]:
    """A deterministic unit vector derived from a hash of the input."""
    digest = hashlib.blake2b(text.encode()).digest()
    raw = [(digest[i % len(digest)] + i // len(digest)) % 256 - 127.5 for i in range(dims)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [round(v / norm, 6) for v in raw]


class Sim:
    """The state of one simulated server and its request handlers."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.model = config.model
        self.metrics = SimMetrics(config.model)
        self.headers = {"x-sim-version": config.version} if config.version else {}
        self.sse_headers = {
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            **self.headers,
        }
        self._model_json = json.dumps(config.model)
        self._rng = random.Random(config.seed)
        self.faults: dict[str, Any] = {}
        self.sleeping = False
        self.sleep_level = 0
        self._closing = False
        self._faults_changed = asyncio.Event()
        self._apply_faults()
        # Prefix of the generated text by token count: text(n) is a slice, never a join.
        words = [WORDS[i % len(WORDS)] for i in range(max(config.max_model_len, 1))]
        self._text = " ".join(words)
        self._text_ends: list[int] = []
        end = 0
        for word in words:
            end += len(word) + (1 if end else 0)
            self._text_ends.append(end)
        created = int(time.time())
        self._models_body = _dumps({
            "object": "list",
            "data": [{
                "id": config.model, "object": "model", "created": created, "owned_by": "vllm",
                "root": config.model, "parent": None, "max_model_len": config.max_model_len,
                "permission": [],
            }],
        }).encode()

    # -- helpers -----------------------------------------------------------------------------

    def _apply_faults(self) -> None:
        """Recompute the hot-path view of the faults and wake requests waiting on them."""
        cfg, faults = self.config, self.faults
        self._ttft_s = (cfg.ttft_ms + faults.get("ttft_ms", 0.0)) / 1000.0
        self._itl_s = (cfg.itl_ms + faults.get("itl_ms", 0.0)) / 1000.0
        self._error_rate = float(faults.get("error_rate", 0.0))
        self._error_status = int(faults.get("status", 500))
        self._hang = bool(faults.get("hang", False))
        self._gated = self.sleeping or self._hang or self._error_rate > 0 or self._closing
        self._faults_changed.set()
        self._faults_changed = asyncio.Event()

    def _json(self, payload: Any, status: int = 200) -> web.Response:
        return web.Response(
            body=_dumps(payload).encode(), status=status, content_type=JSON_TYPE,
            headers=self.headers,
        )

    def _error(self, status: int, message: str, kind: str | None = None) -> web.Response:
        """An error in vLLM's OpenAI shape."""
        error = {"message": message, "type": kind or _error_type(status), "param": None,
                 "code": status}
        return self._json({"error": error}, status)

    def _gone(self) -> web.Response:
        """The answer to a request whose wait was cut short (nobody may be left to read it)."""
        if self._closing:
            return self._error(503, "The server is shutting down.")
        return self._error(499, "Client closed the request.")

    def _text_of(self, tokens: int) -> str:
        return self._text[: self._text_ends[tokens - 1]] if tokens > 0 else ""

    async def _pause(self, request: web.Request, seconds: float | None) -> bool:
        """Wait `seconds` (None: as long as the hang fault is on).

        Returns False when the client went away meanwhile, so the request is dropped rather than
        kept running (aiohttp does not cancel handlers on disconnect), or when the server is
        shutting down, so that shutdown never waits on a hang or a long TTFT.
        """
        if seconds is not None and seconds <= POLL_S:
            await asyncio.sleep(seconds)
            return True
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        while True:
            transport = request.transport
            if self._closing or transport is None or transport.is_closing():
                return False
            if deadline is None:
                if not self._hang:
                    return True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._faults_changed.wait(), POLL_S)
            else:
                left = deadline - loop.time()
                if left <= 0:
                    return True
                await asyncio.sleep(min(left, POLL_S))

    async def _gate(self, request: web.Request) -> web.Response | None:
        """Sleep mode and injected faults, checked before the request is even parsed."""
        if (self._hang and not await self._pause(request, None)) or self._closing:
            return self._gone()
        if self.sleeping:
            return self._error(503, "The engine is sleeping; POST /wake_up first.",
                               "ServiceUnavailableError")
        rate = self._error_rate
        if rate > 0 and (rate >= 1.0 or self._rng.random() < rate):
            response = self._error(self._error_status,
                                   f"Injected fault: status {self._error_status}.")
            response.headers["x-sim-fault"] = "error_rate"
            return response
        return None

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            raise RequestError(400, f"Request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "Request body must be a JSON object.")
        model = body.get("model")
        if model is not None and model != self.model:
            raise RequestError(404, f"The model `{model}` does not exist.", "NotFoundError")
        return body

    def _max_tokens(self, body: dict[str, Any], chat: bool, prompt_tokens: int) -> tuple[int, str]:
        """How many tokens to generate and the finish reason they end with."""
        limit = self.config.max_model_len
        requested = body.get("max_completion_tokens") if chat else None
        if requested is None:
            requested = body.get("max_tokens")
        if requested is None:
            tokens, reason = min(self.config.max_tokens_default, limit - prompt_tokens), "stop"
            if tokens < 1:
                raise RequestError(400, (
                    f"This model's maximum context length is {limit} tokens. However, your "
                    f"request has {prompt_tokens} input tokens. Please reduce the length of the "
                    "input messages."))
            return tokens, reason
        if type(requested) is not int or requested < 1:
            raise RequestError(400, f"max_tokens must be at least 1, got {requested!r}.")
        if prompt_tokens + requested > limit:
            raise RequestError(400, (
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the messages, "
                f"{requested} in the completion). Please reduce the length of the messages or "
                "completion."))
        return requested, "length"

    # -- inference ---------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival = time.perf_counter()
        if self._gated:
            early = await self._gate(request)
            if early is not None:
                return early
        try:
            body = await self._body(request)
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise RequestError(400, "messages: field required (a non-empty list).")
                prompt_tokens = _chat_prompt_tokens(messages)
            else:
                prompt = body.get("prompt")
                if prompt is None or prompt == "" or prompt == []:
                    raise RequestError(400, "prompt: field required (a non-empty prompt).")
                prompt_tokens = _completion_prompt_tokens(prompt)
            tokens, reason = self._max_tokens(body, chat, prompt_tokens)
        except RequestError as exc:
            return self._error(exc.status, exc.message, exc.kind)

        metrics = self.metrics
        metrics.running += 1
        try:
            if body.get("stream"):
                options = body.get("stream_options")
                usage = isinstance(options, dict) and bool(options.get("include_usage"))
                return await self._stream(request, chat, arrival, prompt_tokens, tokens, reason,
                                          usage)
            return await self._complete(request, chat, arrival, prompt_tokens, tokens, reason)
        finally:
            metrics.running -= 1

    async def _complete(self, request: web.Request, chat: bool, arrival: float,
                        prompt_tokens: int, tokens: int, reason: str) -> web.StreamResponse:
        """A non-streaming answer, after the same wait the stream would have taken."""
        metrics = self.metrics
        ttft_s, itl_s = self._ttft_s, self._itl_s
        if ttft_s > 0 and not await self._pause(request, ttft_s):
            metrics.finish("abort", prompt_tokens, 0, time.perf_counter() - arrival)
            return self._gone()
        first = time.perf_counter()
        metrics.ttft.observe(first - arrival)
        decode = itl_s * (tokens - 1)
        if decode > 0 and not await self._pause(request, decode):
            metrics.finish("abort", prompt_tokens, 1, time.perf_counter() - arrival)
            return self._gone()
        end = time.perf_counter()
        if tokens > 1:
            metrics.itl.observe((end - first) / (tokens - 1), tokens - 1)
        metrics.finish(reason, prompt_tokens, tokens, end - arrival)

        text = self._text_of(tokens)
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + tokens,
                 "completion_tokens": tokens, "prompt_tokens_details": None}
        if chat:
            choice = {"index": 0,
                      "message": {"role": "assistant", "content": text, "tool_calls": []},
                      "logprobs": None, "finish_reason": reason, "stop_reason": None}
            payload = {"id": f"chatcmpl-{random.getrandbits(128):032x}",
                       "object": "chat.completion", "created": int(time.time()),
                       "model": self.model, "choices": [choice], "usage": usage,
                       "prompt_logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
                      "stop_reason": None, "prompt_logprobs": None}
            payload = {"id": f"cmpl-{random.getrandbits(128):032x}",
                       "object": "text_completion", "created": int(time.time()),
                       "model": self.model, "choices": [choice], "usage": usage}
        return self._json(payload)

    async def _stream(self, request: web.Request, chat: bool, arrival: float,
                      prompt_tokens: int, tokens: int, reason: str,
                      include_usage: bool) -> web.StreamResponse:
        """SSE chunks written as they are produced; with no inter-token latency, in one write."""
        metrics = self.metrics
        ttft_s, itl_s = self._ttft_s, self._itl_s
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{random.getrandbits(128):032x}"
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = (f'data: {{"id":"{rid}","object":"{obj}","created":{int(time.time())},'
                f'"model":{self._model_json},"choices":[')
        if chat:
            role = head + ('{"index":0,"delta":{"role":"assistant","content":""},'
                           '"logprobs":null,"finish_reason":null}]}\n\n')
            open_ = head + '{"index":0,"delta":{"content":'
            close = '},"logprobs":null,"finish_reason":null}]}\n\n'
            last = '},"logprobs":null,"finish_reason":"' + reason + '","stop_reason":null}]}\n\n'
        else:
            role = ""
            open_ = head + '{"index":0,"text":'
            close = ',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
            last = ',"logprobs":null,"finish_reason":"' + reason + '","stop_reason":null}]}\n\n'
        tail = ""
        if include_usage:
            tail = (f'{head}],"usage":{{"prompt_tokens":{prompt_tokens},'
                    f'"total_tokens":{prompt_tokens + tokens},"completion_tokens":{tokens}}}}}\n\n')
        tail += "data: [DONE]\n\n"
        n_words = len(WORDS)

        def chunk(i: int) -> str:
            piece = _FIRST_TOKEN_JSON[0] if i == 0 else _NEXT_TOKEN_JSON[i % n_words]
            return open_ + piece + (last + tail if i == tokens - 1 else close)

        response = web.StreamResponse(headers=self.sse_headers)
        sent = 0
        try:
            await response.prepare(request)
            if ttft_s > 0 and not await self._pause(request, ttft_s):
                raise ConnectionResetError
            if itl_s <= 0:
                # Every token is ready at once: one write, as a fast vLLM would flush them.
                await response.write((role + "".join(map(chunk, range(tokens)))).encode())
                now = time.perf_counter()
                metrics.ttft.observe(now - arrival)
                if tokens > 1:
                    metrics.itl.observe(0.0, tokens - 1)
                sent = tokens
            else:
                await response.write((role + chunk(0)).encode())
                previous = time.perf_counter()
                metrics.ttft.observe(previous - arrival)
                sent = 1
                for i in range(1, tokens):
                    if not await self._pause(request, itl_s):
                        raise ConnectionResetError
                    await response.write(chunk(i).encode())
                    now = time.perf_counter()
                    metrics.itl.observe(now - previous)
                    previous = now
                    sent += 1
            await response.write_eof()
        except ConnectionError:
            metrics.finish("abort", prompt_tokens, sent, time.perf_counter() - arrival)
            return response
        metrics.finish(reason, prompt_tokens, tokens, time.perf_counter() - arrival)
        return response

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        arrival = time.perf_counter()
        if self._gated:
            early = await self._gate(request)
            if early is not None:
                return early
        try:
            body = await self._body(request)
            inputs = body.get("input")
            if isinstance(inputs, str) or (
                isinstance(inputs, list) and inputs and isinstance(inputs[0], int)
            ):
                inputs = [inputs]
            if not isinstance(inputs, list) or not inputs:
                raise RequestError(400, "input: field required (a string or a list).")
            dims = body.get("dimensions") or EMBEDDING_DIM
            if type(dims) is not int or not 1 <= dims <= 65536:
                raise RequestError(400, f"dimensions must be a positive integer, got {dims!r}.")
            encoding = body.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise RequestError(400, f"encoding_format must be float or base64: {encoding!r}")
        except RequestError as exc:
            return self._error(exc.status, exc.message, exc.kind)

        data, prompt_tokens = [], 0
        for index, item in enumerate(inputs):
            text = item if isinstance(item, str) else json.dumps(item)
            prompt_tokens += _completion_prompt_tokens(item)
            vector: Any = _embedding(text, dims)
            if encoding == "base64":
                vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"index": index, "object": "embedding", "embedding": vector})
        self.metrics.finish("stop", prompt_tokens, 0, time.perf_counter() - arrival)
        return self._json({
            "id": f"embd-{random.getrandbits(128):032x}", "object": "list",
            "created": int(time.time()), "model": self.model, "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                      "completion_tokens": 0, "prompt_tokens_details": None},
        })

    # -- plain endpoints ---------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        return web.Response(body=self._models_body, content_type=JSON_TYPE, headers=self.headers)

    async def health(self, request: web.Request) -> web.Response:
        # vLLM keeps /health at 200 while sleeping: the process is fine, the weights are not.
        return web.Response(headers=self.headers)

    async def version(self, request: web.Request) -> web.Response:
        return self._json({"version": self.config.version or VLLM_VERSION})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={
                "Content-Type": "text/plain; version=0.0.4; charset=utf-8", **self.headers})

    # -- sleep mode --------------------------------------------------------------------------

    async def sleep(self, request: web.Request) -> web.Response:
        level = request.query.get("level", "1")
        if level not in ("1", "2"):
            return self._error(400, f"level must be 1 or 2, got {level!r}.")
        self.sleeping, self.sleep_level = True, int(level)
        self._apply_faults()
        logs.event(log, "sim sleeping", model=self.model, level=level)
        return web.Response(headers=self.headers)

    async def wake_up(self, request: web.Request) -> web.Response:
        if self.sleeping and self.config.wake_ms > 0:
            await asyncio.sleep(self.config.wake_ms / 1000.0)
        if self.sleeping:
            self.sleeping, self.sleep_level = False, 0
            self._apply_faults()
            logs.event(log, "sim awake", model=self.model)
        return web.Response(headers=self.headers)

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return self._json({"is_sleeping": self.sleeping})

    # -- faults ------------------------------------------------------------------------------

    async def get_faults(self, request: web.Request) -> web.Response:
        return self._json(self.faults)

    async def delete_faults(self, request: web.Request) -> web.Response:
        self.faults = {}
        self._apply_faults()
        logs.event(log, "sim faults cleared", model=self.model)
        return self._json(self.faults)

    async def post_faults(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return self._fault_error("fault body is not valid JSON", None)
        if not isinstance(body, dict):
            return self._fault_error("fault body must be a JSON object", None)
        for key, value in body.items():
            problem = _fault_problem(key, value)
            if problem:
                return self._fault_error(problem, key)
        self.faults = {**self.faults, **body}
        self._apply_faults()
        logs.event(log, "sim faults set", model=self.model, faults=json.dumps(self.faults))
        return self._json(self.faults)

    def _fault_error(self, message: str, field: str | None) -> web.Response:
        error = {"message": message, "type": "invalid_request_error", "field": field}
        return self._json({"error": error}, 400)

    async def on_shutdown(self, app: web.Application) -> None:
        """End waiting requests (hangs, long TTFTs): they see `_closing` within POLL_S."""
        self._closing = True
        self._apply_faults()  # wakes hang waiters at once


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fault_problem(key: str, value: Any) -> str | None:
    """Why a fault setting is invalid, or None when it is fine."""
    if key not in _FAULT_KEYS:
        return f"unknown fault {key!r}; known: {', '.join(_FAULT_KEYS)}"
    if key == "error_rate" and not (_is_number(value) and 0.0 <= value <= 1.0):
        return f"error_rate must be a number in [0, 1], got {value!r}"
    if key == "status" and not (type(value) is int and 400 <= value <= 599):
        return f"status must be an integer HTTP error status in 400..599, got {value!r}"
    if key in ("ttft_ms", "itl_ms") and not (_is_number(value) and value >= 0):
        return f"{key} must be a non-negative number of milliseconds, got {value!r}"
    if key == "hang" and not isinstance(value, bool):
        return f"hang must be true or false, got {value!r}"
    return None


SIM_KEY = web.AppKey("sim", Sim)


def make_app(config: SimConfig) -> web.Application:
    """The simulator as an aiohttp application (run it with any runner)."""
    sim = Sim(config)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SIM_KEY] = sim
    app.router.add_get("/v1/models", sim.models)
    app.router.add_post("/v1/chat/completions", sim.chat_completions)
    app.router.add_post("/v1/completions", sim.completions)
    app.router.add_post("/v1/embeddings", sim.embeddings)
    app.router.add_get("/health", sim.health)
    app.router.add_get("/version", sim.version)
    app.router.add_get("/metrics", sim.prometheus)
    app.router.add_post("/sleep", sim.sleep)
    app.router.add_post("/wake_up", sim.wake_up)
    app.router.add_get("/is_sleeping", sim.is_sleeping)
    app.router.add_get("/sim/faults", sim.get_faults)
    app.router.add_post("/sim/faults", sim.post_faults)
    app.router.add_delete("/sim/faults", sim.delete_faults)
    app.on_shutdown.append(sim.on_shutdown)
    return app


async def serve(config: SimConfig, host: str, port: int) -> None:
    """Serve until cancelled; logs `sim ready` with the bound URL (port 0 picks a free one)."""
    runner = web.AppRunner(make_app(config), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        shown = f"[{host}]" if ":" in host else host
        logs.event(log, "sim ready", url=f"http://{shown}:{bound}", model=config.model,
                   version=config.version or "", ttft_ms=config.ttft_ms, itl_ms=config.itl_ms)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def _serve_until_signal(config: SimConfig, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    server = asyncio.create_task(serve(config, host, port))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({server, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if server.done():
        server.result()  # startup failed (port in use...): raise it
        return
    server.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await server
    logs.event(log, "sim stopped", model=config.model)


def run(config: SimConfig, host: str, port: int) -> None:
    """Blocking entry point for the CLI; SIGTERM and SIGINT stop it cleanly."""
    if not logging.getLogger(logs.LOGGER_NAME).handlers:
        logs.setup()
    time.sleep(config.startup_ms / 1000.0)
    loop_factory = None
    try:
        import uvloop  # optional: a faster event loop when installed

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve_until_signal(config, host, port))
