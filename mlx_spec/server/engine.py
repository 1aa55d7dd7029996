"""The engine thread: generates the requests together (batched rounds, joining and leaving between rounds), keeps the
prompt caches of the last few conversations and streams events (text cut at stop strings, logprobs) back to the
request handlers.

Sharded (mlx.launch), every rank runs the engine's loop and rank 0 alone serves HTTP: before each round rank 0
tells the other ranks what changed (the jobs that join, those whose client left, whether to stop), so every rank
runs the same rounds over the same requests (`Engine.follow`; the batch shares rank 0's clock itself).
"""

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import make_logits_processors

from ..batch import Batch, Request
from ..cache import CachePair, common_prefix_length, make_prompt_cache, reuse_prefix
from ..decode import prefill
from ..distributed import DistributedError, group_of, share_object, watchdog
from ..generate import Call, _token_list, begin_call
from ..grammar import GrammarProcessor
from ..load import model_name, model_source, output_size
from ..options import GenerationOptions
from ..recurrent import leaves
from ..stats import GenerationStats
from .models import TokenLogprob, _first_line

log = logging.getLogger("mlx_spec.server")

STOPPING = "the server is stopping"
MAX_RETRY_AFTER = 60  # seconds


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


@dataclass(frozen=True)
class Processing:
    """A request's logits processors as data (mlx-lm's bias and penalties, llguidance's grammar): what a sharded
    server's other ranks build theirs from."""

    logit_bias: dict[int, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    grammar: str | None = None  # the reply's grammar (grammar.GrammarProcessor)

    def build(self, tokenizer, vocab_size: int) -> list | None:
        processors = make_logits_processors(
            logit_bias=self.logit_bias, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty
        )
        if self.grammar is not None:
            processors.append(GrammarProcessor(tokenizer, self.grammar, vocab_size))
        return processors or None


@dataclass
class Job:
    """One request's generation; the engine thread sends its events to the request's event loop (a job that a
    sharded server's rank 0 sent to another rank has none: its events go nowhere)."""

    prompt_tokens: list[int]
    options: GenerationOptions
    use_draft: bool
    stops: list[str]
    num_top_logprobs: int | None  # None: no logprobs
    logits_processors: list | None
    loop: asyncio.AbstractEventLoop | None
    processing: Processing = Processing()  # what `logits_processors` were built from
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client left, or the server stops
    key: int = -1  # sharded: its number, the same on every rank

    def send(self, event):
        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    def wire(self) -> tuple:
        """What another rank needs to run the same generation (`Job.unwire`)."""
        return (
            self.key,
            self.prompt_tokens,
            self.options,
            self.use_draft,
            self.stops,
            self.num_top_logprobs,
            self.processing,
        )

    @classmethod
    def unwire(cls, wired: tuple, tokenizer, vocab_size: int) -> "Job":
        key, tokens, options, use_draft, stops, num_top, processing = wired
        processors = processing.build(tokenizer, vocab_size)
        return cls(tokens, options, use_draft, stops, num_top, processors, None, processing, key=key)


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


MAX_BATCH = 8  # requests generating at once; more wait in the queue
HEARTBEAT = 1.0  # sharded: seconds between rank 0's words to the other ranks while no request generates
JOIN_CHUNK = 512  # prompt tokens read between two rounds: a long prompt joins in chunks, the others go on
JOIN_WAIT = 0.01  # seconds an idle engine waits, once a job came, for others sent at the same time


class _Active:
    """A request that generates: its call's rounds in the batch, and the reply its tokens become."""

    def __init__(self, engine: "Engine", job: Job):
        self.engine, self.job, self.start = engine, job, time.perf_counter()
        self.draft_model = engine.draft_model if job.use_draft else None
        self.cache, self.rest = engine.caches.take(job.prompt_tokens, self.draft_model is not None)
        self.history_start = len(self.cache.tokens)  # what logits processors see starts here, as in one call
        self.num_read = 0  # prompt tokens read in chunks before the call began
        self.stats, self.reply = GenerationStats(), Reply(job.stops)
        self.stats.start()
        self.detokenizer = engine.tokenizer.detokenizer
        self.num_yielded, self.num_from_draft = 0, 0
        self.finish_reason, self.stop_reason = "length", "maxPredictedTokensReached"
        self.call: Call | None = None  # once the prompt is in
        self.request: Request | None = None

    def read(self, budget: int) -> int:
        """Read up to `budget` more prompt tokens: a chunk, or the rest and begin the call (a prompt whose caches
        take no chunks is read whole). Returns the tokens read."""
        engine, cache, opts = self.engine, self.cache, self.job.options
        chunked = opts.kv_bits is None and all(type(c) is KVCache for c in leaves(cache.main))
        if chunked and len(self.rest) > budget:
            chunk, self.rest = self.rest[:budget], self.rest[budget:]
            cache.tokens.extend(chunk)  # the cache holds all but the last token, as between rounds
            prefill(engine.model, cache.main, cache.tokens[cache.main_offset : -1], cache, lambda _: None)
            self.num_read += len(chunk)
            return len(chunk)
        started = self.stats._start
        self.call = begin_call(
            _token_list(self.rest), engine.model, self.draft_model, opts, cache, self.stats, self.job.logits_processors
        )
        self.call.decoding.history_start = self.history_start  # logits processors see the whole prompt
        self.stats._start, self.stats.prompt_tokens = started, self.stats.prompt_tokens + self.num_read
        self.request = Request(self.call.decoding, self.call.opts.token_limit, self.call.plain_first)
        return len(self.rest)

    def drop(self):
        """Leave while the prompt is read (the client left, the server stops, the reading failed)."""
        self.engine.caches.put(self.cache, len(self.job.prompt_tokens))

    def take(self, round_) -> bool:
        """Send a round's tokens to the client as text and logprobs; True once the reply is complete."""
        job, stats, eos = self.job, self.stats, self.engine.tokenizer.eos_token_ids
        stats.record_round(round_.num_draft, round_.num_accepted, round_.source)
        stats.host_syncs = self.call.decoding.host.count
        for i, token in enumerate(round_.tokens):
            if self.num_yielded == 0:
                stats.prompt_done()
            self.num_yielded += 1
            from_draft = i < round_.num_accepted
            stats.record_token(round_.source if from_draft else None)
            self.num_from_draft += from_draft
            end_token = token in eos
            last = end_token or self.num_yielded == self.call.opts.token_limit
            if end_token:
                self.detokenizer.finalize()
            else:
                self.detokenizer.add_token(token)
                if last:
                    self.detokenizer.finalize()
            entry = None
            if job.num_top_logprobs is not None and not end_token:
                entry = self.engine._logprob(token, round_.logprobs[i], job.num_top_logprobs)
            text, entries, stopped = self.reply.add(self.detokenizer.last_segment, entry)
            if stopped or last:
                if not stopped:
                    rest, more = self.reply.finish()
                    text, entries = text + rest, entries + more
                self.finish_reason = "stop" if stopped or end_token else "length"
                self.stop_reason = "stopStringFound" if stopped else "eosFound" if end_token else self.stop_reason
            if text or entries:
                job.send(Delta(text, entries))
            if stopped or last:
                return True
        return False

    def leave(self, failed: Failed | None = None):
        """Leave the batch: the caches hold exactly the tokens generated and go back to the pool; the answer."""
        engine, job = self.engine, self.job
        self.request.leave_alone()
        self.call.end(self.num_yielded)
        engine.caches.put(self.cache, len(job.prompt_tokens))
        engine.mean_seconds = 0.8 * engine.mean_seconds + 0.2 * (time.perf_counter() - self.start)
        if failed is not None:
            job.send(failed)
            return
        done = engine._done(
            job, self.stats, self.num_from_draft, self.finish_reason, self.stop_reason, self.draft_model is not None
        )
        if engine.gone(job):
            why = "the server is stopping" if engine.stopping else "the client left"
            log.info(f"generation stopped after {self.stats.generation_tokens} tokens: {why}")
        job.send(Failed(STOPPING, 503) if engine.stopping else done)


class Engine:
    """Runs every generation on one thread (MLX's default stream is per thread): up to `max_batch` requests at
    once, their rounds batched (batch.py); requests join and leave between rounds, in arrival order.

    At most `max_queue` jobs wait for a place in the batch; `submit` raises QueueFull past that.

    With the main model sharded, `_loop` runs on every rank (rank 0's in this thread, the others' in `follow`).
    """

    def __init__(
        self,
        model,
        tokenizer,
        draft_model,
        max_kv_size,
        max_queue: int,
        num_prompt_caches: int,
        max_batch: int = MAX_BATCH,
    ):
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.max_queue, self.max_batch = max_queue, max_batch
        self.caches = PromptCaches(model, draft_model, max_kv_size, max(num_prompt_caches, 1))
        self.draft_name = served_name(draft_model) if draft_model is not None else None
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.num_waiting = 0
        self.active: list[_Active] = []  # the requests generating, in arrival order
        self.joining: list[_Active] = []  # the requests whose prompt is being read, in arrival order
        self.group = group_of(model)  # sharded over these ranks, or None
        self.batch = Batch(model, self.group)
        self.keys = itertools.count()  # sharded: the jobs' numbers
        self.left: set[int] = set()  # sharded: the jobs that left, as rank 0 last said
        self.failure: str | None = None  # sharded: why the ranks stopped serving (a rank was lost)
        self.on_failure = lambda: None  # called once then, on rank 0's engine thread (the server stops)
        self.stopping = False
        self.mean_seconds = 1.0  # running mean of a job's seconds, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="mlx-spec-engine", daemon=True)

    def start(self):
        self.thread.start()

    def cancel_all(self):
        """The server is stopping: the running and the waiting jobs end at once, answered 503."""
        with self.lock:
            self.stopping = True
            for job in [*(a.job for a in self.active + self.joining), *self.jobs.queue]:
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
                batches = (self.num_waiting + 1) / max(self.max_batch, 1)
                retry_after = math.ceil(self.mean_seconds * batches)
                raise QueueFull(min(max(retry_after, 1), MAX_RETRY_AFTER))
            self.num_waiting += 1
        self.jobs.put(job)

    def status(self) -> dict:
        stats = self.batch.stats
        return {
            "waiting": self.num_waiting,
            "generating": bool(self.active or self.joining),
            "active": len(self.active),
            "joining": len(self.joining),
            "max_batch": self.max_batch,
            "rounds": stats.num_rounds,
            "mean_batch_size": round(stats.mean_batch_size, 3),
        }

    def gone(self, job: Job) -> bool:
        """Whether the job's client left or the server stops: at once in one process; sharded, as of rank 0's
        last word to the other ranks (every rank sees a job leave at the same point)."""
        return job.cancelled.is_set() if self.group is None else job.key in self.left

    def _end(self, job: Job):
        """The job stops here (its reading failed): on every rank alike."""
        job.cancelled.set()
        self.left.add(job.key)

    def _loop(self):
        if self.group is None:
            return self._rounds()
        try:
            with watchdog().armed("serving", self.group):
                self._rounds()
        except DistributedError as e:  # a rank was lost: every request fails, and the server stops
            self.failure = str(e)
            with self.lock:
                self.stopping = True
                jobs = [*(a.job for a in self.active + self.joining), *self.jobs.queue]
            for job in jobs:
                if job is not None:
                    job.send(Failed(f"the server stopped: {e}", 500))
            self.on_failure()

    def _rounds(self):
        running = True
        while running or self.active or self.joining:
            # 1) take the jobs that arrived, while the batch has room (sharded: as rank 0 says)
            running = self._take(running)
            # 2) read up to JOIN_CHUNK prompt tokens of the joining requests: whole prompts, or a chunk
            self._read(JOIN_CHUNK)
            # 3) one round of every active request, 4) the finished ones leave
            if self.active:
                self._round()
                if self.group is not None:
                    watchdog().beat()
        for job in self.jobs.queue:  # the server stopped: what still waits is answered 503
            if job is not None:
                job.send(Failed(STOPPING, 503))

    def _take(self, running: bool) -> bool:
        """The jobs that arrived join while the batch has room: waiting for one when none generates, then
        JOIN_WAIT for others sent with it (they read their prompts together). False once the server stops."""
        arrived, idle = [], not (self.active or self.joining)
        follows = self.group is not None and self.group.rank() != 0
        while running and not follows and len(self.active) + len(self.joining) + len(arrived) < self.max_batch:
            wait = JOIN_WAIT if arrived else HEARTBEAT if self.group is not None else None
            try:
                job = self.jobs.get(timeout=wait) if idle else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                running = False
                break
            with self.lock:
                self.num_waiting -= 1
            if self.stopping:
                job.send(Failed(STOPPING, 503))
            elif not job.cancelled.is_set():  # else its client left while it waited
                job.key = next(self.keys)
                arrived.append(job)
        if self.group is not None:
            running, arrived = self._share(running, arrived)
        for job in arrived:
            joining = _Active(self, job)
            with self.lock:
                self.joining.append(joining)
        return running

    def _share(self, running: bool, arrived: list[Job]) -> tuple[bool, list[Job]]:
        """Sharded: rank 0's word to every rank before a round (one all_sum, two when something changed):
        whether to go on, the jobs that join, those that left."""
        self.left &= {a.job.key for a in self.active + self.joining}  # those gone since are forgotten
        mine = None
        if self.group.rank() == 0:
            left = [a.job.key for a in self.active + self.joining if a.job.cancelled.is_set()]
            left = [key for key in left if key not in self.left]
            if arrived or left or not running:
                mine = (running, [job.wire() for job in arrived], left)
        word = share_object(mine, self.group)
        watchdog().beat()
        if word is None:
            return running, arrived
        running, wired, left = word
        self.left.update(left)
        if self.group.rank() != 0:
            vocab_size = output_size(self.model)
            arrived = [Job.unwire(w, self.tokenizer, vocab_size) for w in wired]
        return running, arrived

    def follow(self):
        """A sharded server's rank other than 0: run the rounds rank 0 serves, until it stops. Raises
        DistributedError where a rank was lost."""
        self._loop()
        if self.failure is not None:
            raise DistributedError(self.failure)

    def _read(self, budget: int):
        """Read the joining requests' prompts, oldest first, up to `budget` tokens; those read join the batch."""
        while self.joining and budget > 0:
            joining = self.joining[0]
            if self.gone(joining.job):
                joining.drop()
                if self.stopping:
                    joining.job.send(Failed(STOPPING, 503))
            else:
                try:
                    budget -= joining.read(budget)
                except DistributedError:
                    raise
                except Exception as e:
                    log.exception("generation failed")
                    joining.drop()
                    joining.job.send(Failed(f"internal error: {type(e).__name__}: {_first_line(e)}"))
                    self._end(joining.job)
                if joining.call is None and not self.gone(joining.job):
                    return  # a chunk of it was read: the rest after the next round
            with self.lock:
                self.joining.pop(0)
                if joining.call is not None and not self.gone(joining.job):
                    self.active.append(joining)

    def _round(self):
        active = list(self.active)
        try:
            rounds = self.batch.step([a.request for a in active])
        except DistributedError:
            raise
        except Exception as e:  # a round's failure is every request's in it
            log.exception("generation failed")
            for a in active:
                a.leave(Failed(f"internal error: {type(e).__name__}: {_first_line(e)}"))
            with self.lock:
                self.active = []
            return
        finished = []
        for a, round_ in zip(active, rounds):
            try:
                if a.take(round_) or self.gone(a.job):
                    finished.append(a)
                    a.leave()
            except DistributedError:
                raise
            except Exception as e:
                log.exception("generation failed")
                finished.append(a)
                a.leave(Failed(f"internal error: {type(e).__name__}: {_first_line(e)}"))
        with self.lock:
            self.active = [a for a in self.active if a not in finished]

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


def served_name(model) -> str:
    """The id a model is served under: a folder's name, or the hub id or file it was loaded from."""
    source = model_source(model) or model_name(model)
    path = Path(source).expanduser()
    return path.name if path.is_dir() else source
