"""One validated options object for generation, shared by the API and every front end (CLI, chat, bench, server).

Every limit lives here; a bad value raises ValueError naming it, before any model is loaded.
"""

import sys
from dataclasses import dataclass, fields, replace

from .cache import KEEP, SLACK
from .sampling import Sampler, SamplingParams, sampler_params

MAX_DRAFT_TOKENS = SLACK  # the longest fixed draft: one round writes at most SLACK + 1 cache entries
AUTO_MAX_DRAFT = 10  # the longest draft "auto" tries
AUTO_MAX_LOOKUP = 16  # the longest copy from the conversation "auto" tries
KV_BITS = (2, 3, 4, 5, 6, 8)
KV_GROUP_SIZES = (32, 64, 128)
# Default draft_vocab_size: the whole vocabulary. A shortlist of 32768 ids made the default pair's rounds
# 13% cheaper but lost as much in acceptance over 256 tokens (benchmarks/RESULTS.md).
DEFAULT_DRAFT_VOCAB_SIZE = None
PREFILL_STEP_SIZE = 2048  # as mlx-lm's generate_step, so long prompts fill caches alike
# The server's limits (mlx-spec serve)
MAX_QUEUE = 16  # requests that may wait for the engine; more get 503
MAX_BODY = 8 * 1024 * 1024  # bytes of a request body; more get 413
NUM_PROMPT_CACHES = 4  # conversations whose KV caches are kept for reuse
MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for, as OpenAI's


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate and how: the keyword options of `speculative_generate_step`.

    Construction validates every field; `replace(options, temp=0.7)` makes a checked copy.
    """

    max_tokens: int = 256  # -1: no limit, as in mlx-lm
    num_draft_tokens: int | str = "auto"  # 1..MAX_DRAFT_TOKENS, or "auto" (chosen each round, plain included)
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_kv_size: int | None = None  # a rotating (sliding-window) KV cache of this many tokens
    kv_bits: int | None = None  # quantize the KV caches once they reach quantized_kv_start
    kv_group_size: int = 64
    quantized_kv_start: int = 5000
    draft_vocab_size: int | None = DEFAULT_DRAFT_VOCAB_SIZE  # cut the draft's output layer to these first ids
    prefill_step_size: int = PREFILL_STEP_SIZE  # prompt tokens per prefill chunk
    prompt_lookup: bool = True  # rounds may copy draft tokens from the conversation where it repeats
    sampler: Sampler | None = None  # a sampler (mlx-lm's make_sampler or any callable) instead of temp, top_p, ...
    mtp: bool = False  # also draft with the main model's MTP layer, beside a draft model (draft_model="mtp": alone)

    def __post_init__(self):
        if self.sampler is not None:
            if not callable(self.sampler):
                raise ValueError(f"sampler must be a callable taking log-probabilities, got {self.sampler!r}")
            defaults = {f.name: f.default for f in fields(self)}
            given = [
                f"{name}={getattr(self, name)!r}" for name in SAMPLING_NAMES if getattr(self, name) != defaults[name]
            ]
            if given:
                raise ValueError(
                    f"sampler= and {', '.join(given)} were both given: pass the settings to "
                    "make_sampler(...) or use temp, top_p, top_k, min_p without a sampler"
                )
        self.sampling  # noqa: B018 -- checks temp, top_p, top_k, min_p
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.num_draft_tokens != "auto" and (
            not _is_int(self.num_draft_tokens) or not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS
        ):
            raise ValueError(
                f"num_draft_tokens must be 'auto' or an integer in 1..{MAX_DRAFT_TOKENS}, got {self.num_draft_tokens!r}"
            )
        if not _is_int(self.max_tokens) or self.max_tokens < -1:
            raise ValueError(f"max_tokens must be an integer >= 0, or -1 for no limit, got {self.max_tokens!r}")
        if self.draft_vocab_size is not None and (not _is_int(self.draft_vocab_size) or self.draft_vocab_size < 1):
            raise ValueError(f"draft_vocab_size must be a positive integer or None, got {self.draft_vocab_size!r}")
        if not isinstance(self.prompt_lookup, bool):
            raise ValueError(f"prompt_lookup must be True or False, got {self.prompt_lookup!r}")
        if not isinstance(self.mtp, bool):
            raise ValueError(f"mtp must be True or False, got {self.mtp!r}")
        if not _is_int(self.prefill_step_size) or self.prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be a positive integer, got {self.prefill_step_size!r}")
        if self.max_kv_size is not None:
            needed = self.verified_per_round + KEEP
            if not _is_int(self.max_kv_size) or self.max_kv_size < needed:
                raise ValueError(
                    f"max_kv_size={self.max_kv_size!r} is too small for num_draft_tokens={self.num_draft_tokens}: "
                    f"it must hold the {KEEP} kept tokens and the {self.verified_per_round} positions verified "
                    f"per round (at least {needed})"
                )
        if self.kv_bits is not None:
            if self.kv_bits not in KV_BITS:
                raise ValueError(f"kv_bits must be one of {KV_BITS}, got {self.kv_bits!r}")
            if self.kv_group_size not in KV_GROUP_SIZES:
                raise ValueError(f"kv_group_size must be one of {KV_GROUP_SIZES}, got {self.kv_group_size!r}")
            if self.max_kv_size is not None:
                raise ValueError("kv_bits cannot be combined with max_kv_size: a rotating KV cache is not quantized")
            if not _is_int(self.quantized_kv_start) or self.quantized_kv_start < 0:
                raise ValueError(f"quantized_kv_start must be an integer >= 0, got {self.quantized_kv_start!r}")

    @property
    def sampling(self) -> SamplingParams:
        """temp, top_p, top_k, min_p; or those a `sampler` samples with where they can be read (else exact match)."""
        if self.sampler is not None:
            return sampler_params(self.sampler)
        return SamplingParams(self.temp, self.top_p, self.top_k, self.min_p)

    @property
    def token_limit(self) -> int:
        """max_tokens, with "no limit" (-1) as a number no generation reaches."""
        return self.max_tokens if self.max_tokens >= 0 else sys.maxsize

    @property
    def verified_per_round(self) -> int:
        """The most positions one round may verify with the draft length asked for ("auto" starts at 1)."""
        return 2 if self.num_draft_tokens == "auto" else self.num_draft_tokens + 1

    @property
    def auto_max_draft(self) -> int:
        """The longest draft "auto" may choose: AUTO_MAX_DRAFT, less where a small rotating cache needs it."""
        return min(AUTO_MAX_DRAFT, self._auto_room)

    @property
    def auto_max_lookup(self) -> int:
        """The longest copy from the conversation "auto" may choose."""
        return min(AUTO_MAX_LOOKUP, self._auto_room)

    @property
    def _auto_room(self) -> int:
        """The most draft tokens a round may verify: a rotating cache's window less the kept tokens and the last."""
        return MAX_DRAFT_TOKENS if self.max_kv_size is None else max(1, self.max_kv_size - 1 - KEEP)

    def max_draft(self, offset: int) -> int:
        """The longest draft of a round that starts at main cache `offset`.

        A round never straddles the point where the KV cache becomes quantized: mlx-lm quantizes it after the
        step that brings it to quantized_kv_start entries (never before the first step), and later steps see it so.
        """
        limit = MAX_DRAFT_TOKENS
        start = max(self.quantized_kv_start, 1)
        if self.kv_bits is not None and offset < start:
            limit = min(limit, start - 1 - offset)
        return limit

    def replace(self, **changes) -> "GenerationOptions":
        return replace(self, **changes)

    def as_kwargs(self) -> dict:
        """The fields as keyword arguments of stream_generate / speculative_generate_step."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


SAMPLING_NAMES = ("temp", "top_p", "top_k", "min_p")  # the settings a `sampler` replaces


def parse_num_draft_tokens(text: str) -> int | str:
    """'auto' or a whole number in 1..MAX_DRAFT_TOKENS, from a command line, a chat command or a request."""
    text = str(text).strip()
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 1 <= value <= MAX_DRAFT_TOKENS:
        raise ValueError(
            f"the draft length must be 'auto' or a whole number from 1 to {MAX_DRAFT_TOKENS}, got {text!r}"
        )
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
