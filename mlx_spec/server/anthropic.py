"""Anthropic's Messages API over the same engine: a /v1/messages request becomes a chat request (system, text,
tool_use and tool_result blocks as OpenAI messages), and the reply's parts become content blocks and events."""

import json
import uuid

from pydantic import BaseModel, ConfigDict

from .models import _FIELD_NAMES, APIError, ChatRequest, Message, NamedTool, Tool, ToolCall
from .tools import Part

STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}  # else "stop": end_turn or stop_sequence
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(status: int, message: str) -> dict:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class Block(BaseModel):
    """A content block: text, tool_use, tool_result, thinking (others are refused)."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None
    id: str | None = None  # tool_use
    name: str | None = None
    input: dict | None = None
    tool_use_id: str | None = None  # tool_result
    content: str | list["Block"] | None = None
    is_error: bool | None = None
    thinking: str | None = None  # thinking


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[Block]


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    description: str | None = None
    input_schema: dict | None = None


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str  # auto, any, tool, none
    name: str | None = None


class Thinking(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str  # enabled, disabled (adaptive: as enabled)


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int
    messages: list[AnthropicMessage]
    system: str | list[Block] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    # extensions, as on chat completions
    seed: int | None = None
    num_draft_tokens: int | str | None = None
    draft: bool = True


class CountTokensRequest(MessagesRequest):
    max_tokens: int = 1  # not needed to count


_FIELD_NAMES.update(  # a validation error names the field (messages[0].content)
    name
    for request in (MessagesRequest, AnthropicMessage, Block, AnthropicTool, ToolChoice)
    for name in request.model_fields
)


def _text(content, param: str) -> str:
    """The text of a string or of text blocks."""
    if content is None or isinstance(content, str):
        return content or ""
    out = []
    for i, block in enumerate(content):
        if block.type != "text" or block.text is None:
            raise APIError(400, f"{param}[{i}]: expected a text block, got type {block.type!r}", f"{param}[{i}]")
        out.append(block.text)
    return "".join(out)


def chat_request(body: MessagesRequest) -> ChatRequest:
    """The chat request that asks the same: tool_result blocks become tool messages, tool_use blocks calls."""
    if body.max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {body.max_tokens}", "max_tokens")
    messages = []
    if body.system:
        messages.append(Message(role="system", content=_text(body.system, "system")))
    for i, message in enumerate(body.messages):
        if message.role not in ("user", "assistant", "system"):  # Claude Code sends system turns between others
            raise APIError(400, f"messages[{i}].role must be user or assistant, got {message.role!r}", "messages")
        if message.role == "system":
            messages.append(Message(role="system", content=_text(message.content, f"messages[{i}].content")))
            continue
        if isinstance(message.content, str):
            messages.append(Message(role=message.role, content=message.content))
            continue
        text, calls, thinking = [], [], []
        for j, block in enumerate(message.content):
            param = f"messages[{i}].content[{j}]"
            if block.type == "text":
                text.append(block.text or "")
            elif block.type == "tool_result" and message.role == "user":
                result = _text(block.content, f"{param}.content")
                messages.append(Message(role="tool", tool_call_id=block.tool_use_id, content=result))
            elif block.type == "tool_use" and message.role == "assistant":
                arguments = json.dumps(block.input or {}, ensure_ascii=False)
                calls.append(ToolCall(id=block.id, function={"name": block.name or "", "arguments": arguments}))
            elif block.type in ("thinking", "redacted_thinking") and message.role == "assistant":
                thinking.append(block.thinking or "")
            else:
                raise APIError(400, f"{param}: {block.type!r} blocks are not supported in {message.role} turns", param)
        if text or calls or message.role == "assistant":
            messages.append(
                Message(
                    role=message.role,
                    content="".join(text),
                    tool_calls=calls or None,
                    reasoning_content="".join(thinking) or None,
                )
            )
    tools = [
        Tool(function={"name": t.name, "description": t.description, "parameters": t.input_schema or {}})
        for t in body.tools or []
    ]
    choice = body.tool_choice
    tool_choice = None
    if choice is not None:
        if choice.type == "tool":
            tool_choice = NamedTool(function={"name": choice.name})
        else:
            names = {"auto": "auto", "any": "required", "none": "none"}
            if choice.type not in names:
                raise APIError(
                    400, f"tool_choice.type must be auto, any, tool or none, got {choice.type!r}", "tool_choice"
                )
            tool_choice = names[choice.type]
    enable_thinking = None if body.thinking is None else body.thinking.type != "disabled"
    return ChatRequest(
        messages=messages,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=body.stop_sequences,
        stream=body.stream,
        tools=tools or None,
        tool_choice=tool_choice,
        enable_thinking=enable_thinking,
        seed=body.seed,
        num_draft_tokens=body.num_draft_tokens,
        draft=body.draft,
    )


def stop_reason(finish_reason: str, stopped_by_string: bool) -> str:
    if finish_reason == "stop":
        return "stop_sequence" if stopped_by_string else "end_turn"
    return STOP_REASONS[finish_reason]


def usage(engine_usage: dict) -> dict:
    cached = engine_usage["prompt_tokens_details"]["cached_tokens"]
    return {
        "input_tokens": engine_usage["prompt_tokens"] - cached,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
        "output_tokens": engine_usage["completion_tokens"],
    }


def tool_use(call: dict) -> dict:
    """An OpenAI call as a tool_use block (the input an object, as Anthropic's clients expect)."""
    function = call["function"]
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        arguments = {"arguments": function["arguments"]}
    return {
        "type": "tool_use",
        "id": f"toolu_{call['id'].removeprefix('call_')}",
        "name": function["name"],
        "input": arguments,
    }


def content_blocks(parts: list[Part]) -> list[dict]:
    """The reply's parts as content blocks: thinking, text and tool_use, consecutive text merged."""
    blocks = []
    for part in parts:
        if part.kind == "call":
            blocks.append(tool_use(part.call))
            continue
        kind, key = ("thinking", "thinking") if part.kind == "reasoning" else ("text", "text")
        if blocks and blocks[-1]["type"] == kind:
            blocks[-1][key] += part.text
        else:
            blocks.append({"type": kind, key: part.text, **({"signature": ""} if kind == "thinking" else {})})
    return blocks


def message(model_id: str, blocks: list[dict], reason: str | None, stop_sequence, usage_: dict) -> dict:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model_id,
        "content": blocks,
        "stop_reason": reason,
        "stop_sequence": stop_sequence,
        "usage": usage_,
    }


