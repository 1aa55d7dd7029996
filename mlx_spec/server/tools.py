"""Tool calls and reasoning in a reply: the conversation's calls rendered for the chat template, and the reply's
text split as it streams into reasoning (<think>...</think>), content and calls (parsed by mlx-lm's parser for
the model's family, else a reply that is only a JSON object or a fenced JSON block naming a given tool)."""

import json
import re
import uuid
from dataclasses import dataclass, field

from .engine import log

_FENCED = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as chat templates take them: each call's arguments an object (Qwen's and most templates
    write them with `tojson`), not the JSON string of the wire."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_template_call(call) for call in calls]}
        out.append(message)
    return out


def _template_call(call: dict) -> dict:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # the template gets the string as it came
    return {**call, "function": function}


def tool_names(tools: list[dict]) -> set[str]:
    return {tool["function"]["name"] for tool in tools}


def openai_call(name: str, arguments) -> dict:
    """A call in OpenAI's shape: arguments as a JSON string."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def parse_tagged(text: str, parser, tools: list[dict]) -> list[dict] | None:
    """The calls between one pair of the family's tags, by mlx-lm's parser; None if it cannot read them."""
    try:
        parsed = parser(text, tools)
    except Exception as e:  # each family's parser fails in its own way (JSON, XML, regex, ...)
        log.warning(f"a tool call could not be parsed ({type(e).__name__}: {e}); it is returned as text")
        return None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        log.warning(f"a tool call could not be parsed (no function name in {text.strip()[:80]!r}); returned as text")
        return None
    return [openai_call(c["name"], c.get("arguments", {})) for c in calls]


def parse_bare(text: str, tools: list[dict]) -> list[dict] | None:
    """A reply that is only a JSON object (or a fenced JSON block, or a list of them) of the shape
    {"name": <one of the tools>, "arguments": {...}} ("parameters" also read): its calls; else None."""
    text = text.strip()
    fenced = _FENCED.match(text)
    if fenced:
        text = fenced.group(1)
    names = tool_names(tools)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if any(f'"{name}"' in text for name in names):
            log.warning(f"a reply that looks like a tool call is not valid JSON ({text[:80]!r}); returned as text")
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if not isinstance(arguments, dict | str):
            log.warning(f"a tool call's arguments are not an object ({text[:80]!r}); returned as text")
            return None
        calls.append(openai_call(item["name"], arguments))
    return calls or None


def may_be_bare_call(text: str) -> bool:
    """Whether a reply beginning with `text` may still turn out to be only a JSON call (or a fenced one)."""
    text = text.lstrip()
    if not text or text.startswith("{") or text.startswith("["):
        return True
    if len(text) < 3:
        return "```".startswith(text)
    if not text.startswith("```"):
        return False
    rest = text[3:]
    if rest.startswith("json"):
        rest = rest[4:]
    elif "json".startswith(rest):
        return True
    rest = rest.lstrip()
    return not rest or rest.startswith("{") or rest.startswith("[")


@dataclass
class Part:
    kind: str  # "content", "reasoning" or "call"
    text: str = ""
    call: dict | None = None


@dataclass
class ReplyParser:
    """Splits a reply's text, as it streams, into reasoning, content and calls.

    `add(text)` returns the parts known so far; text that may begin a tag is held until it is known, and so is a
    reply that may be only a JSON call (when tools are given); `finish()` returns the rest.
    """

    tools: list[dict] | None = None  # None: calls are not parsed
    parser: object = None  # mlx-lm's parse_tool_call for the model's family (with call_tags), or None
    call_tags: tuple[str, str] | None = None
    think_tags: tuple[str, str] | None = None
    reasoning: bool = False  # the prompt opened a think block: the reply begins inside it
    buffer: str = ""
    held: str = ""  # content held while the reply may be only a JSON call
    holding: bool = field(default=True)
    num_calls: int = 0
    strip: bool = False  # after a think tag: the whitespace that follows it is dropped

    def __post_init__(self):
        self.state = "reasoning" if self.reasoning and self.think_tags else "content"
        self.holding = self.tools is not None

    def add(self, text: str) -> list[Part]:
        self.buffer += text
        parts = []
        while True:
            if self.state == "reasoning":
                end = self.think_tags[1]
                found = self.buffer.find(end)
                if found < 0:
                    keep = _partial(self.buffer, [end])
                    parts += self._reasoning(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return parts
                parts += self._reasoning(self.buffer[:found])
                self.buffer = self.buffer[found + len(end) :]
                self.state, self.strip = "content", True
            elif self.state == "call":
                end = self.call_tags[1]
                found = self.buffer.find(end)
                if found < 0:
                    return parts
                parts += self._call(self.buffer[:found], closed=True)
                self.buffer = self.buffer[found + len(end) :]
                self.state = "content"
            else:
                starts = self._starts()
                found = [(i, tag) for tag in starts if (i := self.buffer.find(tag)) >= 0]
                if not found:
                    keep = _partial(self.buffer, starts)
                    parts += self._content(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return parts
                i, tag = min(found)
                parts += self._content(self.buffer[:i])
                self.buffer = self.buffer[i + len(tag) :]
                self.state = "call" if self.call_tags and tag == self.call_tags[0] else "reasoning"
                if self.state == "call":
                    parts += self._release()  # a tagged call: what came before is content, not a bare call
                else:
                    self.strip = True

    def finish(self) -> list[Part]:
        """The end of the reply: what is held, as what it turned out to be."""
        parts, rest = [], self.buffer
        self.buffer = ""
        if self.state == "reasoning":
            parts += self._reasoning(rest)
        elif self.state == "call":
            parts += self._call(rest, closed=False)
        else:
            parts += self._content(rest)
        if self.holding and self.held.strip():
            calls = parse_bare(self.held, self.tools)
            if calls:
                self.held, self.holding = "", False
                return parts + [self._numbered(c) for c in calls]
        return parts + self._release()

    def _starts(self) -> list[str]:
        starts = [self.think_tags[0]] if self.think_tags else []
        if self.tools is not None and self.call_tags:
            starts.append(self.call_tags[0])
        return starts

    def _stripped(self, text: str) -> str:
        if self.strip:
            text = text.lstrip()
            self.strip = not text
        return text

    def _reasoning(self, text: str) -> list[Part]:
        text = self._stripped(text)
        return [Part("reasoning", text)] if text else []

    def _content(self, text: str) -> list[Part]:
        text = self._stripped(text)
        if not text:
            return []
        if self.holding:
            self.held += text
            return self._release() if not may_be_bare_call(self.held) else []
        return [Part("content", text)]

    def _release(self) -> list[Part]:
        self.holding = False
        text, self.held = self.held, ""
        return [Part("content", text)] if text else []

    def _call(self, text: str, closed: bool) -> list[Part]:
        calls = parse_tagged(text, self.parser, self.tools)
        if calls is None:
            start, end = self.call_tags
            return [Part("content", start + text + (end if closed else ""))]
        return [self._numbered(call) for call in calls]

    def _numbered(self, call: dict) -> Part:
        self.num_calls += 1
        return Part("call", call=call)


def _partial(text: str, tags: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper beginning of one of `tags`."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best
