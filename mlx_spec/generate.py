"""The public generation API, mirroring mlx-lm's: speculative_generate_step, stream_generate, generate."""

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from transformers import PreTrainedTokenizer

from .adaptive import DRAFT, LOOKUP, MTP, Controller, learnt_for
from .cache import CachePair, SlackRotatingCache, not_rolling_back
from .decode import Decoding, FixedDraft, prefill, rounds
from .distributed import group_of, start_call, watchdog
from .draft import DraftModel, DraftSource
from .load import check_draft, output_size
from .lookup import LookupSource
from .mtp import MTPSource, head_for
from .options import GenerationOptions
from .prompt_cache import pair_for_call
from .recurrent import has_state, leaves, mark
from .sampling import CoupledDraws, LogitsProcessor, Sampler, acceptance_rule, draws_for
from .stats import GenerationStats
from .verify import body_and_head, output_layer

_DEFAULT = GenerationOptions()
ROTATING = (RotatingKVCache, SlackRotatingCache)
# Prompt tokens, at most, read with the first round rather than before it where the model's output layer
# cannot be cut to the last row (verify.output_layer): the pass saved is a decoding step; the output layer
# over each of them costs 1/150 of one on this CPU, less on an Apple GPU.
MAX_FOLDED = 64


def speculative_generate_step(
    prompt: mx.array | list[int],
    model: nn.Module,
    draft_model: nn.Module | None = None,
    *,
    num_draft_tokens: int | str = _DEFAULT.num_draft_tokens,
    max_tokens: int = _DEFAULT.max_tokens,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    prompt_cache: CachePair | list[Any] | None = None,
    prefill_step_size: int = _DEFAULT.prefill_step_size,
    kv_bits: int | None = _DEFAULT.kv_bits,
    kv_group_size: int = _DEFAULT.kv_group_size,
    quantized_kv_start: int = _DEFAULT.quantized_kv_start,
    max_kv_size: int | None = _DEFAULT.max_kv_size,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    temp: float = _DEFAULT.temp,
    top_p: float = _DEFAULT.top_p,
    top_k: int = _DEFAULT.top_k,
    min_p: float = _DEFAULT.min_p,
    seed: int | None = _DEFAULT.seed,
    draft_vocab_size: int | None = _DEFAULT.draft_vocab_size,
    prompt_lookup: bool = _DEFAULT.prompt_lookup,
    mtp: bool = _DEFAULT.mtp,
    stats: GenerationStats | None = None,
) -> Iterator[tuple[int, mx.array, bool]]:
    """A generator of token ids: the main model's own output, drafted by a smaller model.

    The output is token for token the main model's greedy output (no sampler,
    temp=0), and follows its sampling distribution otherwise. Stopping early (or
    an exception) leaves `prompt_cache` holding exactly the tokens yielded so far.

    Args:
        prompt (mx.array or List[int]): The prompt's token ids.
        model (nn.Module): The main model.
        draft_model (nn.Module or "mtp", optional): The draft model; "mtp": the
          main model's own MTP layer (read from the folder `load` read it
          from); None decodes plainly through the same rounds.
        num_draft_tokens (int or "auto"): Draft tokens per round, 1..32, or
          "auto" to choose each round's draft length (plain decoding included)
          from the acceptance and costs measured. Default: ``"auto"``.
        max_tokens (int): The maximum number of tokens; -1 for no limit. Default: ``256``.
        sampler (Sampler, optional): A sampler taking log-probabilities, e.g.
          from ``make_sampler`` (mlx_spec's or mlx-lm's): its settings are read
          and rejection sampling keeps their distribution. Any other callable is
          used with exact-match acceptance (its distribution, fewer draft tokens
          accepted). Default: ``None`` (greedy, or `temp` and its companions).
        logits_processors (List[LogitsProcessor], optional): Functions of
          (tokens, logits) returning logits, applied in order; they see this
          call's prompt and the tokens generated, as in mlx-lm.
        prompt_cache (CachePair or List[Any], optional): Caches to continue:
          a CachePair from ``make_prompt_cache(model, draft_model)``, or
          mlx-lm's flat list (the main model's layers, then the draft model's
          or none). `prompt` is appended to what they hold; they are updated in place.
        prefill_step_size (int): Prompt tokens per prefill step. Default: ``2048``.
        kv_bits (int, optional): Quantize the KV caches to this many bits. Default: ``None``.
        kv_group_size (int): Group size of the KV cache quantization. Default: ``64``.
        quantized_kv_start (int): Cache length at which quantization starts,
          with ``kv_bits``. Default: ``5000``.
        max_kv_size (int, optional): A rotating (sliding-window) KV cache of this
          many tokens, for caches made here (not for a given `prompt_cache`).
        prompt_progress_callback (Callable[[int, int], None], optional): Called
          with (prompt tokens processed, prompt tokens) as the prompt is read.
        temp, top_p, top_k, min_p (optional): Sampling settings without a
          `sampler`: temperature (0: greedy), nucleus mass, top tokens kept,
          minimum probability relative to the top token.
        seed (int, optional): Seed of the sampling, for a reproducible run.
        draft_vocab_size (int, optional): Cut the draft's output layer (or, with
          draft_model="mtp", that of the MTP layer's steps) to the first N token
          ids (cheaper draft steps, same output).
        prompt_lookup (bool): Let rounds copy draft tokens from the conversation
          itself (every token of the cache: prompt, earlier turns, this reply)
          where it repeats; with `draft_model=None` generation is then still
          speculative. Default: ``True``.
        mtp (bool): Also draft with the main model's own MTP layer (its
          checkpoint's `mtp.*` tensors), beside `draft_model`: each round the
          controller chooses among them. `draft_model="mtp"` drafts with the
          MTP layer alone. Default: ``False``.
        stats (GenerationStats, optional): Filled as generation goes.

    Yields:
        Tuple[int, mx.array, bool]: a token, the main model's log-probabilities
          at it, and whether a draft (the draft model or a copy from the
          conversation; `stats.last_source` says which) proposed it.
    """
    tokens = _token_list(prompt)
    opts = GenerationOptions(
        max_tokens=max_tokens,
        num_draft_tokens=num_draft_tokens,
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        max_kv_size=max_kv_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
        draft_vocab_size=draft_vocab_size,
        prefill_step_size=prefill_step_size,
        sampler=sampler,
        prompt_lookup=prompt_lookup,
        mtp=mtp,
    )
    stats = stats if stats is not None else GenerationStats()
    progress = prompt_progress_callback or (lambda *_: None)
    group = group_of(model)  # sharded: a rank that stops answering stops the call (see distributed.watchdog)
    if group is not None:  # a prompt chunk read is progress, for the watchdog
        progress = watchdog().beating(progress)
    with watchdog().armed("generating", group) if group is not None else contextlib.nullcontext():
        call = begin_call(tokens, model, draft_model, opts, prompt_cache, stats, logits_processors, progress)
        num_yielded = 0
        try:
            for round_ in rounds(call.decoding, call.opts.token_limit, call.plain_first):
                if group is not None:
                    watchdog().beat()
                stats.record_round(round_.num_draft, round_.num_accepted, round_.source)
                stats.host_syncs = call.decoding.host.count
                for i, token in enumerate(round_.tokens):
                    if num_yielded == 0:
                        stats.prompt_done()
                        progress(len(tokens), len(tokens))
                    num_yielded += 1
                    stats.record_token(round_.source if i < round_.num_accepted else None)
                    yield token, round_.logprobs[i], i < round_.num_accepted
        finally:
            call.end(num_yielded)


