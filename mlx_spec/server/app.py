"""The FastAPI app: routes that validate and tokenize requests on the event loop's side, hand them to the engine
and answer whole or streamed (server-sent events); and serving it with uvicorn, as `mlx-spec serve` does."""

import asyncio
import contextlib
import hmac
import ipaddress
import json
import signal
import socket
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from ..generate import encode_prompt
from ..grammar import GrammarProcessor, call_schema, json_schema_grammar, tagged_grammar
from ..load import model_source, output_size
from ..options import (
    MAX_BODY,
    MAX_QUEUE,
    MAX_TOP_LOGPROBS,
    NUM_PROMPT_CACHES,
    GenerationOptions,
    parse_num_draft_tokens,
)
from . import anthropic
from .anthropic import CountTokensRequest, MessagesRequest
from .engine import Delta, Done, Engine, Failed, Job, Processing, QueueFull, log, served_name
from .models import (
    APIError,
    ChatFormat,
    ChatRequest,
    CompletionFormat,
    CompletionRequest,
    GenerationRequest,
    Message,
    NamedTool,
    _first_line,
    _validation_error,
)
from .tools import Part, ReplyParser, template_messages, tool_names

SHUTDOWN_GRACE = 3  # seconds answers in flight get to end on Ctrl-C / SIGTERM (a long prefill cannot stop)


# --- the application ---------------------------------------------------------------


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

    def job(self, tokens: list[int], options: GenerationOptions, body: GenerationRequest, num_top, grammar=None) -> Job:
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
        stops, processing = self.stops(body.stop), self.processing(body)
        processors = processing.build(self.tokenizer, output_size(self.model))
        if grammar is not None:
            processors = [*(processors or []), grammar]
            processing = replace(processing, grammar=grammar.grammar)
        return Job(tokens, options, use_draft, stops, num_top, processors, asyncio.get_running_loop(), processing)

    def processing(self, body: GenerationRequest) -> Processing:
        """logit_bias, presence_penalty and frequency_penalty, checked (mlx-lm's logits processors apply them)."""
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
        return Processing(bias or None, body.presence_penalty or None, body.frequency_penalty or None)

    def chat_tokens(self, messages: list[Message], tools: list[dict] | None = None, template_kwargs=None) -> list[int]:
        """The conversation rendered by the chat template (with `tools` and `template_kwargs` where given)."""
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
            entry = {"role": role, "content": content or ""}
            if message.tool_calls:
                entry["tool_calls"] = [call.model_dump(exclude_none=True) for call in message.tool_calls]
            for key in ("tool_call_id", "name", "reasoning_content"):
                if getattr(message, key) is not None:
                    entry[key] = getattr(message, key)
            rendered.append(entry)
        if self.system_prompt and not any(m["role"] == "system" for m in rendered):
            rendered.insert(0, {"role": "system", "content": self.system_prompt})
        extra = {"tools": tools} if tools else {}
        try:
            return list(
                self.tokenizer.apply_chat_template(
                    template_messages(rendered), add_generation_prompt=True, **extra, **(template_kwargs or {})
                )
            )
        except Exception as e:  # the template's own complaint (roles must alternate, ...)
            raise APIError(400, f"the chat template refused the messages: {_first_line(e)}", "messages") from None

    def grammar(self, body: ChatRequest, tools: list[dict] | None) -> GrammarProcessor | None:
        """The logits processor of the reply's grammar: the response_format's JSON, or a call that tool_choice
        requires (in the tags of the model's family where its parser reads JSON, else as a bare JSON object)."""
        choice, fmt = body.tool_choice, body.response_format
        forced = isinstance(choice, NamedTool) or choice == "required"
        if fmt is not None and fmt.type not in ("text", "json_object", "json_schema"):
            raise APIError(
                400,
                f"response_format.type must be text, json_object or json_schema, got {fmt.type!r}",
                "response_format",
            )
        structured = fmt is not None and fmt.type != "text"
        if forced and structured:
            raise APIError(400, "tool_choice forces a call: response_format must be text with it", "tool_choice")
        tokenizer = self.tokenizer
        try:
            if structured:
                schema = None
                if fmt.type == "json_schema":
                    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                        raise APIError(400, "response_format.json_schema.schema is required", "response_format")
                    schema = fmt.json_schema.schema_
                grammar = json_schema_grammar(schema)
            elif forced:
                name = choice.function.get("name") if isinstance(choice, NamedTool) else None
                schema = call_schema(tools, name)
                parser = tokenizer.tool_parser if getattr(tokenizer, "has_tool_calling", False) else None
                if parser is not None and parser.__module__.endswith(".json_tools"):
                    start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
                    grammar = tagged_grammar(schema, start, end, tokenizer.get_vocab())
                else:
                    grammar = json_schema_grammar(schema)
            else:
                return None
            return GrammarProcessor(tokenizer, grammar, output_size(self.model))
        except ValueError as e:
            param = "response_format" if structured else "tools"
            raise APIError(400, f"invalid {param}: {_first_line(e)}", param) from None

    def reply_parser(self, tokens: list[int], tools: list[dict] | None, thinks: bool = True) -> ReplyParser:
        """How the reply's text is split: thinking (where the template thinks; inside a think block from the
        start where the prompt opened one, unless a grammar constrains the reply: `thinks` False), and calls
        where `tools` are parsed."""
        tokenizer = self.tokenizer
        think_tags, reasoning = None, False
        if getattr(tokenizer, "has_thinking", False):
            think_tags = (tokenizer.think_start, tokenizer.think_end)
            reasoning = thinks and tokenizer.rfind_think_start(tokens) > tokenizer.rfind_think_end(tokens)
        parser, call_tags = None, None
        if tools is not None and getattr(tokenizer, "has_tool_calling", False):
            parser, call_tags = tokenizer.tool_parser, (tokenizer.tool_call_start, tokenizer.tool_call_end)
        return ReplyParser(tools, parser, call_tags, think_tags, reasoning)

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


