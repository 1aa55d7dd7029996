"""The benchmark: the main model alone, our engine and mlx-lm's speculative decoding, side by side.

Every run starts on fresh caches; variants are interleaved (A B C A B C ...) after
one warm-up, so that drift on a noisy machine hits all of them alike. Each of our adaptive variants
learns (costs, acceptance) only from its own runs, as a process of its own would: what the first
variant on a prompt learnt does not serve the next. This is the runner;
the tables, plot and machine description are in `mlx_spec.bench_report`.
"""

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.generate import speculative_generate_step as mlx_lm_speculative
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .adaptive import kept_apart
from .bench_report import (  # the variants' names, shared with the report
    MAIN_ALONE,
    MLX_LM,
    OURS,
    OURS_DRAFT_ONLY,
    OURS_LOOKUP,
    OURS_PLAIN,
    machine,
    markdown,
    save,
)
from .generate import speculative_generate_step
from .mtp import MTP, head_for
from .options import MAX_DRAFT_TOKENS
from .stats import GenerationStats

PROMPTS = {
    "quicksort": "Write a quicksort algorithm in Python. Write code only.",
    "quadratic": "What is the quadratic equation formula?",
    "story": "Write a story that begins: 'The door creaked open...'",
    "pythagoras": "Explain the Pythagorean theorem",
    "dc-trip": "Plan a 1 day trip to DC",
}

# Workloads whose answer repeats text of the conversation (written for this benchmark): a code edit that
# returns the whole file, a quote from a document, and a second chat turn that rewrites the first turn's code.
INVENTORY_PY = """import csv
from dataclasses import dataclass


@dataclass
class Item:
    sku: str
    name: str
    quantity: int
    price: float


def load_items(path):
    items = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            items.append(Item(row["sku"], row["name"], int(row["quantity"]), float(row["price"])))
    return items


def total_value(items):
    return sum(item.quantity * item.price for item in items)


def low_stock(items, threshold=5):
    return [item for item in items if item.quantity < threshold]


def restock(items, sku, amount):
    for item in items:
        if item.sku == sku:
            item.quantity += amount
            return item
    raise KeyError(sku)


if __name__ == "__main__":
    stock = load_items("inventory.csv")
    print(f"{len(stock)} items, worth {total_value(stock):.2f}")
    for item in low_stock(stock):
        print(f"low: {item.name} ({item.quantity} left)")
"""

HANDBOOK = """Harbor Street Library: visitor handbook

Opening hours. The library is open from 9 am to 8 pm on weekdays and from 10 am to 5 pm on Saturdays. \
It is closed on Sundays and public holidays. The reading room closes thirty minutes before the building.

Borrowing. Members may borrow up to twelve items at a time. Books are lent for three weeks, films and \
games for one week. An item can be renewed twice, online or at the desk, unless another member has \
reserved it. Reference works and newspapers cannot be borrowed.

Late returns. A book returned late costs 20 cents per day, up to 6 dollars per item. Films and games \
cost 1 dollar per day. Members with more than 10 dollars of unpaid fees cannot borrow until they pay. \
Fees are waived for members under sixteen.

Study rooms. Four study rooms can be booked for up to two hours a day, at most one week ahead. A room \
that is not claimed within fifteen minutes of the booked time is released to the next visitor.

Printing and scanning. Black and white pages cost 10 cents, colour pages 50 cents. Scanning to a USB \
drive or to email is free. The printers accept cards and coins but not notes.
"""

WORD_COUNT_PY = """def count_words(path):
    counts = {}
    with open(path) as f:
        for line in f:
            for word in line.split():
                word = word.strip(".,;:!?\\"'()").lower()
                if word:
                    counts[word] = counts.get(word, 0) + 1
    return counts


def top_words(counts, n=10):
    pairs = sorted(counts.items(), key=lambda pair: pair[1], reverse=True)
    return pairs[:n]


if __name__ == "__main__":
    import sys

    counts = count_words(sys.argv[1])
    for word, count in top_words(counts):
        print(f"{word}: {count}")
"""

