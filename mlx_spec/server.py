"""`mlx-spec serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn), thin over stream_generate.

Requests are validated and tokenized on the event loop's side; one engine thread runs every generation in
arrival order, keeps the prompt caches of the last few conversations and streams events back to the handlers.
"""

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import queue
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from mlx_lm.sample_utils import make_logits_processors
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from .cache import CachePair, common_prefix_length, make_prompt_cache, reuse_prefix
from .chat import conversation_tokens
from .generate import encode_prompt, stream_generate
from .load import model_name, model_source, output_size
from .options import (
    MAX_BODY,
    MAX_QUEUE,
    MAX_TOP_LOGPROBS,
    NUM_PROMPT_CACHES,
    GenerationOptions,
    parse_num_draft_tokens,
)
from .stats import GenerationStats

log = logging.getLogger("mlx_spec.server")

SHUTDOWN_GRACE = 3  # seconds answers in flight get to end on Ctrl-C / SIGTERM (a long prefill cannot stop)
STOPPING = "the server is stopping"
MAX_RETRY_AFTER = 60  # seconds


# --- errors --------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {401: "authentication_error", 404: "not_found_error"}  # else invalid_request_error, or server_error

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = "server_error" if self.status >= 500 else self.TYPES.get(self.status, "invalid_request_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _validation_error(error: RequestValidationError) -> APIError:
    """The first complaint of pydantic (or of the JSON parser), naming the field as OpenAI does (messages[0].role)."""
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(
            400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}", code="json_invalid"
        )
    loc = [part for part in first["loc"][1:] if isinstance(part, int) or part in _FIELD_NAMES]  # no union tags
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if not param:
        return APIError(400, "the request body must be a JSON object")
    return APIError(400, f"{param}: {first['msg']}", param=param)


# --- requests ------------------------------------------------------------------


class TextPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    role: str
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The fields both endpoints share; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logit_bias: dict[str, float] | None = None  # token id -> added to its logit, -100..100
    presence_penalty: float | None = None  # -2..2
    frequency_penalty: float | None = None  # -2..2
    # extensions
    top_k: int | None = None
    min_p: float | None = None
    num_draft_tokens: int | str | None = None  # "auto" or 1..MAX_DRAFT_TOKENS
    draft: bool = True  # False: this request without the draft model


class ChatRequest(GenerationRequest):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


_FIELD_NAMES = {
    name
    for request in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions)
    for name in request.model_fields
}


# --- stop strings and the reply a client sees ------------------------------------


class StopStrings:
    """Cut generated text before the first stop string; hold back text that may be the start of one.

    `add(text)` returns (text that is safe to show now, whether a stop string was found); `flush()` returns
    what was held back, once generation ended without one.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""  # the longest tail of the text that begins some stop string

    def add(self, text: str) -> tuple[str, bool]:
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.held = self.held[: min(found)], ""
            return out, True
        keep = max((self._partial(s) for s in self.stops), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out, False

    def _partial(self, stop: str) -> int:
        """Length of the longest tail of `held` that is a proper beginning of `stop`."""
        for n in range(min(len(stop) - 1, len(self.held)), 0, -1):
            if self.held.endswith(stop[:n]):
                return n
        return 0

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class TokenLogprob:
    """One emitted token's log-probability under the main model, and the likeliest alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]]
    text_offset: int  # where the token's text starts in the reply


class Reply:
    """The reply as a client sees it: text cut at stop strings, each token's logprobs released with its text."""

    def __init__(self, stops: list[str]):
        self.stops = StopStrings(stops)
        self.num_generated = 0  # characters generated, held ones included
        self.num_shown = 0  # characters released to the client
        self.pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not out yet

    def add(self, text: str, entry: TokenLogprob | None) -> tuple[str, list[TokenLogprob], bool]:
        """A generated text segment and its token's logprobs -> (text to send, logprobs to send, stopped)."""
        if entry is not None:
            entry.text_offset = self.num_generated
            self.pending.append(entry)
        self.num_generated += len(text)
        out, stopped = self.stops.add(text)
        self.num_shown += len(out)
        released = [e for e in self.pending if e.text_offset < self.num_shown]
        self.pending = [] if stopped else self.pending[len(released) :]
        return out, released, stopped

    def finish(self) -> tuple[str, list[TokenLogprob]]:
        """The end of generation without a stop string: everything held back."""
        out, released = self.stops.flush(), self.pending
        self.num_shown += len(out)
        self.pending = []
        return out, released