def _submit(server: Server, job: Job):
    try:
        server.engine.submit(job)
    except QueueFull as e:
        raise APIError(
            503,
            f"the server is busy: {server.engine.max_queue} requests are waiting; retry in {e.retry_after} s",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after)},
        ) from None


async def _whole(request: Request, job: Job) -> tuple[str, list, Done]:
    """The whole reply: its text, its logprobs, its Done (a Failed is raised as an APIError)."""
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
    return text, entries, event


async def _respond(request: Request, server: Server, job: Job, fmt, body: GenerationRequest, parser=None):
    _submit(server, job)
    prefix = "chatcmpl" if fmt is ChatFormat else "cmpl"
    head = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": server.model_id}
    wants_logprobs = job.num_top_logprobs is not None
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _stream(request, job, fmt, head, wants_logprobs, include_usage, parser), media_type="text/event-stream"
        )
    text, entries, event = await _whole(request, job)
    entries = entries if wants_logprobs else None
    if parser is None:
        choice = fmt.whole(text, entries, event.finish_reason)
    else:
        parts = parser.add(text) + parser.finish()
        content, reasoning, calls = _joined(parts)
        choice = fmt.whole(content, entries, _finish_reason(event, parser), reasoning, calls)
    return {**head, "object": fmt.object, "choices": [choice], "usage": event.usage, "stats": event.stats}