@dataclass
class Call:
    """One generation call once its prompt is in: its rounds' Decoding and how it ends."""

    caches: CachePair
    decoding: Decoding | None  # None until the prompt is read
    plain_first: bool  # the first round decodes plainly (see _read_prompt)
    num_known: int  # the conversation's tokens once the prompt is in
    write_back: Callable[[], None] | None  # mlx-lm's flat list given as the prompt cache: copy the caches back
    opts: GenerationOptions
    kv_quantize: Callable
    model: Any

    def end(self, num_yielded: int):
        """Leave the caches holding exactly the prompt and the `num_yielded` tokens yielded."""
        caches = self.caches
        caches.truncate(self.num_known + num_yielded)
        if self.write_back is not None:  # mlx-lm's list: its cache holds the last token too, as mlx-lm's steps leave it
            prefill(
                self.model,
                caches.main,
                caches.tokens[caches.main_offset :],
                caches,
                self.kv_quantize,
                self.opts.prefill_step_size,
            )
            self.write_back()


def begin_call(
    tokens: list[int],
    model,
    draft_model,
    opts: GenerationOptions,
    prompt_cache,
    stats: GenerationStats,
    logits_processors=None,
    progress: Callable[[int, int], None] = lambda *_: None,
) -> Call:
    """Check the inputs, get the caches, read the prompt and make the rounds' Decoding (the start of
    speculative_generate_step; the server's engine starts its requests with it too). An exception leaves the
    caches as they were."""
    # 1) check the inputs, 2) get the caches
    draft_model, mtp_head = _drafter(model, draft_model, opts.mtp)
    vocab_size = _checked(tokens, model, draft_model)
    caches, write_back, opts = _caches_for(prompt_cache, model, draft_model, opts, mtp_head is not None)
    params = opts.sampling
    kv_quantize = functools.partial(
        CachePair.quantize,
        kv_bits=opts.kv_bits,
        kv_group_size=opts.kv_group_size,
        quantized_kv_start=opts.quantized_kv_start,
    )
    num_before = len(caches.tokens)
    caches.tokens.extend(tokens)
    call = Call(caches, None, False, len(caches.tokens), write_back, opts, kv_quantize, model)
    try:
        stats.start()
        stats.prompt_tokens = call.num_known - caches.main_offset
        # 3) read the prompt, 4) make the sources and the policy
        mtp_source = _mtp_source(model, mtp_head, caches, opts, vocab_size, logits_processors)
        keep_hidden = mtp_source.keep if mtp_source is not None else None
        policy = _policy(opts, model, draft_model, mtp_head if mtp_source is not None else None)
        group, lockstep = group_of(model), None
        if group is not None:  # sharded: every rank runs the same rounds (see distributed)
            policy, lockstep = start_call(group, policy, needs_seed=not params.greedy and opts.seed is None)
        draws = draws_for(params, opts.seed, vocab_size)  # after start_call: every rank's random seed is rank 0's
        stats.acceptance_rule = acceptance_rule(params, draws)
        call.plain_first = _read_prompt(
            model, draft_model, caches, opts, kv_quantize, num_before, progress, mtp_source and mtp_source.keep_and_feed
        )
        sources = _sources(caches, opts, draft_model, vocab_size, kv_quantize, logits_processors, draws)
        if mtp_source is not None:
            sources[MTP] = mtp_source
        call.decoding = Decoding(
            model,
            caches,
            sources,
            policy,
            params,
            draws,
            opts.max_draft,
            kv_quantize,
            logits_processors=logits_processors,
            history_start=num_before,
            keep_hidden=keep_hidden,
            lockstep=lockstep,
        )
    except BaseException:
        call.end(0)
        raise
    return call