# --- the engine thread -------------------------------------------------------------


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Done:
    finish_reason: str  # "stop" or "length"
    usage: dict
    stats: dict
    summary: str  # for the request's log line


@dataclass
class Failed:
    message: str
    status: int = 500


@dataclass
class Job:
    """One request's generation; the engine thread sends its events to the request's event loop."""

    prompt_tokens: list[int]
    options: GenerationOptions
    use_draft: bool
    stops: list[str]
    num_top_logprobs: int | None  # None: no logprobs
    logits_processors: list | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client left, or the server stops

    def send(self, event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(retry_after)
        self.retry_after = retry_after


@dataclass
class _Cached:
    cache: CachePair
    num_prompt: int  # tokens of the prompt it last answered


class PromptCaches:
    """The caches of the last few conversations, least recently used first.

    A request takes the cache that shares the longest prefix with its prompt if
    that prefix covers the prompt the cache last answered (the conversation goes
    on, or its last answer is asked again) or at least half of what the cache
    holds (an earlier message was edited); otherwise it starts a fresh cache, so
    that another conversation's cache is not cut back to a shared system prompt.
    """

    def __init__(self, model, draft_model, max_kv_size: int | None, size: int):
        self.model, self.draft_model, self.max_kv_size, self.size = model, draft_model, max_kv_size, size
        self.entries: list[_Cached] = []

    def take(self, tokens: list[int], use_draft: bool) -> tuple[CachePair, list[int]]:
        """A cache for `tokens` (out of the pool until `put` back) and the tokens it still needs."""

        def shared(entry: _Cached) -> int:
            return common_prefix_length(entry.cache.tokens, tokens)

        candidates = [e for e in self.entries if (e.cache.draft is not None) == use_draft]
        best = max(candidates, key=shared, default=None)
        if best is not None and (shared(best) >= best.num_prompt or 2 * shared(best) >= len(best.cache.tokens)):
            self.entries.remove(best)
            num_kept = reuse_prefix(best.cache, tokens)
            if num_kept is not None:  # else a rotating cache that cannot go back that far: dropped
                return best.cache, tokens[num_kept:]
        return make_prompt_cache(self.model, self.draft_model if use_draft else None, self.max_kv_size), tokens

    def put(self, cache: CachePair, num_prompt: int):
        self.entries.append(_Cached(cache, num_prompt))
        del self.entries[: -self.size]


class Engine:
    """Runs every generation on one thread (MLX's default stream is per thread), in arrival order.

    At most `max_queue` jobs wait; `submit` raises QueueFull past that.
    """

    def __init__(self, model, tokenizer, draft_model, max_kv_size, max_queue: int, num_prompt_caches: int):
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.max_queue = max_queue
        self.caches = PromptCaches(model, draft_model, max_kv_size, num_prompt_caches)
        self.draft_name = served_name(draft_model) if draft_model is not None else None
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.num_waiting = 0
        self.current: Job | None = None
        self.stopping = False
        self.mean_seconds = 1.0  # running mean of a job's seconds, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="mlx-spec-engine", daemon=True)

    def start(self):
        self.thread.start()

    def cancel_all(self):
        """The server is stopping: the running and the waiting jobs end at once, answered 503."""
        with self.lock:
            self.stopping = True
            for job in [self.current, *self.jobs.queue]:
                if job is not None:
                    job.cancelled.set()

    def stop(self):
        """Cancel every job and end the thread."""
        self.cancel_all()
        self.jobs.put(None)
        self.thread.join()

    def submit(self, job: Job):
        with self.lock:
            if self.num_waiting >= self.max_queue:
                retry_after = math.ceil(self.mean_seconds * (self.num_waiting + 1))
                raise QueueFull(min(max(retry_after, 1), MAX_RETRY_AFTER))
            self.num_waiting += 1
        self.jobs.put(job)

    def status(self) -> dict:
        return {"waiting": self.num_waiting, "generating": self.current is not None}

    def _loop(self):
        while (job := self.jobs.get()) is not None:
            with self.lock:
                self.num_waiting -= 1
                self.current = job
            start = time.perf_counter()
            try:
                if self.stopping:
                    job.send(Failed(STOPPING, 503))
                elif not job.cancelled.is_set():  # else its client left while it waited
                    self._run(job)
            except Exception as e:
                log.exception("generation failed")
                job.send(Failed(f"internal error: {type(e).__name__}: {_first_line(e)}"))
            finally:
                with self.lock:
                    self.current = None
                self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.perf_counter() - start)

    def _run(self, job: Job):
        draft_model = self.draft_model if job.use_draft else None
        cache, new_tokens = self.caches.take(job.prompt_tokens, draft_model is not None)
        stats, reply = GenerationStats(), Reply(job.stops)
        num_from_draft, finish_reason, stop_reason = 0, "length", "maxPredictedTokensReached"
        responses = stream_generate(
            self.model,
            self.tokenizer,
            new_tokens,
            draft_model=draft_model,
            prompt_cache=cache,
            stats=stats,
            logits_processors=job.logits_processors,
            **job.options.as_kwargs(),
        )
        with closing(responses):  # stopping early leaves the cache holding exactly the tokens generated
            for response in responses:
                num_from_draft += response.from_draft
                end_token = response.finish_reason == "stop"
                entry = None
                if job.num_top_logprobs is not None and not end_token:
                    entry = self._logprob(response.token, response.logprobs, job.num_top_logprobs)
                text, entries, stopped = reply.add(response.text, entry)
                if stopped or response.finish_reason is not None:
                    if not stopped:
                        rest, more = reply.finish()
                        text, entries = text + rest, entries + more
                    finish_reason = "stop" if stopped or end_token else "length"
                    stop_reason = "stopStringFound" if stopped else "eosFound" if end_token else stop_reason
                if text or entries:
                    job.send(Delta(text, entries))
                if stopped or job.cancelled.is_set():
                    break
        self.caches.put(cache, len(job.prompt_tokens))
        done = self._done(job, stats, num_from_draft, finish_reason, stop_reason, draft_model is not None)
        if job.cancelled.is_set():
            why = "the server is stopping" if self.stopping else "the client left"
            log.info(f"generation stopped after {stats.generation_tokens} tokens: {why}")
        job.send(Failed(STOPPING, 503) if self.stopping else done)

    def _logprob(self, token: int, logprobs: mx.array, num_top: int) -> TokenLogprob:
        """The token's log-probability and the `num_top` likeliest tokens' (one host read, only when asked)."""
        top = mx.argpartition(-logprobs, num_top - 1)[:num_top] if num_top else mx.zeros((0,), mx.int32)
        values = mx.concatenate([logprobs[token : token + 1], logprobs[top]]).astype(mx.float32).tolist()
        ranked = sorted(zip(top.tolist(), values[1:]), key=lambda pair: -pair[1])
        return TokenLogprob(self._text(token), values[0], [(self._text(t), v) for t, v in ranked], 0)

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _done(self, job, stats: GenerationStats, num_from_draft: int, finish_reason, stop_reason, drafted) -> Done:
        # LM Studio splits the draft tokens into accepted + rejected + ignored. Ignored here: draft tokens the
        # main model accepted in the last round after the point where generation ended (an end token or a stop
        # string within the round), computed but never part of the reply. (A round never drafts past max_tokens.)
        num_ignored = stats.accepted_draft_tokens - num_from_draft
        usage = {
            "prompt_tokens": len(job.prompt_tokens),
            "completion_tokens": stats.generation_tokens,
            "total_tokens": len(job.prompt_tokens) + stats.generation_tokens,
            "prompt_tokens_details": {"cached_tokens": len(job.prompt_tokens) - stats.prompt_tokens},
        }
        out = {
            "tokens_per_second": stats.generation_tps,
            "time_to_first_token": stats.time_to_first_token,
            "generation_time": stats.generation_time,
            "stop_reason": stop_reason,
            "draft_model": self.draft_name if drafted else None,
            "total_draft_tokens_count": stats.total_draft_tokens,
            "accepted_draft_tokens_count": num_from_draft,
            "rejected_draft_tokens_count": stats.rejected_draft_tokens,
            "ignored_draft_tokens_count": num_ignored,
            "lookup_draft_tokens_count": stats.lookup_draft_tokens,  # of the drafted, copied from the conversation
            "lookup_accepted_tokens_count": stats.lookup_accepted_tokens,
            "rounds": stats.num_rounds,
            "tokens_per_round": stats.mean_tokens_per_round,
        }
        summary = (
            f"{usage['prompt_tokens']} prompt tokens ({usage['prompt_tokens_details']['cached_tokens']} cached), "
            f"{stats.generation_tokens} tokens, {stats.generation_tps:.1f} tok/s"
        )
        if stats.total_draft_tokens:
            summary += (
                f", accepted {stats.accepted_draft_tokens}/{stats.total_draft_tokens} draft tokens "
                f"({100 * stats.acceptance_rate:.0f}%), {stats.mean_tokens_per_round:.2f} tokens per round"
            )
        return Done(finish_reason, usage, out, f"{summary}, {stop_reason}")