class BlockStream:
    """Turns the reply's parts, as they come, into content_block_start/delta/stop events."""

    def __init__(self):
        self.index, self.open = -1, None  # the open block's kind

    def events(self, parts: list[Part]) -> list[tuple[str, dict]]:
        out = []
        for part in parts:
            if part.kind == "call":
                out += self.close()
                block = tool_use(part.call)
                self.index += 1
                out.append(("content_block_start", {"index": self.index, "content_block": {**block, "input": {}}}))
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
                out.append(("content_block_delta", {"index": self.index, "delta": delta}))
                out.append(("content_block_stop", {"index": self.index}))
                continue
            if not part.text:
                continue
            if self.open != part.kind:
                out += self.close()
                self.index += 1
                self.open = part.kind
                start = {"type": "thinking", "thinking": "", "signature": ""} if part.kind == "reasoning" else None
                out.append(
                    (
                        "content_block_start",
                        {"index": self.index, "content_block": start or {"type": "text", "text": ""}},
                    )
                )
            delta = (
                {"type": "thinking_delta", "thinking": part.text}
                if part.kind == "reasoning"
                else {"type": "text_delta", "text": part.text}
            )
            out.append(("content_block_delta", {"index": self.index, "delta": delta}))
        return out

    def close(self) -> list[tuple[str, dict]]:
        if self.open is None:
            return []
        events = []
        if self.open == "reasoning":
            events.append(
                ("content_block_delta", {"index": self.index, "delta": {"type": "signature_delta", "signature": ""}})
            )
        self.open = None
        return [*events, ("content_block_stop", {"index": self.index})]


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n"
