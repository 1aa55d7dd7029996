"""The public generation API, mirroring mlx-lm's: speculative_generate_step, stream_generate, generate."""

import functools
import os
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .adaptive import DraftController
from .cache import CachePair, make_prompt_cache
from .decode import FixedDraft, HostReads, prefill, rounds
from .draft import DraftModel
from .load import check_draft, output_size
from .options import OPTION_NAMES, GenerationOptions
from .stats import GenerationStats


def speculative_generate_step(
    prompt_tokens,
    model,
    draft_model=None,
    *,
    logits_processors=None,
    prompt_cache: CachePair | None = None,
    stats: GenerationStats | None = None,
    **options,
) -> Iterator[tuple[int, mx.array, bool]]:
    """Yield (token, logprobs, from_draft) for each generated token.

    The output is the main model's: token for token its greedy output at
    temp=0, and its sampling distribution otherwise. `draft_model=None` decodes
    plainly through the same rounds. A `prompt_cache` from `make_prompt_cache`
    continues its conversation: `prompt_tokens` are appended to it and only
    they are prefilled. Stopping early (or an exception) leaves the cache
    holding exactly the tokens yielded so far. `stats`, if given, is filled as
    generation goes (see GenerationStats). The other keyword arguments are the
    fields of `GenerationOptions` (num_draft_tokens, max_tokens, temp, top_p,
    top_k, min_p, seed, max_kv_size, kv_bits, kv_group_size, quantized_kv_start,
    draft_vocab_size, prefill_step_size); `num_draft_tokens="auto"` chooses each
    round's draft length, plain decoding included (see DraftController).
    """
    prompt = _token_list(prompt_tokens)
    opts = make_options(options)
    params = opts.sampling
    policy = _policy(opts, model, draft_model)
    vocab_size = output_size(model)
    if not all(0 <= t < vocab_size for t in prompt):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {min(prompt)}..{max(prompt)}")
    if draft_model is not None:
        check_draft(model, draft_model)
    draft = None if draft_model is None else DraftModel(draft_model, vocab_size, opts.draft_vocab_size)
    caches = prompt_cache if prompt_cache is not None else make_prompt_cache(model, draft_model, opts.max_kv_size)
    if not isinstance(caches, CachePair):
        raise ValueError("prompt_cache must come from mlx_spec.make_prompt_cache(model, draft_model)")
    if draft_model is not None and caches.draft is None:
        raise ValueError("prompt_cache has no draft cache: make it with make_prompt_cache(model, draft_model)")
    stats = stats if stats is not None else GenerationStats()
    seed = opts.seed if opts.seed is not None else int.from_bytes(os.urandom(4), "little")
    key = None if params.greedy else mx.random.key(seed)
    kv_quantize = functools.partial(
        CachePair.quantize,
        kv_bits=opts.kv_bits,
        kv_group_size=opts.kv_group_size,
        quantized_kv_start=opts.quantized_kv_start,
    )
    max_tokens, max_draft = opts.max_tokens, opts.max_draft

    caches.tokens.extend(prompt)
    num_known = len(caches.tokens)
    num_yielded = 0
    try:
        stats.start()
        stats.prompt_tokens = num_known - caches.main_offset
        prefill(model, caches.main, caches.tokens[caches.main_offset : -1], caches, kv_quantize, opts.prefill_step_size)
        if draft_model is not None:
            prefill(
                draft_model,
                caches.draft,
                caches.tokens[caches.draft_offset : -1],
                caches,
                kv_quantize,
                opts.prefill_step_size,
            )
        caches.take_over_rotating()
        stats.prompt_done()
        host = HostReads()
        for round_ in rounds(
            model,
            draft,
            caches,
            policy,
            max_tokens,
            params,
            key,
            vocab_size,
            max_draft,
            kv_quantize,
            host,
            logits_processors,
        ):
            stats.record_round(round_.num_draft, round_.num_accepted)
            stats.host_syncs = host.count
            for i, token in enumerate(round_.tokens):
                num_yielded += 1
                stats.record_token()
                yield token, round_.logprobs[i], i < round_.num_accepted
    finally:
        caches.truncate(num_known + num_yielded)


def _token_list(prompt) -> list[int]:
    if isinstance(prompt, mx.array):
        prompt = prompt.tolist()
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    return prompt


def make_options(options: dict) -> GenerationOptions:
    """GenerationOptions from keyword arguments; an unknown name is a TypeError, as for any function."""
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    return GenerationOptions(**options)


def _policy(opts: GenerationOptions, model, draft_model):
    if opts.num_draft_tokens != "auto":
        return FixedDraft(opts.num_draft_tokens)
    ratio = _nbytes(draft_model) / _nbytes(model) if draft_model is not None else 1.0
    return DraftController(max_draft=opts.auto_max_draft, cost_ratio=ratio)


def _nbytes(model) -> int:
    """Bytes of weights: a decoding step reads them all, so their ratio predicts the cost ratio."""
    return sum(w.nbytes for _, w in tree_flatten(model.parameters()))


@dataclass
class GenerationResponse:
    """One streamed token, as mlx-lm's GenerationResponse, plus the running statistics."""

    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None
    stats: GenerationStats


def stream_generate(
    model,
    tokenizer,
    prompt: str | list[int] | mx.array,
    draft_model=None,
    max_tokens: int = 256,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Stream GenerationResponses: text segments as tokens are generated.

    Stops after `max_tokens` tokens (finish_reason "length") or at an end
    token (finish_reason "stop"; the end token's response is the last one).
    Other keyword arguments are those of speculative_generate_step.
    """
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if isinstance(prompt, str):
        prompt = encode_prompt(tokenizer, prompt)
    if draft_model is not None:
        check_draft(model, draft_model, tokenizer)
    stats = kwargs.pop("stats", None) or GenerationStats()
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    steps = speculative_generate_step(prompt, model, draft_model, max_tokens=max_tokens, stats=stats, **kwargs)

    def response(token, logprobs, from_draft, finish_reason):
        return GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=stats.prompt_tokens,
            prompt_tps=stats.prompt_tps,
            generation_tokens=stats.generation_tokens,
            generation_tps=stats.generation_tps,
            peak_memory=stats.peak_memory,
            finish_reason=finish_reason,
            stats=stats,
        )

    with closing(steps):  # a consumer that stops early leaves consistent caches at once
        for n, (token, logprobs, from_draft) in enumerate(steps, start=1):
            if token in tokenizer.eos_token_ids:
                detokenizer.finalize()
                yield response(token, logprobs, from_draft, "stop")
                return
            detokenizer.add_token(token)
            if n == max_tokens:
                detokenizer.finalize()
                yield response(token, logprobs, from_draft, "length")
                return
            yield response(token, logprobs, from_draft, None)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a plain-text prompt, as mlx-lm encodes it: the BOS token added unless the text has it."""
    add_special = tokenizer.bos_token is None or not text.startswith(tokenizer.bos_token)
    return tokenizer.encode(text, add_special_tokens=add_special)


def generate(model, tokenizer, prompt, draft_model=None, verbose: bool = False, **kwargs) -> str:
    """Generate a whole response and return its text; `verbose` prints it as it streams and the statistics."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, draft_model=draft_model, **kwargs):
        if verbose:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose:
        print()
        if last is not None:
            print("=" * 10)
            print(last.stats.summary())
    return text
