"""Structured output: a JSON schema (or a Lark grammar) constrains generation, as a logits processor built on
llguidance. Its mask at each position is a function of the tokens before it, so it applies alike to the main
model's p and to the drafts' q, to k+1 rows at once, and a rollback leaves nothing to undo."""

import json
from collections import OrderedDict

import mlx.core as mx
import numpy as np

# JSON as json.dumps writes it (and models mostly do): one space after ":" and ",", no other whitespace, which a
# small model could otherwise pile up without end.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MASK_CACHE = 128  # masks kept, by generated prefix: a round asks for each of its rows twice (draft, then verify)

_tokenizers: dict = {}  # id(tokenizer), vocab size -> (tokenizer, its llguidance twin): building one takes ~1 s


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError:
        raise ValueError("structured output needs llguidance: pip install 'mlx-spec[server]'") from None
    return llguidance


def llg_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of `tokenizer` (an mlx-lm TokenizerWrapper or a Hugging Face fast tokenizer), with
    `vocab_size` rows of logits (the model's output size, which may exceed the tokenizer's)."""
    key = (id(tokenizer), vocab_size)
    if key not in _tokenizers:
        llguidance = _llguidance()
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        ends = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])  # mlx-lm's: any ends it
        _tokenizers[key] = (tokenizer, llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=ends))
    return _tokenizers[key][1]


def json_schema_grammar(schema: dict | None) -> str:
    """The grammar of a JSON value following `schema`; None: any JSON object."""
    llguidance = _llguidance()
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {json.dumps(schema)[:80]}")
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_STYLE)


def lark_grammar(lark: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(lark)


def call_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON schema of one call {"name": ..., "arguments": {...}} to the tool `name`, or to any of `tools`
    (OpenAI's shape: {"type": "function", "function": {"name", "parameters"}})."""
    options = []
    for tool in tools:
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        parameters = function.get("parameters") or {"type": "object"}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def tagged_grammar(schema: dict, start: str, end: str, vocab: dict) -> str:
    """The grammar of `start` newline, a JSON value following `schema`, newline, `end` (Qwen/Hermes-style calls).
    A tag that is one token of the vocabulary may come as that token or as its text."""

    styled = {**schema, "x-guidance": JSON_STYLE}

    def literal(text: str) -> str:
        quoted = json.dumps(text)
        return f"({quoted} | <[{vocab[text]}]>)" if text in vocab else quoted

    return lark_grammar(f'start: {literal(start)} "\\n" body "\\n" {literal(end)}\nbody: %json {json.dumps(styled)}')


class GrammarProcessor:
    """A logits processor that lets through only the tokens `grammar` allows after the tokens generated so far.

    Called as mlx-lm calls logits processors: (tokens, logits (1, V)), `tokens` the call's prompt then what was
    generated (with speculation: then the draft tokens before the row). The first call sees the prompt alone;
    what follows it is the generation. The matcher follows whichever prefix it is asked about (rolling back to
    the common prefix, then consuming), and masks are kept by prefix, so a rejected draft corrupts nothing.
    """

    def __init__(self, tokenizer, grammar: str, vocab_size: int):
        llguidance = _llguidance()
        self.tokenizer = llg_tokenizer(tokenizer, vocab_size)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"invalid grammar: {error.splitlines()[0]}")
        self.matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        self.grammar = grammar
        self.vocab_size = vocab_size
        self.start: int | None = None  # where the generation begins in the tokens given
        self.consumed: list[int] = []  # the tokens the matcher has consumed
        self.masks: OrderedDict[tuple, mx.array] = OrderedDict()

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.start is None:
            self.start = tokens.size
        generated = tuple(tokens[self.start :].tolist())
        mask = self.masks.get(generated)
        if mask is None:
            mask = self._mask(list(generated))
            self.masks[generated] = mask
            if len(self.masks) > MASK_CACHE:
                self.masks.popitem(last=False)
        else:
            self.masks.move_to_end(generated)
        size = logits.shape[-1]
        if mask.size < size:
            mask = mx.concatenate([mask, mx.zeros((size - mask.size,), mx.bool_)])
        return mx.where(mask[:size], logits, mx.array(-float("inf"), logits.dtype))

    def _mask(self, generated: list[int]) -> mx.array:
        same = 0
        for a, b in zip(self.consumed, generated):
            if a != b:
                break
            same += 1
        if same < len(self.consumed):
            self.matcher.rollback(len(self.consumed) - same)
            del self.consumed[same:]
        rest = generated[same:]
        taken = self.matcher.try_consume_tokens(rest) if rest else 0
        self.consumed += rest[:taken]
        if taken < len(rest):  # a row past a token the grammar refused (draft rows after an end): only the end
            allowed = np.zeros(self.vocab_size, bool)
            allowed[self.tokenizer.eos_token] = True
            return mx.array(allowed)
        bits = np.frombuffer(self.matcher.compute_bitmask(), np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)
        if not allowed.any():  # after the end token: whatever comes is never used, but must be a distribution
            allowed[self.tokenizer.eos_token] = True
        return mx.array(allowed)