REPEAT_PROMPTS = {
    "rename": "Rename the class `Item` to `Product` and the function `load_items` to `load_products` everywhere "
    "in this file. Return the whole file, code only.\n\n```python\n" + INVENTORY_PY + "```",
    "extract": HANDBOOK + "\nWhat are the rules on borrowing and late returns? Answer with the two sections quoted "
    "exactly as written, as plain text.",
    "chat-rewrite": [
        {"role": "user", "content": "Write a Python function that counts how often each word occurs in a text file."},
        {"role": "assistant", "content": "```python\n" + WORD_COUNT_PY + "```"},
        {
            "role": "user",
            "content": "Add type hints and a docstring to every function, keep everything else as it is, "
            "and return the whole code.",
        },
    ],
}

# LM Studio 0.3.10, MLX engine, M3 Pro 36 GB: (main, draft, prompt, tok/s alone, tok/s with draft)
PRESETS = {
    "lmstudio-m3pro": [
        (
            "mlx-community/Qwen2.5-32B-Instruct-4bit",
            "mlx-community/Qwen2.5-0.5B-Instruct-4bit",
            "Write a quicksort algorithm in Python. Write code only.",
            7.30,
            17.74,
        ),
        (
            "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit",
            "mlx-community/Llama-3.2-1B-Instruct-4bit",
            "Explain the Pythagorean theorem",
            29.65,
            50.91,
        ),
    ],
}

ALL_PROMPTS = {**REPEAT_PROMPTS, **PROMPTS}  # the benchmark's default set, the repeat workloads first


@dataclass
class Run:
    prompt: str
    variant: str
    num_draft: int | None
    temp: float
    rep: int
    tokens: int
    seconds: float  # wall time from the call to the last token, prompt included
    time_to_first_token: float
    prompt_tokens: int
    draft_tokens: int = 0
    accepted_tokens: int = 0
    rounds: int = 0
    peak_memory: float = 0.0
    lookup_draft_tokens: int = 0  # of draft_tokens, copied from the conversation
    lookup_accepted_tokens: int = 0

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds

    @property
    def decode_tps(self) -> float:
        """Tokens per second from the first token to the last (the prompt's prefill left out)."""
        return (self.tokens - 1) / (self.seconds - self.time_to_first_token)


def _run_ours(main, draft, prompt, max_tokens, temp, num_draft, seed, lookup):
    stats = GenerationStats()
    steps = speculative_generate_step(
        prompt,
        main,
        draft,
        num_draft_tokens=num_draft or "auto",
        max_tokens=max_tokens,
        temp=temp,
        seed=seed,
        stats=stats,
        prompt_lookup=lookup,
    )
    for _ in steps:
        pass
    counts = stats.total_draft_tokens, stats.accepted_draft_tokens, stats.num_rounds, stats.time_to_first_token
    return counts + (stats.lookup_draft_tokens, stats.lookup_accepted_tokens)


def _run_mlx_lm(main, draft, prompt, max_tokens, temp, num_draft, seed):
    mx.random.seed(seed)
    sampler = make_sampler(temp)
    start = time.perf_counter()
    first = None
    if draft is None:
        for _ in generate_step(mx.array(prompt), main, max_tokens=max_tokens, sampler=sampler):
            first = first or time.perf_counter() - start
        return 0, 0, max_tokens, first
    drafted = accepted = rounds = emitted = 0
    previous_from_draft = False
    steps = mlx_lm_speculative(
        mx.array(prompt), main, draft, num_draft_tokens=num_draft, max_tokens=max_tokens, sampler=sampler
    )
    for _, _, from_draft in steps:
        first = first or time.perf_counter() - start
        if not previous_from_draft:  # a round starts: mlx-lm drafts min(k, tokens left)
            drafted += min(num_draft, max_tokens - emitted)
        previous_from_draft = from_draft
        emitted += 1
        accepted += from_draft
        rounds += not from_draft
    return drafted, accepted, rounds, first


