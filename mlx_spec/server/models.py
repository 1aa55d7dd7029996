"""The wire's shapes: the request bodies (pydantic models), the answers in OpenAI's shapes and the OpenAI-shaped
error type."""

from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

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


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- requests ------------------------------------------------------------------


class TextPart(BaseModel):
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict = "{}"


class ToolCall(BaseModel):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class Message(BaseModel):
    role: str
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool's answer: to which call
    name: str | None = None
    reasoning_content: str | None = None  # an assistant's earlier thinking (templates may show it)


class Function(BaseModel):
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    type: str = "function"
    function: Function


class NamedTool(BaseModel):
    type: str = "function"
    function: dict  # {"name": ...}


class JSONSchema(BaseModel):
    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: str  # "text", "json_object" or "json_schema"
    json_schema: JSONSchema | None = None


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
    tools: list[Tool] | None = None
    tool_choice: str | NamedTool | None = None  # "auto", "none", "required" or a named function
    parallel_tool_calls: bool | None = None  # accepted; a reply may hold several calls either way
    response_format: ResponseFormat | None = None
    # passed to the chat template
    enable_thinking: bool | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict | None = None


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


_FIELD_NAMES = {
    name
    for request in (
        ChatRequest,
        CompletionRequest,
        Message,
        TextPart,
        StreamOptions,
        Tool,
        Function,
        ToolCall,
        FunctionCall,
        ResponseFormat,
        JSONSchema,
    )
    for name in request.model_fields
}


# --- responses in OpenAI's shapes ----------------------------------------------------


@dataclass
class TokenLogprob:
    """One emitted token's log-probability under the main model, and the likeliest alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]]
    text_offset: int  # where the token's text starts in the reply


class ChatFormat:
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    @staticmethod
    def first_delta() -> dict | None:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    @staticmethod
    def delta(text: str, entries: list[TokenLogprob] | None, finish_reason=None, reasoning: str = "", calls=()) -> dict:
        """A chunk's choice: content, reasoning_content and tool_calls (each call whole: {"index", "id", ...})."""
        delta = {"content": text} if text else {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if calls:
            delta["tool_calls"] = list(calls)
        logprobs = None if entries is None else {"content": [_chat_logprob(e) for e in entries]}
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    @staticmethod
    def whole(text: str, entries: list[TokenLogprob] | None, finish_reason: str, reasoning: str = "", calls=()) -> dict:
        logprobs = None if entries is None else {"content": [_chat_logprob(e) for e in entries], "refusal": None}
        message = {"role": "assistant", "content": text if text or not calls else None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = list(calls)
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
