"""The `mlx-spec` command line: generate, chat, serve, convert, drafts, bench; a thin layer over the Python API.

Every user error (a ValueError, an OSError, a bad flag) becomes one `mlx-spec: error: ...` line on stderr.
"""

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import mlx.core as mx

from .chat import ChatSession, conversation_tokens, interact, legend, paint, use_color
from .discover import find_drafts, report, resolve_draft
from .distributed import TIMEOUT_ENV, DistributedError, shared_reader, timeout_seconds, watchdog, world
from .distributed import add_arguments as add_distributed_arguments
from .generate import stream_generate
from .load import check_draft, load, model_source
from .mtp import MTP, head_for
from .options import (
    DEFAULT_DRAFT_VOCAB_SIZE,
    KV_BITS,
    MAX_BODY,
    MAX_DRAFT_TOKENS,
    MAX_QUEUE,
    NUM_PROMPT_CACHES,
    GenerationOptions,
    parse_num_draft_tokens,
)
from .stats import GenerationStats

PROG = "mlx-spec"


class UsageError(ValueError):
    """A bad command line (argparse's complaint)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through main(), not argparse's usage block
        raise UsageError(message)


def _int_at_least(low: int, high: int = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _draft_length(text: str):
    try:
        return parse_num_draft_tokens(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def note(message: str):
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# --- models and settings, shared by generate and chat -----------------------


def add_model_arguments(p):
    p.add_argument(
        "--model",
        metavar="PATH",
        help="main model: MLX folder, Hugging Face id or .gguf file "
        "(default: the Qwen2.5-Coder 1.5B / 0.5B Instruct pair, fetched once)",
    )
    p.add_argument(
        "--draft-model",
        metavar="PATH",
        help="draft model, 'auto': the best compatible local one (see `mlx-spec drafts`), or 'mtp': the main "
        "model's own MTP layer (Qwen3.5 / Qwen3-Next checkpoints); "
        "default: none with --model, the pair's draft without",
    )
    p.add_argument("--no-draft", action="store_true", help="run the main model alone, for comparison")
    p.add_argument(
        "--mtp",
        action="store_true",
        help="also draft with the main model's MTP layer, beside --draft-model (chosen round by round)",
    )
    p.add_argument(
        "--no-prompt-lookup",
        action="store_true",
        help="do not copy draft tokens from the conversation (with --no-draft: plain decoding)",
    )
    p.add_argument(
        "--num-draft-tokens",
        type=_draft_length,
        default="auto",
        metavar="K",
        help=f"draft tokens per round, 1..{MAX_DRAFT_TOKENS}, or 'auto' to choose each round (default)",
    )
    p.add_argument(
        "--draft-vocab-size",
        type=_int_at_least(0),
        default=DEFAULT_DRAFT_VOCAB_SIZE or 0,
        metavar="N",
        help="cut the draft's output layer to the first N token ids (default 0: all)",
    )
    p.add_argument(
        "--max-tokens",
        "-m",
        type=_int_at_least(1),
        default=256,
        metavar="N",
        help="most tokens to generate (per reply in chat; default 256)",
    )
    p.add_argument("--temp", type=float, default=0.0, metavar="T", help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest tokens (0: off)")
    p.add_argument(
        "--min-p", type=float, default=0.0, metavar="P", help="drop tokens below P x the top probability (0: off)"
    )
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument(
        "--max-kv-size",
        type=_int_at_least(1),
        metavar="N",
        help="sliding-window KV cache of N tokens (the context never fills up)",
    )
    p.add_argument("--kv-bits", type=int, choices=KV_BITS, help="quantize the KV cache to this many bits")
    p.add_argument("--system-prompt", metavar="TEXT", help="system prompt for the chat template")
    add_distributed_arguments(p)


def add_color_argument(p):
    p.add_argument("--no-color", action="store_true", help="do not colour the draft's tokens")


def settings_from(args) -> GenerationOptions:
    """The generation settings, checked before any model is loaded."""
    return GenerationOptions(
        max_tokens=args.max_tokens,
        num_draft_tokens=args.num_draft_tokens,
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        max_kv_size=args.max_kv_size,
        kv_bits=args.kv_bits,
        draft_vocab_size=args.draft_vocab_size or None,
        prompt_lookup=not args.no_prompt_lookup,
        mtp=args.mtp and not args.no_draft,
    )


def load_models(args):
    """(model, tokenizer, draft_model or None or "mtp"); the default pair when no --model is given."""
    main_source, draft_source = args.model, args.draft_model
    if main_source is None:
        from .fetch import fetch_default_pair

        main_source, default_draft = fetch_default_pair(progress=note)
        draft_source = draft_source or default_draft
    model, tokenizer = load(str(main_source), group=world(), pipeline=args.pipeline)  # sharded under mlx.launch
    if args.mtp and not args.no_draft:
        head_for(model)  # a folder without MTP tensors fails here, before anything is generated
    if args.no_draft or draft_source is None:
        return model, tokenizer, None
    if draft_source == MTP:
        head_for(model)  # a folder without MTP tensors fails here, before anything is generated
        return model, tokenizer, MTP
    draft_source = resolve_draft(main_source, draft_source, progress=note)
    draft_model, draft_tokenizer = load(str(draft_source))
    check_draft(model, draft_model, tokenizer, draft_tokenizer)
    return model, tokenizer, draft_model


# --- generate ---------------------------------------------------------------


def add_generate_arguments(p):
    add_model_arguments(p)
    add_color_argument(p)
    p.add_argument("--prompt", "-p", required=True, metavar="TEXT", help="the message ('-' reads it from stdin)")
    p.add_argument("--ignore-chat-template", action="store_true", help="use the prompt as is, without the template")
    p.add_argument("--verbose", action="store_true", help="more statistics: rounds, draft lengths, host syncs")
    p.add_argument("--json", action="store_true", help="print one JSON object (text and statistics) and nothing else")


def generate_command(args) -> int:
    """generate text from a prompt, then print statistics"""
    settings = settings_from(args)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    if args.ignore_chat_template and args.system_prompt is not None:
        raise ValueError("--system-prompt needs the chat template: drop --ignore-chat-template")
    model, tokenizer, draft_model = load_models(args)
    if args.ignore_chat_template or not tokenizer.has_chat_template:
        if args.system_prompt is not None:
            raise ValueError("--system-prompt needs a chat template and the model has none")
        prompt = text
    else:
        prompt = conversation_tokens(tokenizer, [{"role": "user", "content": text}], args.system_prompt)
    color = not args.json and use_color(sys.stdout, args.no_color)
    stats, output, tokens, finish_reason = GenerationStats(), "", [], None
    for response in stream_generate(
        model, tokenizer, prompt, draft_model=draft_model, stats=stats, **settings.as_kwargs()
    ):
        output += response.text
        tokens.append(response.token)
        finish_reason = response.finish_reason
        if not args.json:
            sys.stdout.write(paint(response.text, response.from_draft, color, response.source))
            sys.stdout.flush()
    if args.json:
        num_draft = settings.num_draft_tokens if draft_model is not None else 0
        print(
            json.dumps(
                dict(
                    text=output,
                    tokens=tokens,
                    finish_reason=finish_reason,
                    model=model_source(model),
                    draft_model=model_source(draft_model) if draft_model is not None else None,
                    num_draft_tokens=num_draft,
                    **stats.as_dict(),
                )
            )
        )
        return 0
    print()
    lines = ["=" * 10, stats.summary()]
    if args.verbose:
        lines.append(
            f"Time to first token: {stats.time_to_first_token:.3f} s; {stats.num_rounds} rounds, "
            f"{stats.host_syncs} host syncs; draft lengths: {dict(sorted(stats.draft_lengths.items()))}"
        )
    if color and (draft_model is not None or settings.prompt_lookup):
        lines.append(f"{legend(draft_model)}.")
    print("\n".join(lines), file=sys.stderr)
    return 0


# --- chat -------------------------------------------------------------------


def add_chat_arguments(p):
    add_model_arguments(p)
    add_color_argument(p)


def chat_command(args) -> int:
    """chat in the terminal; the KV caches live across turns, draft tokens in green"""
    settings = settings_from(args)
    model, tokenizer, draft_model = load_models(args)
    session = ChatSession(
        model,
        tokenizer,
        draft_model,
        settings,
        system_prompt=args.system_prompt,
        color=use_color(sys.stdout, args.no_color),
    )
    group = world()  # under mlx.launch: rank 0 reads the lines, every rank runs them; Ctrl-C in a reply ends it all
    if group is None:
        return interact(session)
    return interact(session, shared_reader(input, group), stop_replies=False)


# --- serve ------------------------------------------------------------------


def add_serve_arguments(p):
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_at_least(0, 65535), default=8080, help="port (default 8080; 0: any free one)")
    p.add_argument("--api-key", metavar="KEY", help="answer only requests with 'Authorization: Bearer KEY'")
    p.add_argument(
        "--max-queue",
        type=_int_at_least(0),
        default=MAX_QUEUE,
        metavar="N",
        help=f"requests that may wait for the model; more get 503 (default {MAX_QUEUE})",
    )
    p.add_argument(
        "--max-body",
        type=_int_at_least(1),
        default=MAX_BODY,
        metavar="BYTES",
        help=f"largest request body; larger gets 413 (default {MAX_BODY // 2**20} MiB)",
    )
    p.add_argument(
        "--prompt-cache-size",
        type=_int_at_least(1),
        default=NUM_PROMPT_CACHES,
        metavar="N",
        help=f"conversations whose KV caches are kept for reuse (default {NUM_PROMPT_CACHES})",
    )


def serve_command(args) -> int:
    """serve the OpenAI API (chat and completions) over HTTP, with speculative decoding"""
    import logging

    try:
        from . import server
    except ImportError as e:
        raise ValueError(f"serve needs the server extra ({e.name} is missing): pip install 'mlx-spec[server]'") from e
    settings = settings_from(args)
    group = world()
    if group is not None and group.rank() != 0:  # under mlx.launch: rank 0 serves, the others run its rounds
        model, tokenizer, draft_model = load_models(args)
        server.follow(model, tokenizer, draft_model, settings, args.prompt_cache_size)
        return 0
    if not server.is_loopback(args.host) and args.api_key is None:
        note(f"warning: listening on {args.host} without --api-key: anyone who can reach this machine can use it")
    with server.bind(args.host, args.port) as sock:  # before loading: a busy port fails at once
        model, tokenizer, draft_model = load_models(args)
        logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        logging.getLogger(server.log.name).setLevel(logging.INFO)
        app = server.create_app(
            model,
            tokenizer,
            draft_model,
            settings,
            api_key=args.api_key,
            max_queue=args.max_queue,
            max_body=args.max_body,
            num_prompt_caches=args.prompt_cache_size,
            system_prompt=args.system_prompt,
        )
        host, port = sock.getsockname()[:2]
        address = f"[{host}]" if ":" in host else host
        draft = f", draft {server.served_name(draft_model)}" if draft_model is not None else ""
        ready = f"serving {server.served_name(model)}{draft} at http://{address}:{port}/v1 (Ctrl-C stops)"
        server.run(app, sock, on_ready=lambda: note(ready))
    failure = app.state.server.engine.failure
    if failure is not None:
        raise DistributedError(failure)
    note("stopped")
    return 0


# --- convert ----------------------------------------------------------------


def add_convert_arguments(p):
    p.add_argument(
        "gguf",
        metavar="SOURCE",
        help="a llama.cpp GGUF model file (qwen2 or llama), or a Hugging Face checkpoint folder (its MTP tensors "
        "are kept, for --draft-model mtp)",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="the MLX model folder to write (must not exist)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="weight type (default: float16 on Apple GPUs, float32 on CPUs)",
    )
    p.add_argument("--q-bits", type=int, choices=(4, 8), help="re-quantize the weights to this many bits")
    p.add_argument(
        "--mtp-bits",
        type=int,
        choices=(4, 8),
        help="quantize the MTP layer of a Hugging Face checkpoint to this many bits (default: --dtype, unquantized)",
    )


def convert_command(args) -> int:
    """convert a GGUF file or a Hugging Face checkpoint (its MTP tensors kept) into an MLX model folder"""
    from .gguf import convert_gguf, default_dtype

    if Path(args.gguf).is_dir():
        from .mtp import convert

        if Path(args.out_dir).exists():
            raise ValueError(f"{args.out_dir} exists: give a folder to create")
        convert(
            args.gguf, args.out_dir, dtype=args.dtype or default_dtype(), q_bits=args.q_bits, mtp_bits=args.mtp_bits
        )
        note(f"wrote {args.out_dir}")
        return 0
    if args.mtp_bits is not None:
        raise ValueError("--mtp-bits is for a Hugging Face checkpoint folder: a GGUF file has no MTP tensors")
    if not Path(args.gguf).is_file():
        raise ValueError(f"GGUF file not found: {args.gguf}")
    try:
        convert_gguf(args.gguf, args.out_dir, dtype=args.dtype or default_dtype(), q_bits=args.q_bits, progress=note)
    except ValueError as e:  # the gguf reader's own messages ("GGUF magic invalid") do not name the file
        raise ValueError(f"could not convert {args.gguf}: {e}") from e
    return 0


# --- drafts -----------------------------------------------------------------


def add_drafts_arguments(p):
    p.add_argument(
        "--model", metavar="PATH", help="main model: MLX folder, .gguf file or cached hub id (default: the pair's main)"
    )
    p.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="DIR",
        help="also look in DIR (repeatable); always searched: LM Studio's folders, the Hugging Face cache, "
        "mlx_spec's cache",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list of the models and their verdicts")


def drafts_command(args) -> int:
    """list the local models that could draft for the main model, best first (reads metadata, never weights)"""
    main_source = args.model
    if main_source is None:
        from .fetch import default_pair_paths

        main_source = default_pair_paths()[0]
        if not main_source.is_dir():
            raise ValueError("no --model given and the default pair is not fetched yet (mlx-spec generate fetches it)")
    drafts = find_drafts(main_source, search=args.search)
    if args.json:
        print(json.dumps([d.as_dict() for d in drafts], indent=2))
    else:
        print(report(main_source, drafts))
    return 0


def bench_command(args) -> int:
    """benchmark: main alone vs mlx_spec vs mlx-lm's speculative decoding"""
    from . import bench

    return bench.run(args)