def _checked(tokens: list[int], model, draft_model) -> int:
    """The main model's vocabulary size, once the prompt's ids fit it and the draft speaks it (else ValueError)."""
    vocab_size = output_size(model)
    if not all(0 <= t < vocab_size for t in tokens):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {min(tokens)}..{max(tokens)}")
    if draft_model is not None:
        check_draft(model, draft_model)
    return vocab_size


def _drafter(model, draft_model, mtp: bool = False):
    """(draft model or None, MTP layer or None): draft_model="mtp" drafts with the main model's own MTP layer
    alone, `mtp` beside a draft model."""
    if not isinstance(draft_model, str):
        return draft_model, head_for(model) if mtp else None
    if draft_model != MTP:
        raise ValueError(f"draft_model must be a model, None or 'mtp', got {draft_model!r}")
    return None, head_for(model)


def _mtp_source(model, head, caches: CachePair, opts: GenerationOptions, vocab_size: int, logits_processors):
    """The MTP layer as a source, where the caches let it draft: a pair whose main cache holds tokens the MTP
    layer never saw (made or last used without it, or cut back past what it kept) decodes without it."""
    if head is None:
        return None
    source = MTPSource(model, head, caches, opts.sampling, vocab_size, logits_processors, opts.draft_vocab_size)
    if not source.covers():
        warnings.warn(
            f"the prompt cache holds {caches.main_offset} tokens the MTP layer has not read: this call decodes "
            "without it (use a prompt cache with draft_model='mtp' from its first call on)",
            stacklevel=3,
        )
        return None
    return source