# --- responses in OpenAI's shapes ----------------------------------------------------


class ChatFormat:
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    @staticmethod
    def first_delta() -> dict | None:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    @staticmethod
    def delta(text: str, entries: list[TokenLogprob] | None, finish_reason=None) -> dict:
        delta = {"content": text} if text else {}
        logprobs = None if entries is None else {"content": [_chat_logprob(e) for e in entries]}
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    @staticmethod
    def whole(text: str, entries: list[TokenLogprob] | None, finish_reason: str) -> dict:
        logprobs = None if entries is None else {"content": [_chat_logprob(e) for e in entries], "refusal": None}
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


class CompletionFormat:
    object = chunk_object = "text_completion"

    @staticmethod
    def first_delta() -> dict | None:
        return None

    @staticmethod
    def delta(text: str, entries: list[TokenLogprob] | None, finish_reason=None) -> dict:
        return CompletionFormat.whole(text, entries, finish_reason)

    @staticmethod
    def whole(text: str, entries: list[TokenLogprob] | None, finish_reason: str | None) -> dict:
        logprobs = None
        if entries is not None:
            logprobs = {
                "tokens": [e.token for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [dict(e.top) for e in entries],
                "text_offset": [e.text_offset for e in entries],
            }
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def _chat_logprob(entry: TokenLogprob) -> dict:
    def item(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {**item(entry.token, entry.logprob), "top_logprobs": [item(t, v) for t, v in entry.top]}


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


# --- the application ---------------------------------------------------------------


def served_name(model) -> str:
    """The id a model is served under: a folder's name, or the hub id or file it was loaded from."""
    source = model_source(model) or model_name(model)
    path = Path(source).expanduser()
    return path.name if path.is_dir() else source


@dataclass
class Server:
    """What the handlers share: models, defaults, limits and the engine."""

    model: Any
    tokenizer: Any
    draft_model: Any
    defaults: GenerationOptions
    engine: Engine
    api_key: str | None
    system_prompt: str | None
    model_id: str
    context_limit: int | None
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, name: str | None):
        if name is not None and name not in (self.model_id, model_source(self.model)):
            raise APIError(
                404, f"model {name!r} is not served here; this server has {self.model_id!r}", "model", "model_not_found"
            )

    def options(self, body: GenerationRequest, max_tokens: int | None, max_tokens_param: str) -> GenerationOptions:
        """The server's defaults with the request's fields, each checked by GenerationOptions (400 naming it)."""
        if body.n != 1:
            raise APIError(400, f"n must be 1: one choice per request, got {body.n}", "n")
        changes = {
            max_tokens_param: ("max_tokens", max_tokens),
            "temperature": ("temp", body.temperature),
            "top_p": ("top_p", body.top_p),
            "top_k": ("top_k", body.top_k),
            "min_p": ("min_p", body.min_p),
            "seed": ("seed", body.seed),
            "num_draft_tokens": ("num_draft_tokens", body.num_draft_tokens),
        }
        options = self.defaults
        for param, (name, value) in changes.items():
            if value is None:
                continue
            try:
                if name == "num_draft_tokens":
                    value = parse_num_draft_tokens(value)
                options = options.replace(**{name: value})
            except ValueError as e:
                raise APIError(400, f"invalid {param}: {e}", param) from None
        return options

    def stops(self, stop) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", "stop")
        return stops

    def job(self, tokens: list[int], options: GenerationOptions, body: GenerationRequest, num_top) -> Job:
        """The job for `tokens`; a prompt too long for the context is a 400, max_tokens is cut to what fits."""
        if self.context_limit is not None:
            room = self.context_limit - len(tokens)
            if room <= 0:
                raise APIError(
                    400,
                    f"the prompt is {len(tokens)} tokens; the model's context is {self.context_limit} tokens",
                    "messages" if isinstance(body, ChatRequest) else "prompt",
                    "context_length_exceeded",
                )
            options = options.replace(max_tokens=min(options.max_tokens, room))
        use_draft = self.draft_model is not None and body.draft
        stops, processors = self.stops(body.stop), self.logits_processors(body)
        return Job(tokens, options, use_draft, stops, num_top, processors, asyncio.get_running_loop())

    def logits_processors(self, body: GenerationRequest) -> list | None:
        """logit_bias, presence_penalty and frequency_penalty, as mlx-lm's logits processors."""
        for param in ("presence_penalty", "frequency_penalty"):
            value = getattr(body, param)
            if value is not None and not -2 <= value <= 2:
                raise APIError(400, f"{param} must be in [-2, 2], got {value}", param)
        bias = {}
        vocab_size = output_size(self.model)
        for key, value in (body.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab_size:
                raise APIError(
                    400, f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}", "logit_bias"
                )
            if not -100 <= value <= 100:
                raise APIError(400, f"logit_bias values must be in [-100, 100], got {value}", "logit_bias")
            bias[int(key)] = value
        processors = make_logits_processors(
            logit_bias=bias or None,
            presence_penalty=body.presence_penalty or None,
            frequency_penalty=body.frequency_penalty or None,
        )
        return processors or None

    def chat_tokens(self, messages: list[Message]) -> list[int]:
        if not self.tokenizer.has_chat_template:
            raise APIError(400, "the model has no chat template: use /v1/completions", "messages")
        if not messages:
            raise APIError(400, "messages must not be empty", "messages")
        rendered = []
        for i, message in enumerate(messages):
            content = message.content
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        param = f"messages[{i}].content[{j}]"
                        raise APIError(400, f"{param}: only text parts are supported, got type {part.type!r}", param)
                content = "".join(part.text for part in content)
            role = "system" if message.role == "developer" else message.role
            rendered.append({"role": role, "content": content or ""})
        system = self.system_prompt if not any(m["role"] == "system" for m in rendered) else None
        try:
            return list(conversation_tokens(self.tokenizer, rendered, system))
        except Exception as e:  # the template's own complaint (roles must alternate, ...)
            raise APIError(400, f"the chat template refused the messages: {_first_line(e)}", "messages") from None

    def completion_tokens(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request, got {len(prompt)}", "prompt")
            prompt = prompt[0]
        tokens = encode_prompt(self.tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise APIError(400, "the prompt is empty", "prompt")
        vocab_size = output_size(self.model)
        if not all(0 <= t < vocab_size for t in tokens):
            raise APIError(400, f"prompt token ids must be in [0, {vocab_size})", "prompt")
        return tokens


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


async def _respond(request: Request, server: Server, job: Job, fmt, body: GenerationRequest):
    try:
        server.engine.submit(job)
    except QueueFull as e:
        raise APIError(
            503,
            f"the server is busy: {server.engine.max_queue} requests are waiting; retry in {e.retry_after} s",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after)},
        ) from None
    prefix = "chatcmpl" if fmt is ChatFormat else "cmpl"
    head = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": server.model_id}
    wants_logprobs = job.num_top_logprobs is not None
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _stream(request, job, fmt, head, wants_logprobs, include_usage), media_type="text/event-stream"
        )
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        text, entries = "", []
        while not isinstance(event := await job.events.get(), Done | Failed):
            text += event.text
            entries += event.logprobs
    finally:
        watcher.cancel()
        job.cancelled.set()  # a no-op once done; stops the generation if this handler was cancelled
    if isinstance(event, Failed):
        raise APIError(event.status, event.message)
    request.state.summary = event.summary
    choice = fmt.whole(text, entries if wants_logprobs else None, event.finish_reason)
    return {**head, "object": fmt.object, "choices": [choice], "usage": event.usage, "stats": event.stats}


