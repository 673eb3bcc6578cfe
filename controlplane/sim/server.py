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
import os
import random
import signal
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web

from controlplane import logs
from controlplane.prompt import BLOCK_TOKENS, block_chars, block_hashes, prompt_text
from controlplane.sim.metrics import SimMetrics

log = logs.get("sim")

# The vLLM release whose API this sim imitates (tests/fixtures/vllm/ was captured from it).
VLLM_VERSION = "0.32.0"
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
# What an engine woken from level-2 sleep without reloading its weights says instead.
GARBAGE = ("\u00bf", "\u00fe", "\u00a4", "\u00a7", "\u00b6", "\u00f0", "\u00ff")
_GARBAGE_JSON = [json.dumps(word) for word in GARBAGE]

JSON_TYPE = "application/json"
_dumps = json.JSONEncoder(separators=(",", ":")).encode  # compact, like vLLM's pydantic output
_FAULT_KEYS = ("error_rate", "status", "ttft_ms", "itl_ms", "hang", "sleep_ms", "wake_ms")
# What a fault given for one LoRA adapter (`"adapter": "<lora_name>"`) may set: its requests
# only. Sleep and wake are the whole server's.
_ADAPTER_FAULT_KEYS = ("error_rate", "status", "ttft_ms", "itl_ms", "hang")


@dataclass
class SimConfig:
    model: str = "sim-model"  # served model name
    ttft_ms: float = 0.0  # time to first token
    itl_ms: float = 0.0  # inter-token latency
    max_tokens_default: int = 16  # tokens generated when the request gives no max_tokens
    version: str | None = None  # when set, responses carry `x-sim-version: <version>`
    replica: int | None = None  # when set, responses carry `x-sim-replica: <replica>`
    wake_ms: float = 0.0  # how long `/wake_up` takes
    startup_ms: float = 0.0  # like vLLM loading weights: the port opens only after this
    max_model_len: int = 8192  # context window, reported by /v1/models and enforced like vLLM
    seed: int = 0  # seeds the error_rate fault's RNG so runs are repeatable
    max_num_seqs: int = 256  # requests running at once; more wait in a queue, as in vLLM
    # KV-cache size in tokens: vllm:kv_cache_usage_perc is what running requests hold of it,
    # and the prefix cache keeps this many tokens' blocks (least recently used go first).
    # 262,144 tokens is Llama-3-8B's KV cache in ~32 GB.
    kv_cache_tokens: int = 262144
    block_size: int = BLOCK_TOKENS  # tokens per cached block (a token is 4 characters)
    # Prefill: time to first token = ttft_ms + uncached prompt tokens x this; prefills take
    # turns (one compute budget per server), so a cache miss also delays what comes after.
    # 0.1 ms is an 8B model's ~10,000 prefill tokens per second on one GPU.
    prefill_ms_per_token: float = 0.1
    # LoRA adapters loaded at run time: at most this many at once (a load beyond is a 400),
    # each load taking `lora_load_ms` (vLLM reads the adapter's weights from disk).
    max_loras: int = 8
    lora_load_ms: float = 0.0


class RequestError(Exception):
    """A request vLLM would reject; carries the status and OpenAI error type to answer with."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param


def _adapter_shift(path: str) -> int:
    """Where a LoRA adapter's answers start in WORDS: its own (by its weights' path, so one
    adapter loaded under two names answers alike), never the base model's."""
    return 1 + sum(path.encode()) % (len(WORDS) - 1)


def _prompt_too_long(limit: int, prompt_tokens: int) -> RequestError:
    """vLLM stops counting a prompt's tokens one past the context window."""
    seen = min(prompt_tokens, limit + 1)
    return RequestError(400, (
        f"This model's maximum context length is {limit} tokens. However, your prompt "
        f"contains at least {seen} input tokens, which exceeds this limit even without any "
        f"output tokens. Please reduce the length of the input prompt. (parameter=input_tokens,"
        f" value={seen})"), param="input_tokens")  # fmt: skip


def _error_type(status: int) -> str:
    """vLLM names error types after the HTTP phrase: 503 -> ServiceUnavailableError."""
    try:
        name = HTTPStatus(status).phrase.title().replace(" ", "").replace("-", "")
    except ValueError:
        return "Error"
    return name if name.endswith("Error") else name + "Error"