def add_bench_arguments(p):
    from . import bench

    bench.add_arguments(p)


# name -> (add_arguments(parser), run(args) -> exit code); run's docstring is the command's help.
COMMANDS = {
    "generate": (add_generate_arguments, generate_command),
    "chat": (add_chat_arguments, chat_command),
    "convert": (add_convert_arguments, convert_command),
    "drafts": (add_drafts_arguments, drafts_command),
    "bench": (add_bench_arguments, bench_command),
    "serve": (add_serve_arguments, serve_command),
}


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = _Parser(
        prog=PROG,
        parents=[common],
        description="Speculative decoding on MLX: a draft model proposes, the main model verifies.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, run) in COMMANDS.items():
        summary = (run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None
        add_arguments(commands.add_parser(name, parents=[common], help=summary, description=summary))
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 error, 2 bad usage, 130 interrupted).

    With `argv=None` (the real command line) OpenBLAS is set up first, which may re-execute the process.
    """
    if argv is None:
        try:
            from .blas import ensure_openblas
        except ImportError:
            pass
        else:
            ensure_openblas()
    argv = sys.argv[1:] if argv is None else list(argv)
    errors = sys.stderr  # where an error goes, on every rank
    try:
        args = build_parser().parse_args(argv)
        group = world()
        if group is None:
            return COMMANDS[args.command][1](args)
        if getattr(args, "timeout", None) is not None:  # the bound of every sharded call's watchdog
            os.environ[TIMEOUT_ENV] = str(timeout_seconds(args.timeout))
        if group.rank() != 0:  # only rank 0 prints; the other ranks run the same rounds, and tell only errors
            sys.stdout = sys.stderr = open(os.devnull, "w")
        code = COMMANDS[args.command][1](args)
        with watchdog().armed(f"{args.command} finishing", group):  # no rank leaves while another still sends
            mx.eval(mx.distributed.all_sum(mx.array(code), group=group))
        return code
    except SystemExit as e:  # --help
        return e.code or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:
        if "--debug" in argv:
            traceback.print_exc(file=errors)
        known = isinstance(e, (ValueError, OSError, DistributedError))
        message = " ".join(str(e).split()) if known else f"unexpected {type(e).__name__}: {e} (--debug shows where)"
        print(f"{PROG}: error: {message}", file=errors)
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