async def _cancel_on_disconnect(request: Request, job: Job):
    """Cancel the job when the client hangs up before its (non-streamed) answer is ready."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


async def _stream(request: Request, job: Job, fmt, head: dict, wants_logprobs: bool, include_usage: bool):
    """Server-sent events: the chunks, the finish (with usage and stats in the last chunk), then [DONE]."""
    chunk = {**head, "object": fmt.chunk_object}
    extra = {"usage": None} if include_usage else {}
    try:
        if (first := fmt.first_delta()) is not None:
            yield _sse({**chunk, "choices": [first], **extra})
        while isinstance(event := await job.events.get(), Delta):
            delta = fmt.delta(event.text, event.logprobs if wants_logprobs else None)
            yield _sse({**chunk, "choices": [delta], **extra})
        if isinstance(event, Failed):
            yield _sse({"error": {"message": event.message, "type": "server_error", "param": None, "code": None}})
            request.state.summary = event.message
            return
        last = fmt.delta("", [] if wants_logprobs else None, event.finish_reason)
        if include_usage:
            yield _sse({**chunk, "choices": [last], **extra})
            yield _sse({**chunk, "choices": [], "usage": event.usage, "stats": event.stats})
        else:
            yield _sse({**chunk, "choices": [last], "stats": event.stats})
        yield "data: [DONE]\n\n"
        request.state.summary = event.summary
    finally:
        job.cancelled.set()  # the client hung up (or the answer is complete: then a no-op)
        if not hasattr(request.state, "summary"):
            request.state.summary = "client disconnected"


router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.server


async def _authorize(request: Request):
    key = _server(request).api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not _same(given.strip(), key):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@router.get("/health")
async def health(request: Request):
    server = _server(request)
    draft = served_name(server.draft_model) if server.draft_model is not None else None
    return {"status": "ok", "model": server.model_id, "draft_model": draft, **server.engine.status()}


@router.get("/v1/models", dependencies=[Depends(_authorize)])
async def models(request: Request):
    server = _server(request)
    entry = {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "mlx-spec"}
    return {"object": "list", "data": [entry]}


@router.post("/v1/chat/completions", dependencies=[Depends(_authorize)])
async def chat_completions(body: ChatRequest, request: Request):
    server = _server(request)
    server.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    num_top = _num_top(body.top_logprobs or 0, "top_logprobs") if body.logprobs else None
    max_tokens, param = (
        (body.max_completion_tokens, "max_completion_tokens")
        if body.max_completion_tokens is not None
        else (body.max_tokens, "max_tokens")
    )
    options = server.options(body, max_tokens, param)
    tokens = await run_in_threadpool(server.chat_tokens, body.messages)
    job = server.job(tokens, options, body, num_top)
    return await _respond(request, server, job, ChatFormat, body)


@router.post("/v1/completions", dependencies=[Depends(_authorize)])
async def completions(body: CompletionRequest, request: Request):
    server = _server(request)
    server.check_model(body.model)
    if body.echo:
        raise APIError(400, "echo is not supported", "echo")
    num_top = None if body.logprobs is None else _num_top(body.logprobs, "logprobs")
    options = server.options(body, body.max_tokens, "max_tokens")
    tokens = await run_in_threadpool(server.completion_tokens, body.prompt)
    job = server.job(tokens, options, body, num_top)
    return await _respond(request, server, job, CompletionFormat, body)


def _num_top(value: int, param: str) -> int:
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"{param} must be in 0..{MAX_TOP_LOGPROBS}, got {value}", param)
    return value


class _RequestLog:
    """One log line per request (method, path, status, seconds, and what the handler summarised);
    an unexpected exception is logged with its traceback and answered 500 in one line."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), []

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as e:
            log.error("%s %s failed:\n%s", scope["method"], scope["path"], traceback.format_exc().rstrip())
            if status:
                return
            await APIError(500, f"internal error: {type(e).__name__} (the server log has the details)").response()(
                scope, receive, send_and_note
            )
        summary = scope.get("state", {}).get("summary")
        line = f"{scope['method']} {scope['path']} {status[0] if status else '-'} {time.perf_counter() - start:.2f}s"
        log.info(f"{line}: {summary}" if summary else line)