def _caches_for(prompt_cache, model, draft_model, opts: GenerationOptions, mtp: bool = False):
    """(caches, write_back, opts): the call's CachePair (see prompt_cache.pair_for_call), and the options it
    allows: a model whose cache kind cannot roll back decodes plainly (lookup off), and takes no draft model
    (nor its MTP layer)."""
    caches, write_back = pair_for_call(prompt_cache, model, draft_model, opts.max_kv_size)
    if (draft_model is not None or mtp) and (kind := not_rolling_back(caches.main + (caches.draft or []))):
        raise ValueError(
            f"a {kind} cache cannot be rolled back, so its model cannot be drafted for: "
            "decode without a draft model (draft_model=None)"
        )
    if opts.prompt_lookup and not_rolling_back(caches.main):  # the default: such a model decodes plainly
        opts = opts.replace(prompt_lookup=False)
    return caches, write_back, opts


def _read_prompt(
    model, draft_model, caches: CachePair, opts, kv_quantize, num_before: int, progress, keep_hidden=None
) -> bool:
    """Read the prompt into the caches but for its last step, which the first round reads (see _folded); the
    draft's cache too, unless it waits (_draft_waits). Returns whether the first round decodes plainly.

    The prompt goes in in steps, after the last token of the previous call: with it, or alone into a rotating
    cache (as mlx-lm's decoding step fed it: a rotating cache attends differently to a token fed with others).
    Afterwards rotating caches are slack ones, and recurrent layers keep their state (a request for the same
    prompt goes back to it). `keep_hidden`: an MTP source's, which reads the main model's hidden states."""
    num_known, offset = len(caches.tokens), caches.main_offset
    num_prompt = num_known - num_before
    progress(0, num_prompt)
    rotating = any(isinstance(c, ROTATING) for c in leaves(caches.main))
    first = offset + 1 if num_before == offset + 1 and rotating else offset
    cut = output_layer(model) is not None
    pending = _folded(num_known - first, num_known, opts, rotating, cut, has_state(caches.main))
    # A sampled call's first round decodes plainly in any case (the policy's first round is the second).
    plain_first = pending > 1 or not opts.sampling.greedy
    for start, end in ((offset, first), (first, num_known - pending)):
        prefill(
            model,
            caches.main,
            caches.tokens[start:end],
            caches,
            kv_quantize,
            opts.prefill_step_size,
            lambda done, start=start: progress(max(0, start + done - num_before), num_prompt),
            keep_hidden,
        )
    if draft_model is not None and not _draft_waits(opts, caches, plain_first):
        prefill(
            draft_model,
            caches.draft,
            caches.tokens[caches.draft_offset : -1],
            caches,
            kv_quantize,
            opts.prefill_step_size,
        )
    caches.take_over_rotating()
    mark(caches.main + (caches.draft or []), prompt=True)
    if pending > 1:  # as mlx-lm reports the prompt read but for its last token, which it feeds alone
        progress(num_prompt - 1, num_prompt)
    return plain_first


def _sources(caches, opts, draft_model, vocab_size: int, kv_quantize, logits_processors, draws) -> dict:
    """The call's sources of draft tokens: the conversation (prompt lookup) and the draft model, where on."""
    params, sources = opts.sampling, {}
    without_q = params.greedy or params.exact_match or isinstance(draws, CoupledDraws)  # no rule needs q
    if opts.prompt_lookup:
        sources[LOOKUP] = LookupSource(caches, vocab_size, without_q)
    if draft_model is not None:
        draft = DraftModel(draft_model, vocab_size, opts.draft_vocab_size)
        catch_up = functools.partial(
            prefill, draft_model, caches.draft, caches=caches, kv_quantize=kv_quantize, chunk=opts.prefill_step_size
        )
        sources[DRAFT] = DraftSource(draft, caches, params, catch_up, logits_processors)
    return sources


def _token_list(prompt) -> list[int]:
    if isinstance(prompt, mx.array):
        prompt = prompt.tolist()
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    return prompt


def _folded(num_left: int, num_known: int, opts: GenerationOptions, rotating: bool, cut: bool, recurrent: bool) -> int:
    """How many of the last `num_left` of `num_known` tokens the first round reads: the prefill's last step
    and the last token, where the model's output layer is `cut` to the last row, or they are at most
    MAX_FOLDED (the pass saved costs more than the output layer over them). Else the last token only, as
    mlx-lm feeds it alone: into a rotating cache, which attends differently to a token fed with others, and
    where mlx-lm quantizes the cache before the last token goes in; the last two where the model has
    `recurrent` layers, whose state at the prompt's end is kept without its last token: a request for the same
    prompt keeps all but that token, and goes back to that state (recurrent.py)."""
    tail = (num_left - 2) % opts.prefill_step_size + 2 if num_left > 1 else 1
    quantized_at = max(opts.quantized_kv_start, 1)  # the cache length at which quantization starts
    quantizes = opts.kv_bits is not None and num_known - tail < quantized_at <= num_known - 1
    if quantizes or rotating:
        return 1
    return tail if cut or tail <= MAX_FOLDED else min(tail, 2 if recurrent else 1)