async def _cancel_on_disconnect(request: Request, job: Job):
    """Cancel the job when the client hangs up before its (non-streamed) answer is ready."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


def _joined(parts: list[Part]) -> tuple[str, str, list[dict]]:
    """Content, reasoning and calls of `parts`."""
    content = "".join(p.text for p in parts if p.kind == "content")
    reasoning = "".join(p.text for p in parts if p.kind == "reasoning")
    return content, reasoning, [p.call for p in parts if p.kind == "call"]


def _finish_reason(done: Done, parser) -> str:
    return (
        "tool_calls" if parser is not None and parser.num_calls and done.finish_reason == "stop" else done.finish_reason
    )


async def _stream(request: Request, job: Job, fmt, head: dict, wants_logprobs: bool, include_usage: bool, parser):
    """Server-sent events: the chunks, the finish (with usage and stats in the last chunk), then [DONE]. With a
    reply parser, each chunk carries what it knows of content, reasoning and calls (each call whole)."""
    chunk = {**head, "object": fmt.chunk_object}
    extra = {"usage": None} if include_usage else {}
    num_calls = 0

    def delta(parts, entries, finish_reason=None):
        nonlocal num_calls
        content, reasoning, calls = _joined(parts)
        calls = [{"index": num_calls + i, **call} for i, call in enumerate(calls)]
        num_calls += len(calls)
        if not (content or reasoning or calls or entries or finish_reason):
            return None
        return fmt.delta(content, entries, finish_reason, reasoning, calls)

    try:
        if (first := fmt.first_delta()) is not None:
            yield _sse({**chunk, "choices": [first], **extra})
        while isinstance(event := await job.events.get(), Delta):
            entries = event.logprobs if wants_logprobs else None
            if parser is None:
                choice = fmt.delta(event.text, entries)
            else:
                choice = delta(parser.add(event.text), entries)
            if choice is not None:
                yield _sse({**chunk, "choices": [choice], **extra})
        if isinstance(event, Failed):
            yield _sse({"error": {"message": event.message, "type": "server_error", "param": None, "code": None}})
            request.state.summary = event.message
            return
        if parser is not None and (rest := delta(parser.finish(), None)) is not None:
            yield _sse({**chunk, "choices": [rest], **extra})
        finish_reason = _finish_reason(event, parser)
        last = fmt.delta("", [] if wants_logprobs else None, finish_reason)
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


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.server


async def _authorize(request: Request):
    key = _server(request).api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    bearer = scheme.lower() == "bearer" and _same(given.strip(), key)
    if not bearer and not _same(request.headers.get("x-api-key", ""), key):
        message = "invalid or missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
        raise APIError(401, message, code="invalid_api_key")


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
    job, parser = await _chat_job(server, body, options, num_top)
    return await _respond(request, server, job, ChatFormat, body, parser)


async def _chat_tokens(
    server: Server, body: ChatRequest, tools: list[dict] | None, constrained: bool = False
) -> tuple[list[int], list[dict] | None]:
    """The prompt and the tools rendered into it ("none": the model is not told of them). A reply that a grammar
    constrains from its first token does not think, unless the request asks for it."""
    template_kwargs = dict(body.chat_template_kwargs or {})
    for key in ("enable_thinking", "reasoning_effort"):
        if getattr(body, key) is not None:
            template_kwargs[key] = getattr(body, key)
    if constrained and getattr(server.tokenizer, "has_thinking", False):
        template_kwargs.setdefault("enable_thinking", False)
    rendered = None if body.tool_choice == "none" else tools
    tokens = await run_in_threadpool(server.chat_tokens, body.messages, rendered, template_kwargs)
    return tokens, rendered


async def _chat_job(server: Server, body: ChatRequest, options: GenerationOptions, num_top) -> tuple[Job, ReplyParser]:
    tools = _tools(body)
    grammar = await run_in_threadpool(server.grammar, body, tools)
    tokens, rendered = await _chat_tokens(server, body, tools, grammar is not None)
    job = server.job(tokens, options, body, num_top, grammar)
    return job, server.reply_parser(tokens, rendered, thinks=grammar is None)


@router.post("/v1/messages", dependencies=[Depends(_authorize)])
async def messages(body: MessagesRequest, request: Request):
    """Anthropic's Messages API. Any model name is answered by the model served here (clients such as Claude
    Code ask for their own models' names)."""
    server = _server(request)
    chat = anthropic.chat_request(body)
    job, parser = await _chat_job(server, chat, server.options(chat, chat.max_tokens, "max_tokens"), None)
    _submit(server, job)
    stops = body.stop_sequences or []
    stop_sequence = stops[0] if len(stops) == 1 else None  # which one matched is known only when there is one
    if body.stream:
        return StreamingResponse(
            _anthropic_stream(request, server, job, parser, stop_sequence), media_type="text/event-stream"
        )
    text, _, done = await _whole(request, job)
    blocks = anthropic.content_blocks(parser.add(text) + parser.finish())
    by_string = done.stats["stop_reason"] == "stopStringFound"
    reason = anthropic.stop_reason(_finish_reason(done, parser), by_string)
    return anthropic.message(
        server.model_id, blocks, reason, stop_sequence if by_string else None, anthropic.usage(done.usage)
    )