def run_once(
    variant, num_draft, main, draft, prompt, max_tokens, temp, rep, prompt_name, lookup=True, fresh=False
) -> Run:
    """One run; `lookup`: whether the OURS variant (the default engine) copies from the conversation;
    `fresh`: the adaptive controller starts from nothing learnt, as in a new process."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    looked_up = (0, 0)
    if variant == MAIN_ALONE:
        counts = _run_mlx_lm(main, None, prompt, max_tokens, temp, None, rep)
    elif variant == MLX_LM:
        counts = _run_mlx_lm(main, draft, prompt, max_tokens, temp, num_draft, rep)
    else:
        with_draft = variant in (OURS, OURS_DRAFT_ONLY)
        with_lookup = variant == OURS_LOOKUP or (variant == OURS and lookup)
        store = (variant, num_draft, with_lookup) + ((prompt_name, temp, rep) if fresh else ())
        with kept_apart(store):  # each variant learns as if in a process of its own; `fresh`: each run
            counts = _run_ours(
                main, draft if with_draft else None, prompt, max_tokens, temp, num_draft, rep, with_lookup
            )
        counts, looked_up = counts[:4], counts[4:]
    seconds = time.perf_counter() - start
    drafted, accepted, rounds, first = counts
    return Run(
        prompt_name,
        variant,
        num_draft,
        temp,
        rep,
        max_tokens,
        seconds,
        first,
        len(prompt),
        drafted,
        accepted,
        rounds,
        mx.get_peak_memory() / 1e9,
        *looked_up,
    )


def decode_step_seconds(model, prompt, steps: int = 12) -> float:
    """Seconds per plain decoding step of `model` after `prompt` (for the cost ratio c)."""
    gen = generate_step(mx.array(prompt), model, max_tokens=steps + 2)
    next(gen)
    next(gen)
    start = time.perf_counter()
    for _ in gen:
        pass
    return (time.perf_counter() - start) / steps


def verify_cost_ratio(model, prompt, num_draft: int, reps: int = 3) -> float:
    """Seconds of one main forward over k+1 tokens over those of one token, after `prompt`.

    The formula counts a verify pass as one main step; where hardware makes k+1
    rows dearer (BLAS on a CPU), this is the factor it misses.
    """
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(prompt)[None], cache=cache))

    def seconds(num_tokens):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            mx.eval(model(mx.array(prompt[-num_tokens:])[None], cache=cache))
            times.append(time.perf_counter() - start)
            for c in cache:
                c.trim(num_tokens)
        return statistics.median(times)

    return seconds(num_draft + 1) / seconds(1)


def predicted_speedup(tokens_per_round: float, num_draft: int, cost_ratio: float, verify_ratio: float = 1.0):
    """Leviathan et al.: (1 - a^(k+1)) / ((1 - a)(k c + 1)), with a solved from the measured tokens per round.

    Returns (alpha, predicted speed-up). The verify pass counts as one main step,
    or as `verify_ratio` main steps when that was measured.
    """
    lo, hi = 0.0, 1.0
    for _ in range(60):  # tokens per round (1 - a^(k+1)) / (1 - a) grows with a
        a = (lo + hi) / 2
        tau = sum(a**i for i in range(num_draft + 1))
        lo, hi = (a, hi) if tau < tokens_per_round else (lo, a)
    alpha = (lo + hi) / 2
    tau = sum(alpha**i for i in range(num_draft + 1))
    return alpha, tau / (num_draft * cost_ratio + verify_ratio)


@dataclass
class Config:
    prompts: dict[str, str]
    max_tokens: int = 256
    draft_lengths: list = field(default_factory=lambda: list(range(1, 9)) + ["auto"])
    temps: list[float] = field(default_factory=lambda: [0.0])
    repetitions: int = 1
    peer: bool = True
    ours_plain: bool = True
    lookup: bool = True  # mlx_spec copies from the conversation; adds the lookup-only and draft-only variants
    fresh: bool = False  # each run's adaptive controller starts from nothing learnt (short replies in a new process)


def variants(cfg: Config, has_draft: bool):
    out = [(MAIN_ALONE, None)]
    if cfg.ours_plain:
        out.append((OURS_PLAIN, None))
    if cfg.lookup:
        out.append((OURS_LOOKUP, "auto"))
    if has_draft:
        out += [(OURS, k) for k in cfg.draft_lengths]
        if cfg.lookup and "auto" in cfg.draft_lengths:
            out.append((OURS_DRAFT_ONLY, "auto"))
        if cfg.peer:
            out += [(MLX_LM, k) for k in cfg.draft_lengths if k != "auto"]
    return out


def run_benchmark(main, draft, tokenizer, cfg: Config, progress: Callable[[str], None] = print) -> dict:
    encoded = {name: _encode(tokenizer, text) for name, text in cfg.prompts.items()}
    plan = variants(cfg, draft is not None)
    progress(f"warm-up ({len(plan)} variants)")
    first_prompt = next(iter(encoded.values()))
    for variant, k in plan:
        run_once(variant, k, main, draft, first_prompt, 4, 0.0, 0, "warm-up", cfg.lookup)
    cost = {}
    if draft is not None and not isinstance(draft, str):  # "mtp": benchmarks/mtp_cost.py measures its step
        for name, prompt in encoded.items():
            ratio = decode_step_seconds(draft, prompt) / decode_step_seconds(main, prompt)
            verify = {k: verify_cost_ratio(main, prompt, k) for k in cfg.draft_lengths if k != "auto"}
            cost[name] = dict(draft_step=ratio, verify=verify)
            progress(
                f"{name}: draft step / main step = {ratio:.3f}; verify of k+1 tokens / main step = "
                + ", ".join(f"{v:.2f} (k={k})" for k, v in verify.items())
            )
    runs = []
    total = cfg.repetitions * len(cfg.temps) * len(encoded) * len(plan)
    for rep in range(cfg.repetitions):
        for temp in cfg.temps:
            for name, prompt in encoded.items():
                for variant, k in plan:
                    run = run_once(
                        variant, k, main, draft, prompt, cfg.max_tokens, temp, rep, name, cfg.lookup, cfg.fresh
                    )
                    runs.append(run)
                    progress(
                        f"[{len(runs)}/{total}] {name} temp={temp} {variant}"
                        f"{'' if k is None else f' k={k}'}: {run.tps:.2f} tok/s"
                    )
    return {
        "config": asdict(cfg),
        "cost_ratio": cost,
        "runs": [dict(asdict(r), tps=r.tps) for r in runs],
        "summary": summarize(runs, cost),
        "comparisons": compare(runs),
    }


def _encode(tokenizer, text: str | list[dict]) -> list[int]:
    """A prompt's tokens: a user message, or a conversation (a list of messages), in the chat template."""
    messages = [{"role": "user", "content": text}] if isinstance(text, str) else text
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode("\n\n".join(m["content"] for m in messages))