class _BodyLimit:
    """413 for a request body over `max_body` bytes: at once by its Content-Length, or as it streams in."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than {self.max_body} bytes"
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await APIError(413, message).response()(scope, receive, send)
        num_bytes = 0

        async def limited_receive():
            nonlocal num_bytes
            event = await receive()
            num_bytes += len(event.get("body", b""))
            if num_bytes > self.max_body:
                raise HTTPException(413, message)  # answered by _http_error
            return event

        await self.app(scope, limited_receive, send)


async def _api_error(request: Request, e: APIError):
    request.state.summary = e.message
    return e.response()


async def _http_error(request: Request, e: HTTPException):
    messages = {404: f"no such path: {request.method} {request.url.path}"}
    error = APIError(e.status_code, messages.get(e.status_code, str(e.detail)), headers=getattr(e, "headers", None))
    return await _api_error(request, error)


async def _invalid_request(request: Request, e: RequestValidationError):
    return await _api_error(request, _validation_error(e))


def create_app(
    model,
    tokenizer,
    draft_model=None,
    defaults: GenerationOptions | None = None,
    *,
    api_key: str | None = None,
    max_queue: int = MAX_QUEUE,
    max_body: int = MAX_BODY,
    num_prompt_caches: int = NUM_PROMPT_CACHES,
    system_prompt: str | None = None,
) -> FastAPI:
    """The FastAPI application serving `model` (and `draft_model`) with OpenAI's API.

    Args:
        defaults: generation options of requests that do not set them (a request's fields replace them).
        api_key: if given, /v1/* answers 401 without `Authorization: Bearer <api_key>`.
        max_queue: requests that may wait for the engine; past that 503 with Retry-After.
        max_body: bytes of a request body; past that 413.
        num_prompt_caches: conversations whose KV caches are kept for reuse (least recently used dropped).
        system_prompt: used for chat requests without a system message.
    """
    defaults = defaults or GenerationOptions()
    args = getattr(model, "args", None)
    context_limit = None if defaults.max_kv_size else getattr(args, "max_position_embeddings", None)
    engine = Engine(model, tokenizer, draft_model, defaults.max_kv_size, max_queue, num_prompt_caches)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="mlx-spec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = Server(
        model, tokenizer, draft_model, defaults, engine, api_key, system_prompt, served_name(model), context_limit
    )
    app.include_router(router)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_middleware(_BodyLimit, max_body=max_body)
    app.add_middleware(_RequestLog)  # the outermost: it sees every answer
    return app


# --- running it --------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); an OSError names the address."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn, which ends the answers in flight (503) as it shuts down, rather than cutting them off later."""

    async def shutdown(self, sockets=None):
        self.config.app.state.server.engine.cancel_all()
        await super().shutdown(sockets)


def uvicorn_server(app: FastAPI) -> uvicorn.Server:
    """A uvicorn server for `app`: our log lines instead of its access log."""
    config = uvicorn.Config(
        app, log_config=None, log_level="warning", access_log=False, timeout_graceful_shutdown=SHUTDOWN_GRACE
    )
    return _Uvicorn(config)


def run(app: FastAPI, sock: socket.socket, on_ready: Callable[[], None] = lambda: None):
    """Serve until Ctrl-C or SIGTERM; both stop cleanly: answers in flight end at once with a 503."""
    server = uvicorn_server(app)
    # uvicorn catches both signals to shut down gracefully, then raises the one it caught again for the handler
    # it found: with the signals ignored meanwhile, that ends here, without a KeyboardInterrupt's traceback.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        on_ready()
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
