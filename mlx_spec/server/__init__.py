"""`mlx-spec serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn), thin over stream_generate.

Its public names: models.py holds the wire's shapes, engine.py the generating thread, app.py the app and serving;
tools.py splits a reply into reasoning, content and tool calls, anthropic.py maps Anthropic's Messages API onto it.
"""

from .app import SHUTDOWN_GRACE, Server, bind, create_app, follow, is_loopback, router, run, uvicorn_server
from .engine import (
    MAX_RETRY_AFTER,
    STOPPING,
    Delta,
    Done,
    Engine,
    Failed,
    Job,
    PromptCaches,
    QueueFull,
    Reply,
    StopStrings,
    log,
    served_name,
)
from .models import (
    APIError,
    ChatFormat,
    ChatRequest,
    CompletionFormat,
    CompletionRequest,
    GenerationRequest,
    Message,
    StreamOptions,
    TextPart,
    TokenLogprob,
)

__all__ = [
    "MAX_RETRY_AFTER",
    "SHUTDOWN_GRACE",
    "STOPPING",
    "APIError",
    "ChatFormat",
    "ChatRequest",
    "CompletionFormat",
    "CompletionRequest",
    "Delta",
    "Done",
    "Engine",
    "Failed",
    "GenerationRequest",
    "Job",
    "Message",
    "PromptCaches",
    "QueueFull",
    "Reply",
    "Server",
    "StopStrings",
    "StreamOptions",
    "TextPart",
    "TokenLogprob",
    "bind",
    "create_app",
    "follow",
    "is_loopback",
    "log",
    "router",
    "run",
    "served_name",
    "uvicorn_server",
]