async def _anthropic_stream(request: Request, server: Server, job: Job, parser: ReplyParser, stop_sequence):
    """Anthropic's events: message_start, content blocks (start, deltas, stop), message_delta, message_stop."""
    start = {"input_tokens": len(job.prompt_tokens), "output_tokens": 0}
    blocks = anthropic.BlockStream()
    try:
        yield anthropic.sse("message_start", {"message": anthropic.message(server.model_id, [], None, None, start)})
        while isinstance(event := await job.events.get(), Delta):
            for name, data in blocks.events(parser.add(event.text)):
                yield anthropic.sse(name, data)
        if isinstance(event, Failed):
            yield anthropic.sse("error", {"error": anthropic.error_body(event.status, event.message)["error"]})
            request.state.summary = event.message
            return
        for name, data in blocks.events(parser.finish()) + blocks.close():
            yield anthropic.sse(name, data)
        by_string = event.stats["stop_reason"] == "stopStringFound"
        reason = anthropic.stop_reason(_finish_reason(event, parser), by_string)
        delta = {"stop_reason": reason, "stop_sequence": stop_sequence if by_string else None}
        yield anthropic.sse("message_delta", {"delta": delta, "usage": anthropic.usage(event.usage)})
        yield anthropic.sse("message_stop", {})
        request.state.summary = event.summary
    finally:
        job.cancelled.set()
        if not hasattr(request.state, "summary"):
            request.state.summary = "client disconnected"


@router.post("/v1/messages/count_tokens", dependencies=[Depends(_authorize)])
async def count_tokens(body: CountTokensRequest, request: Request):
    chat = anthropic.chat_request(body)
    tokens, _ = await _chat_tokens(_server(request), chat, _tools(chat))
    return {"input_tokens": len(tokens)}


def _tools(body: ChatRequest) -> list[dict] | None:
    """The request's tools as dicts, its tool_choice checked against them."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    choice = body.tool_choice
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        raise APIError(400, f"tool_choice must be auto, none, required or a function, got {choice!r}", "tool_choice")
    if choice == "required" or isinstance(choice, NamedTool):
        if not tools:
            raise APIError(400, "tool_choice requires a call, but no tools are given", "tool_choice")
        if isinstance(choice, NamedTool) and choice.function.get("name") not in tool_names(tools):
            name = choice.function.get("name")
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return tools


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
    if request.url.path.startswith("/v1/messages"):  # Anthropic's shape
        return JSONResponse(anthropic.error_body(e.status, e.message), status_code=e.status, headers=e.headers)
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


def follow(model, tokenizer, draft_model, defaults: GenerationOptions, num_prompt_caches: int = 1):
    """A sharded server's rank other than 0 (mlx.launch): no HTTP; it runs the rounds of the requests that rank 0
    serves, with the settings rank 0's `create_app` was given, until rank 0 stops (DistributedError: a rank
    was lost)."""
    Engine(model, tokenizer, draft_model, defaults.max_kv_size, 0, num_prompt_caches).follow()


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
    app.state.server.engine.on_failure = lambda: setattr(server, "should_exit", True)  # sharded: a rank was lost
    # uvicorn catches both signals to shut down gracefully, then raises the one it caught again for the handler
    # it found: with the signals ignored meanwhile, that ends here, without a KeyboardInterrupt's traceback.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        on_ready()
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