def _draft_waits(opts: GenerationOptions, caches: CachePair, plain_first: bool) -> bool:
    """Whether the draft model reads the prompt only when a round first drafts: a reply copied from the
    conversation may never need it (lookup on), and a first token decoded plainly need not wait for it.
    A rotating cache reads it now: once generation runs, it takes a few tokens at a time."""
    return (opts.prompt_lookup or plain_first) and not any(isinstance(c, ROTATING) for c in leaves(caches.draft))


def _policy(opts: GenerationOptions, model, draft_model, mtp_head=None):
    if opts.num_draft_tokens != "auto":
        drafter = DRAFT if draft_model is not None or mtp_head is None else MTP
        return FixedDraft(opts.num_draft_tokens, draft_model is not None or mtp_head is not None, drafter)
    ratio = _nbytes(draft_model) / _nbytes(model) if draft_model is not None else 1.0
    # an MTP step reads its layer and the output layer
    mtp_ratio = (_nbytes(mtp_head) + _nbytes(body_and_head(model)[1])) / _nbytes(model) if mtp_head else 0.0
    return Controller(
        learnt_for(model, draft_model),
        max_draft=opts.auto_max_draft,
        max_lookup=opts.auto_max_lookup if opts.prompt_lookup else 0,
        has_draft=draft_model is not None,
        cost_ratio=ratio,
        max_mtp=opts.auto_max_draft if mtp_head is not None else 0,
        mtp_ratio=mtp_ratio,
    )


def _nbytes(model) -> int:
    """Bytes of weights: a decoding step reads them all, so their ratio predicts the cost ratio."""
    model = getattr(model, "__self__", model)  # a bound method (an embedding's as_linear): its module
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
    source: str | None = None  # an accepted draft token's source: "draft" (the draft model) or "lookup"


# mlx-lm's generate_step arguments that mean nothing here
UNSUPPORTED = {
    "input_embeddings": "mlx_spec generates from token ids (speculative decoding in mlx-lm does too)",
    "stream": "mlx_spec runs on MLX's default stream",
}


def stream_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizer | TokenizerWrapper,
    prompt: str | mx.array | list[int],
    max_tokens: int = _DEFAULT.max_tokens,
    draft_model: nn.Module | None = None,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """A generator of text as the model writes it, speculatively when a draft model is given.

    Stops after `max_tokens` tokens (finish_reason "length") or at an end
    token (finish_reason "stop"; the end token's response is the last one).

    Args:
        model (nn.Module): The main model.
        tokenizer (PreTrainedTokenizer or TokenizerWrapper): The tokenizer.
        prompt (str, mx.array or List[int]): The prompt text or its token ids.
        max_tokens (int): The maximum number of tokens to generate; -1 for no limit. Default: ``256``.
        draft_model (nn.Module or "mtp", optional): A draft model speaking the
          main model's vocabulary, or "mtp" (the main model's own MTP layer);
          None decodes plainly. Default: ``None``.
        kwargs: The other options of :func:`speculative_generate_step`
          (sampler, logits_processors, prompt_cache, num_draft_tokens, ...).

    Yields:
        GenerationResponse: the next text segment, its token and the running statistics.
    """
    for name, reason in UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}= is not supported: {reason}")
        kwargs.pop(name, None)
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if isinstance(prompt, str):
        prompt = encode_prompt(tokenizer, prompt)
    if draft_model is not None and not isinstance(draft_model, str):  # "mtp": the model's own
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
            source=stats.last_source,
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


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizer | TokenizerWrapper,
    prompt: str | list[int],
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate a complete response, speculatively when `draft_model=` is given.

    Args:
        model (nn.Module): The main model.
        tokenizer (PreTrainedTokenizer or TokenizerWrapper): The tokenizer.
        prompt (str or List[int]): The prompt text or its token ids.
        verbose (bool): Print the text as it is generated, then the statistics. Default: ``False``.
        kwargs: The options of :func:`stream_generate` (max_tokens, draft_model, sampler, ...).

    Returns:
        str: the generated text.
    """
    if verbose:
        print("=" * 10)
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose:
        print()
        print("=" * 10)
        if last is not None:
            print(last.stats.summary())
    return text