def summarize(runs: list[Run], cost: dict[str, float]) -> list[dict]:
    """One row per (temp, prompt, variant, k): medians over repetitions, ratios to the main model alone."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.temp, r.prompt, r.variant, r.num_draft), []).append(r)
    rows = []
    for (temp, prompt, variant, k), group in groups.items():
        base = statistics.median(r.tps for r in groups[(temp, prompt, MAIN_ALONE, None)])
        tps = statistics.median(r.tps for r in group)
        drafted = sum(r.draft_tokens for r in group)
        rounds = sum(r.rounds for r in group)
        tokens = sum(r.tokens for r in group)
        looked_up = sum(r.lookup_draft_tokens for r in group)
        decode_base = statistics.median(r.decode_tps for r in groups[(temp, prompt, MAIN_ALONE, None)])
        row = dict(
            temp=temp,
            prompt=prompt,
            variant=variant,
            num_draft=k,
            tps=tps,
            speedup=tps / base,
            decode_tps=statistics.median(r.decode_tps for r in group),
            decode_speedup=statistics.median(r.decode_tps for r in group) / decode_base,
            lookup_share=sum(r.lookup_accepted_tokens for r in group) / tokens,
            draft_share=sum(r.accepted_tokens - r.lookup_accepted_tokens for r in group) / tokens,
            lookup_acceptance=sum(r.lookup_accepted_tokens for r in group) / looked_up if looked_up else None,
            acceptance=sum(r.accepted_tokens for r in group) / drafted if drafted else None,
            tokens_per_round=sum(r.tokens for r in group) / rounds if rounds else None,
            time_to_first_token=statistics.median(r.time_to_first_token for r in group),
            prompt_tps=statistics.median(r.prompt_tokens / r.time_to_first_token for r in group),
            peak_memory=max(r.peak_memory for r in group),
            predicted=None,
            efficiency=None,
            predicted_with_verify=None,
            engine_efficiency=None,
        )
        if k and k != "auto" and prompt in cost and row["tokens_per_round"]:
            c, verify = cost[prompt]["draft_step"], cost[prompt]["verify"][k]
            row["alpha"], row["predicted"] = predicted_speedup(row["tokens_per_round"], k, c)
            row["efficiency"] = row["speedup"] / row["predicted"]
            row["predicted_with_verify"] = predicted_speedup(row["tokens_per_round"], k, c, verify)[1]
            row["engine_efficiency"] = row["speedup"] / row["predicted_with_verify"]
        rows.append(row)
    return rows


BEST_FIXED = "best fixed k"
# The ratios the benchmark is read for: (name, numerator, denominator), each a (variant, k) or BEST_FIXED
COMPARISONS = (
    ("lookup only / main alone", (OURS_LOOKUP, "auto"), (MAIN_ALONE, None)),
    ("hybrid / draft only", (OURS, "auto"), (OURS_DRAFT_ONLY, "auto")),
    ("auto / best fixed k", (OURS, "auto"), BEST_FIXED),
)


def compare(runs: list[Run]) -> list[dict]:
    """The COMPARISONS as paired ratios: each repetition's run over the same repetition's run of the other
    variant (interleaved, both met the same drift of the machine). A row per temp and prompt (the median of
    its pairs), then per temp over all prompts (the geometric mean of every pair). A prompt's best fixed k
    is the one of the highest median tok/s."""
    cases: dict = {}  # (temp, prompt) -> (variant, k) -> rep -> tok/s
    for r in runs:
        cases.setdefault((r.temp, r.prompt), {}).setdefault((r.variant, r.num_draft), {})[r.rep] = r.tps
    rows = []
    for name, top, bottom in COMPARISONS:
        pooled: dict[float, list[list[float]]] = {}  # temp -> each prompt's ratios
        for (temp, prompt), measured in cases.items():
            label, against = name, bottom
            if bottom == BEST_FIXED:
                fixed = [key for key in measured if key[0] == OURS and key[1] != "auto"]
                if not fixed:
                    continue
                against = max(fixed, key=lambda key: statistics.median(measured[key].values()))
                label = f"{name} (k={against[1]})"
            num, den = measured.get(top, {}), measured.get(against, {})
            ratios = [num[rep] / den[rep] for rep in num if rep in den]
            if ratios:
                pooled.setdefault(temp, []).append(ratios)
                rows.append(_comparison(label, temp, prompt, ratios))
        for temp, groups in pooled.items():
            if len(groups) > 1:
                rows.append(_comparison(name, temp, "all prompts", [x for g in groups for x in g], pooled=True))
    return rows


def _comparison(name: str, temp: float, prompt: str, ratios: list[float], pooled: bool = False) -> dict:
    value = statistics.geometric_mean(ratios) if pooled else statistics.median(ratios)
    statistic = "geometric mean" if pooled else "median"
    return dict(comparison=name, temp=temp, prompt=prompt, ratios=ratios, value=value, statistic=statistic)


def parse_draft_lengths(text: str) -> list:
    """'1-8', '1,2,4' or '1-8,auto' -> draft lengths, each in 1..MAX_DRAFT_TOKENS or 'auto'."""
    values = []
    try:
        for item in text.split(","):
            if item == "auto":
                values.append(item)
            elif "-" in item:
                lo, hi = (int(x) for x in item.split("-"))
                values += list(range(lo, hi + 1))
            else:
                values.append(int(item))
    except ValueError:
        raise ValueError(f"--draft-lengths must look like '1-8', '1,2,4' or '1-8,auto', got {text!r}") from None
    if not values or any(v != "auto" and not 1 <= v <= MAX_DRAFT_TOKENS for v in values):
        raise ValueError(f"--draft-lengths must be within 1..{MAX_DRAFT_TOKENS} (or auto), got {text!r}")
    return values


def parse_temps(text: str) -> list[float]:
    try:
        temps = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--temps must be comma-separated numbers, got {text!r}") from None
    if any(t < 0 for t in temps):
        raise ValueError(f"--temps must be >= 0, got {text!r}")
    return temps


def add_arguments(p):
    p.add_argument("--model", help="main model (MLX folder, hub id or .gguf); default: the default pair")
    p.add_argument(
        "--draft-model",
        help="draft model, 'auto': the best compatible local one, or 'mtp': the main model's own MTP layer; "
        "default: the pair's draft",
    )
    p.add_argument("--prompt", action="append", help=f"a prompt name ({', '.join(ALL_PROMPTS)}) or text; repeatable")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--draft-lengths", default="1-8,auto", help="e.g. 1-8, 1,2,4 or 2,4,auto (default 1-8,auto)")
    p.add_argument("--temps", default="0", help="comma-separated temperatures, e.g. 0,0.7 (default 0)")
    p.add_argument("--repetitions", type=int, default=1)
    p.add_argument("--no-peer", action="store_true", help="skip mlx-lm's speculative decoding")
    p.add_argument("--no-plain", action="store_true", help="skip plain decoding through mlx_spec")
    p.add_argument(
        "--no-prompt-lookup",
        action="store_true",
        help="mlx_spec drafts with the draft model only (no copying from the conversation, no lookup-only variant)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="each run of auto starts from nothing learnt, as the first reply of a new process "
        "(by default each variant learns across prompts and repetitions, as a server would)",
    )
    p.add_argument("--quick", action="store_true", help="one prompt, 32 tokens, k = 2, 4 and auto: minutes on a CPU")
    p.add_argument("--preset", help=f"run a published configuration: {', '.join(PRESETS)}")
    p.add_argument("--out", default="benchmarks/out", help="folder for the JSON, markdown and PNG results")
    from .distributed import add_arguments as add_distributed_arguments

    add_distributed_arguments(p)


def config_from_args(args) -> Config:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.repetitions < 1:
        raise ValueError(f"--repetitions must be >= 1, got {args.repetitions}")
    prompts = {}
    for p in args.prompt or []:
        prompts[p if p in ALL_PROMPTS else f"prompt{len(prompts) + 1}"] = ALL_PROMPTS.get(p, p)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ValueError(f"prompt file not found: {args.prompt_file}")
        for line in filter(None, map(str.strip, path.read_text().splitlines())):
            prompts[f"prompt{len(prompts) + 1}"] = line
    cfg = Config(
        prompts=prompts or dict(ALL_PROMPTS),
        max_tokens=args.max_tokens,
        draft_lengths=parse_draft_lengths(args.draft_lengths),
        temps=parse_temps(args.temps),
        repetitions=args.repetitions,
        peer=not args.no_peer,
        ours_plain=not args.no_plain,
        lookup=not args.no_prompt_lookup,
        fresh=args.fresh,
    )
    if args.quick:
        cfg.prompts = (
            dict(list(cfg.prompts.items())[:1])
            if (args.prompt or args.prompt_file)
            else {"quicksort": PROMPTS["quicksort"]}
        )
        cfg.max_tokens, cfg.draft_lengths, cfg.repetitions = min(cfg.max_tokens, 32), [2, 4, "auto"], 1
    return cfg


def run(args, progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> int:
    from .discover import resolve_draft
    from .distributed import is_printing_rank, world
    from .load import load, model_dtype

    if args.preset is not None and args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    cfg = config_from_args(args)
    if args.preset:
        pairs = [(m, d, {"preset": p}, (base, spec)) for m, d, p, base, spec in PRESETS[args.preset]]
    else:
        main_path, draft_path = args.model, args.draft_model
        if main_path is None:
            from .fetch import fetch_default_pair

            main_path, default_draft = fetch_default_pair(progress=progress)
            draft_path = draft_path or default_draft
        pairs = [(main_path, resolve_draft(main_path, draft_path, progress=progress), cfg.prompts, None)]
    out_dir = Path(args.out)
    for i, (main_path, draft_path, prompts, published) in enumerate(pairs):
        progress(f"loading {main_path}" + (f" and {draft_path}" if draft_path else ""))
        main, tokenizer = load(str(main_path), group=world(), pipeline=args.pipeline)  # sharded under mlx.launch
        pair_cfg = Config(**{**asdict(cfg), "prompts": prompts})
        if draft_path == MTP:  # the main model's own MTP layer: mlx-lm cannot draft with it
            head_for(main)
            draft, pair_cfg.peer = MTP, False
        else:
            draft = load(str(draft_path))[0] if draft_path else None
        result = run_benchmark(main, draft, tokenizer, pair_cfg, progress)
        result["machine"] = machine(model_dtype(main), draft and (MTP if draft == MTP else model_dtype(draft)))
        result["models"] = dict(main=str(main_path), draft=draft_path and str(draft_path))
        text = markdown(result)
        if published:
            result["published"] = dict(zip(("main_alone_tps", "with_draft_tps"), published))
            text += (
                f"\n\nLM Studio (M3 Pro): {published[0]:.2f} -> {published[1]:.2f} tok/s, "
                f"{published[1] / published[0]:.2f}x"
            )
        print(f"## {main_path} + {draft_path}\n\n{text}\n", flush=True)
        if is_printing_rank():
            paths = save(result, out_dir, stem=f"bench{i + 1 if len(pairs) > 1 else ''}")
            progress("wrote " + ", ".join(map(str, paths)))
        del main, draft
    return 0