def _chat_prompt_words(messages: list[Any]) -> list[str]:
    """The prompt's tokens, approximated as the words of all message text."""
    words: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise RequestError(400, "messages: each message must be an object")
        content = message.get("content")
        if isinstance(content, str):
            words += content.split()
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    words += part["text"].split()
    return words


def _completion_prompt_words(prompt: Any) -> list[str]:
    """Strings give words; token-id lists give ids (vLLM accepts both, and lists of them)."""
    if isinstance(prompt, str):
        return prompt.split()
    if isinstance(prompt, list):
        words: list[str] = []
        for item in prompt:
            if isinstance(item, str):
                words += item.split()
            elif isinstance(item, list):
                words += map(str, item)
            else:
                words.append(str(item))  # a token id
        return words
    raise RequestError(400, "prompt: must be a string, a list of strings or of token ids")


def _completion_prompt_tokens(prompt: Any) -> int:
    return max(len(_completion_prompt_words(prompt)), 1)


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
        self.metrics = SimMetrics(config.model, config.kv_cache_tokens, config.max_loras)
        self.headers = {"x-sim-version": config.version} if config.version else {}
        if config.replica is not None:
            self.headers["x-sim-replica"] = str(config.replica)
        self.sse_headers = {
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            **self.headers,
        }
        self._model_json = json.dumps(config.model)
        self._rng = random.Random(config.seed)
        self.faults: dict[str, Any] = {}
        # vLLM sleep mode: what is asleep (`weights`, `kv_cache`); requests wait until neither.
        self.asleep: set[str] = set()
        self.sleep_level = 0
        self._awake = asyncio.Event()
        self._awake.set()
        self._garbage = False  # level 2 discarded the weights; only reload_weights fixes that
        self.adapters: dict[str, str] = {}  # LoRA adapters loaded at run time: name -> path
        self.adapter_faults: dict[str, dict[str, Any]] = {}  # faults of one adapter's requests
        self._loading: set[str] = set()  # adapters whose load is under way (lora_load_ms)
        self._slots = asyncio.Semaphore(config.max_num_seqs)
        self._prefix: OrderedDict[int, None] = OrderedDict()  # cached prompt blocks (hashes)
        self._block_chars = block_chars(config.block_size)
        self._cache_blocks = max(1, config.kv_cache_tokens // config.block_size)
        self._prefill_s = config.prefill_ms_per_token / 1000.0
        self._prefill_free_at = 0.0  # when this server's prefill compute is next free
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
        self._created = int(time.time())
        self._models_body = self._list_models()

    @property
    def sleeping(self) -> bool:
        return bool(self.asleep)

    def _list_models(self) -> bytes:
        """/v1/models as vLLM lists it: the served model, then each LoRA adapter (`parent`)."""
        base = {"id": self.model, "object": "model", "created": self._created,
                "owned_by": "vllm", "root": self.model, "parent": None,
                "max_model_len": self.config.max_model_len, "permission": []}
        adapters = [{**base, "id": name, "root": path, "parent": self.model,
                     "max_model_len": None} for name, path in self.adapters.items()]
        return _dumps({"object": "list", "data": [base, *adapters]}).encode()

    # -- helpers -----------------------------------------------------------------------------

    def _apply_faults(self) -> None:
        """Recompute the hot-path view of the faults and wake requests waiting on them."""
        cfg, faults = self.config, self.faults
        self._ttft_s = (cfg.ttft_ms + faults.get("ttft_ms", 0.0)) / 1000.0
        self._itl_s = (cfg.itl_ms + faults.get("itl_ms", 0.0)) / 1000.0
        self._error_rate = float(faults.get("error_rate", 0.0))
        self._error_status = int(faults.get("status", 500))
        self._hang = bool(faults.get("hang", False))
        self._sleep_s = (faults.get("sleep_ms", 0.0)) / 1000.0
        self._wake_s = (cfg.wake_ms + faults.get("wake_ms", 0.0)) / 1000.0
        self._gated = self.sleeping or self._hang or self._error_rate > 0 or self._closing
        self._faults_changed.set()
        self._faults_changed = asyncio.Event()

    def _json(self, payload: Any, status: int = 200) -> web.Response:
        return web.Response(
            body=_dumps(payload).encode(), status=status, content_type=JSON_TYPE,
            headers=self.headers,
        )

    def _error(self, status: int, message: str, kind: str | None = None,
               param: str | None = None) -> web.Response:
        """An error in vLLM's OpenAI shape."""
        error = {"message": message, "type": kind or _error_type(status), "param": param,
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
        """Sleep mode and injected faults, checked before the request is even parsed. Like
        vLLM, a request that arrives while the engine sleeps waits until it is awake."""
        if (self._hang and not await self._pause(request, None)) or self._closing:
            return self._gone()
        if self.sleeping and not await self._until_awake(request):
            return self._gone()
        rate = self._error_rate
        if rate > 0 and (rate >= 1.0 or self._rng.random() < rate):
            self.metrics.success["error"] += 1
            response = self._error(self._error_status,
                                   f"Injected fault: status {self._error_status}.")
            response.headers["x-sim-fault"] = "error_rate"
            return response
        return None

    async def _until_awake(self, request: web.Request) -> bool:
        """Hold a request while the engine sleeps; False if its client left meanwhile."""
        while self.sleeping:
            transport = request.transport
            if self._closing or transport is None or transport.is_closing():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._awake.wait(), POLL_S)
        return True

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            raise RequestError(400, f"Request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "Request body must be a JSON object.")
        model = body.get("model")
        if model is not None and model != self.model and model not in self.adapters:
            raise RequestError(404, f"The model `{model}` does not exist. Valid aliases: "
                               f"{self.model}.", "NotFoundError", "model")
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
                raise _prompt_too_long(limit, prompt_tokens)
            return tokens, reason
        if type(requested) is not int or requested < 1:
            raise RequestError(400, f"max_tokens must be at least 1, got {requested!r}.")
        if requested > limit:
            raise RequestError(400, (
                f"max_tokens={requested} cannot be greater than max_model_len={limit}. Please "
                f"request fewer output tokens. (parameter=max_tokens, value={requested})"),
                param="max_tokens")
        if prompt_tokens >= limit:
            raise _prompt_too_long(limit, prompt_tokens)
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
                words = _chat_prompt_words(messages)
            else:
                prompt = body.get("prompt")
                if prompt is None or prompt == "" or prompt == []:
                    raise RequestError(400, "prompt: field required (a non-empty prompt).")
                words = _completion_prompt_words(prompt)
            prompt_tokens = max(len(words), 1)
            text = prompt_text(body)
            tokens, reason = self._max_tokens(body, chat, prompt_tokens)
        except RequestError as exc:
            return self._error(exc.status, exc.message, exc.kind, exc.param)

        model = body.get("model") or self.model
        extra_ttft_s = extra_itl_s = 0.0
        if self.adapter_faults and model in self.adapter_faults:
            early = await self._adapter_gate(request, model)
            if early is not None:
                return early
            faults = self.adapter_faults.get(model, {})
            extra_ttft_s = faults.get("ttft_ms", 0.0) / 1000.0
            extra_itl_s = faults.get("itl_ms", 0.0) / 1000.0
        metrics = self.metrics
        lora = metrics.lora if model != self.model else None
        held = prompt_tokens + tokens  # KV-cache tokens this request holds while it runs
        if self._slots.locked():  # max_num_seqs running: wait in the queue, as vLLM does
            metrics.waiting += 1
            if lora is not None:
                lora.waiting[model] += 1
            try:
                await self._slots.acquire()
            finally:
                metrics.waiting -= 1
                if lora is not None:
                    lora.waiting[model] -= 1
        else:
            await self._slots.acquire()
        metrics.queue.observe(time.perf_counter() - arrival)
        metrics.running += 1
        metrics.kv_tokens += held
        if lora is not None:
            lora.running[model] += 1
        try:
            cached = self._prefix_cached(text, prompt_tokens)
            ttft_s = self._ttft_s + extra_ttft_s + self._prefill(prompt_tokens - cached)
            if body.get("stream"):
                options = body.get("stream_options")
                usage = isinstance(options, dict) and bool(options.get("include_usage"))
                return await self._stream(request, chat, arrival, prompt_tokens, tokens, reason,
                                          usage, ttft_s, model, extra_itl_s)
            return await self._complete(request, chat, arrival, prompt_tokens, tokens, reason,
                                        ttft_s, model, extra_itl_s)
        finally:
            metrics.running -= 1
            metrics.kv_tokens -= held
            if lora is not None:
                lora.running[model] -= 1
            self._slots.release()

    async def _adapter_gate(self, request: web.Request, model: str) -> web.Response | None:
        """One adapter's faults (`POST /sim/faults {"adapter": ...}`): a hang holds its
        requests until cleared, an error rate fails them; the base model is untouched."""
        while self.adapter_faults.get(model, {}).get("hang"):
            transport = request.transport
            if self._closing or transport is None or transport.is_closing():
                return self._gone()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._faults_changed.wait(), POLL_S)
        faults = self.adapter_faults.get(model, {})
        rate = float(faults.get("error_rate", 0.0))
        if rate > 0 and (rate >= 1.0 or self._rng.random() < rate):
            status = int(faults.get("status", 500))
            self.metrics.success["error"] += 1
            response = self._error(status, f"Injected fault: status {status} (adapter {model}).")
            response.headers["x-sim-fault"] = "error_rate"
            return response
        return None

    def _prefix_cached(self, text: str, prompt_tokens: int) -> int:
        """vLLM's automatic prefix caching, per server: the prompt's full blocks, each hash
        chained on the previous one (controlplane/prompt.py, as the picker computes them),
        are looked up and then cached; returns how many prompt tokens were found (their
        prefill is skipped)."""
        metrics = self.metrics
        metrics.prefix_queries += prompt_tokens
        size = self._block_chars
        hashes = block_hashes(text, size)
        if not hashes:
            return 0
        cache, hits, missed = self._prefix, 0, False
        for chained in hashes:
            if not missed and chained in cache:
                hits += 1
                cache.move_to_end(chained)
            else:
                missed = True
                cache[chained] = None
        while len(cache) > self._cache_blocks:
            cache.popitem(last=False)
        if hits * size >= len(text):
            hits -= 1  # the last block is computed again for the first token
        cached = prompt_tokens * hits * size // len(text)
        metrics.prefix_hits += cached
        return cached

    def _prefill(self, tokens: int) -> float:
        """Seconds until this request's first token is computed: its prefill, after the
        prefills already queued on this server's compute (they take turns)."""
        if tokens <= 0 or self._prefill_s <= 0:
            return 0.0
        now = time.perf_counter()
        start = max(now, self._prefill_free_at)
        self._prefill_free_at = start + tokens * self._prefill_s
        return self._prefill_free_at - now

    async def _complete(self, request: web.Request, chat: bool, arrival: float,
                        prompt_tokens: int, tokens: int, reason: str, ttft_s: float,
                        model: str, extra_itl_s: float = 0.0) -> web.StreamResponse:
        """A non-streaming answer, after the same wait the stream would have taken."""
        metrics = self.metrics
        itl_s = self._itl_s + extra_itl_s
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

        if self._garbage:
            text = "".join(GARBAGE[i % len(GARBAGE)] for i in range(tokens))
        elif model != self.model:  # a LoRA adapter: other weights, other words
            shift = _adapter_shift(self.adapters.get(model, model))
            text = " ".join(WORDS[(shift + i) % len(WORDS)] for i in range(tokens))
        else:
            text = self._text_of(tokens)
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + tokens,
                 "completion_tokens": tokens, "prompt_tokens_details": None}
        if chat:
            choice = {"index": 0,
                      "message": {"role": "assistant", "content": text, "tool_calls": []},
                      "logprobs": None, "finish_reason": reason, "stop_reason": None}
            payload = {"id": f"chatcmpl-{random.getrandbits(128):032x}",
                       "object": "chat.completion", "created": int(time.time()),
                       "model": model, "choices": [choice], "usage": usage,
                       "prompt_logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
                      "stop_reason": None, "prompt_logprobs": None}
            payload = {"id": f"cmpl-{random.getrandbits(128):032x}",
                       "object": "text_completion", "created": int(time.time()),
                       "model": model, "choices": [choice], "usage": usage}
        return self._json(payload)

    async def _stream(self, request: web.Request, chat: bool, arrival: float,
                      prompt_tokens: int, tokens: int, reason: str, include_usage: bool,
                      ttft_s: float, model: str, extra_itl_s: float = 0.0) -> web.StreamResponse:
        """SSE chunks written as they are produced; with no inter-token latency, in one write."""
        metrics = self.metrics
        itl_s = self._itl_s + extra_itl_s
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{random.getrandbits(128):032x}"
        obj = "chat.completion.chunk" if chat else "text_completion"
        model_json = self._model_json if model == self.model else json.dumps(model)
        head = (f'data: {{"id":"{rid}","object":"{obj}","created":{int(time.time())},'
                f'"model":{model_json},"choices":[')
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
        first, following, shift = _FIRST_TOKEN_JSON, _NEXT_TOKEN_JSON, 0
        if self._garbage:
            first = following = _GARBAGE_JSON
        elif model != self.model:
            shift = _adapter_shift(self.adapters.get(model, model))
        n_words = len(following)

        def chunk(i: int) -> str:
            piece = first[shift % n_words] if i == 0 else following[(shift + i) % n_words]
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
        return self._json({"version": VLLM_VERSION})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={
                "Content-Type": "text/plain; version=0.0.4; charset=utf-8", **self.headers})

    # -- sleep mode --------------------------------------------------------------------------

    async def sleep(self, request: web.Request) -> web.Response:
        """vLLM's POST /sleep?level=0|1|2[&mode=abort|wait|keep]. From now on requests wait
        until the engine is awake; with mode=wait it first lets the running ones finish (the
        sim never aborts: its running requests finish either way). Level 2 discards the
        weights: after waking they are garbage until /collective_rpc reload_weights."""
        level = request.query.get("level", "1")
        if level not in ("0", "1", "2"):
            return self._error(400, f"level must be 0, 1 or 2, got {level!r}.", "Bad Request",
                               "query.level")
        self.asleep = {"weights", "kv_cache"}
        self.sleep_level = int(level)
        self._awake.clear()
        self._garbage = self._garbage or level == "2"
        self.metrics.sleep_state = {"1": "weights_offloaded", "2": "discard_all"}.get(level, "")
        self._apply_faults()
        if request.query.get("mode") == "wait":
            while self.metrics.running and not self._closing:
                await asyncio.sleep(POLL_S / 10)
        deadline = asyncio.get_running_loop().time() + self._sleep_s
        while asyncio.get_running_loop().time() < deadline and not self._closing:
            await asyncio.sleep(POLL_S)  # a slow sleep (fault), cut short by a shutdown
        logs.event(log, "sim sleeping", model=self.model, level=level)
        return self._json({"status": "sleeping", "level": int(level)})

    async def wake_up(self, request: web.Request) -> web.Response:
        """vLLM's POST /wake_up[?tags=weights|kv_cache]: wakes what the tags name (all without
        tags); the engine serves again once nothing is asleep."""
        tags = request.query.getall("tags", [])
        if self.sleeping and self._wake_s > 0:
            await asyncio.sleep(self._wake_s)
        self.asleep -= set(tags) if tags else self.asleep
        if not self.sleeping and not self._awake.is_set():
            self.sleep_level = 0
            self.metrics.sleep_state = "awake"
            self._awake.set()
            self._apply_faults()
            logs.event(log, "sim awake", model=self.model, garbage=self._garbage)
        status = "sleeping" if self.sleeping else "awake"
        return self._json({"status": status, "tags": tags or None})

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return self._json({"is_sleeping": self.sleeping})

    async def collective_rpc(self, request: web.Request) -> web.Response:
        """vLLM's dev-mode POST /collective_rpc; the sim knows `reload_weights` (after a
        level-2 sleep: the weights from disk again, no more garbage)."""
        try:
            body = json.loads(await request.read())
            method = body["method"]
        except (ValueError, TypeError, KeyError):
            return self._error(400, "body must be a JSON object with a 'method'")
        if method != "reload_weights":
            return self._error(500, f"method {method!r} is not known to the simulator")
        self._garbage = False
        logs.event(log, "sim weights reloaded", model=self.model)
        return self._json({"results": [None]})

    # -- LoRA adapters at run time (VLLM_ALLOW_RUNTIME_LORA_UPDATING) ---------------------------

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            name, path = body["lora_name"], body["lora_path"]
        except (ValueError, TypeError, KeyError):
            return self._error(400, "lora_name and lora_path are required")
        if name in self.adapters or name in self._loading:
            return self._error(400, f"The lora adapter '{name}' has already been loaded. If you "
                               "want to load the adapter in place, set 'load_inplace' to True.",
                               "InvalidUserInput")  # fmt: skip
        if not os.path.isfile(os.path.join(str(path), "adapter_config.json")):
            return self._error(404, f"Loading lora {name} failed: No adapter found for {path}",
                               "NotFoundError")  # fmt: skip
        limit = self.config.max_loras
        if len(self.adapters) + len(self._loading) >= limit:
            return self._error(400, f"Cannot load LoRA adapter '{name}': {len(self.adapters)} "
                               f"adapters are loaded, the most this server holds (max_loras "
                               f"{limit}). Unload one first.", "InvalidUserInput")  # fmt: skip
        if self.config.lora_load_ms > 0:  # reading the weights: not served until done
            self._loading.add(name)
            try:
                await asyncio.sleep(self.config.lora_load_ms / 1000.0)
            finally:
                self._loading.discard(name)
        self.adapters[name] = str(path)
        self._models_body = self._list_models()
        logs.event(log, "sim adapter loaded", model=self.model, adapter=name)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.",
                            headers=self.headers)  # fmt: skip

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        try:
            name = json.loads(await request.read())["lora_name"]
        except (ValueError, TypeError, KeyError):
            return self._error(400, "lora_name is required")
        if self.adapters.pop(name, None) is None:
            return self._error(404, f"The lora adapter '{name}' cannot be found.",
                               "NotFoundError")
        if self.adapter_faults.pop(name, None) is not None:
            self._apply_faults()  # its held requests end (their model is gone: 404)
        self._models_body = self._list_models()
        logs.event(log, "sim adapter unloaded", model=self.model, adapter=name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.",
                            headers=self.headers)  # fmt: skip

    # -- faults ------------------------------------------------------------------------------

    async def get_faults(self, request: web.Request) -> web.Response:
        """The server's faults, and each adapter's under `adapters`."""
        if self.adapter_faults:
            return self._json({**self.faults, "adapters": self.adapter_faults})
        return self._json(self.faults)

    async def delete_faults(self, request: web.Request) -> web.Response:
        """Clear every fault, or only one adapter's with `?adapter=<lora_name>`."""
        adapter = request.query.get("adapter")
        if adapter is not None:
            self.adapter_faults.pop(adapter, None)
        else:
            self.faults, self.adapter_faults = {}, {}
        self._apply_faults()
        logs.event(log, "sim faults cleared", model=self.model, adapter=adapter or "-")
        return self._json(self.faults)

    async def post_faults(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return self._fault_error("fault body is not valid JSON", None)
        if not isinstance(body, dict):
            return self._fault_error("fault body must be a JSON object", None)
        if "adapter" in body:
            return self._post_adapter_faults(body)
        for key, value in body.items():
            problem = _fault_problem(key, value)
            if problem:
                return self._fault_error(problem, key)
        self.faults = {**self.faults, **body}
        self._apply_faults()
        logs.event(log, "sim faults set", model=self.model, faults=json.dumps(self.faults))
        return self._json(self.faults)

    def _post_adapter_faults(self, body: dict[str, Any]) -> web.Response:
        """Faults of one loaded adapter's requests; the base model and the others serve on."""
        faults = dict(body)
        name = faults.pop("adapter")
        if name not in self.adapters:
            loaded = ", ".join(self.adapters) or "none"
            return self._json({"error": {
                "message": f"no LoRA adapter {name!r} is loaded (loaded: {loaded})",
                "type": "invalid_request_error", "field": "adapter"}}, 404)  # fmt: skip
        for key, value in faults.items():
            if key not in _ADAPTER_FAULT_KEYS:
                return self._fault_error(
                    f"{key!r} is not a fault of one adapter; known: "
                    f"{', '.join(_ADAPTER_FAULT_KEYS)}", key)  # fmt: skip
            problem = _fault_problem(key, value)
            if problem:
                return self._fault_error(problem, key)
        self.adapter_faults[name] = {**self.adapter_faults.get(name, {}), **faults}
        self._apply_faults()  # wakes requests held by this adapter's hang
        logs.event(log, "sim faults set", model=self.model, adapter=name,
                   faults=json.dumps(self.adapter_faults[name]))  # fmt: skip
        return self._json(self.adapter_faults[name])

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
    durations = ("ttft_ms", "itl_ms", "sleep_ms", "wake_ms")
    if key in durations and not (_is_number(value) and value >= 0):
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
    app.router.add_post("/collective_rpc", sim.collective_rpc)
    app.router.add_post("/v1/load_lora_adapter", sim.load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", sim.unload_lora_adapter)
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
