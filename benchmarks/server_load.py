"""Load on `mlx-spec serve`: concurrent clients through the openai client; nothing lost, answers exact, latency.

Starts the server in a subprocess (the default pair unless --model is given), asks each prompt once alone
(greedy: the reference answers), then sends --requests requests from --clients threads at once and prints
how many were answered, whether each answer equals its sequential one, latency percentiles, throughput and the
server's resident memory before and after.

    python3 benchmarks/server_load.py --clients 8 --requests 64 --max-tokens 16

With --compare, several clients at once against three servers in turn, each started alone: `mlx-spec serve`
(the default pair), mlx-lm's server with the main model alone (it batches concurrent requests) and with the
draft (one request at a time). Each pass sends one streamed greedy request per client, all at once, each a
different prompt, and prints the aggregate tok/s, the p50 time to first token and whether each text equals
the first server's:

    python3 benchmarks/server_load.py --compare --clients-list 1 4 8 --max-tokens 64
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

PROMPTS = [
    "Write a quicksort algorithm in Python. Write code only.",
    "Explain what a hash table is in two sentences.",
    "Write a Python function that reverses a linked list.",
    "List three uses of binary search.",
    "Write a SQL query that counts the orders of each customer.",
    "What does the `yield` keyword do in Python?",
    "Write a bash one-liner that counts the lines of every .py file.",
    "Give a haiku about compilers.",
]


def start_server(flags: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str, list[str]]:
    """`mlx-spec serve --port 0 FLAGS`; returns it, its base URL, and its log (read on a thread)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "mlx_spec.cli", "serve", "--port", "0", *flags],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    log = []
    for line in child.stderr:
        log.append(line)
        if match := re.search(r"at (http://\S+/v1) \(Ctrl-C stops\)", line):
            threading.Thread(target=lambda: log.extend(child.stderr), daemon=True).start()
            return child, match.group(1), log
    sys.exit("".join(log) or f"the server exited with {child.wait()}")


def start_mlx_lm(flags: list[str]) -> tuple[subprocess.Popen, str]:
    """mlx-lm's server with FLAGS on a free port, with OpenBLAS preloaded as mlx-spec runs (a fair CPU)."""
    import socket

    from mlx_spec.blas import find_openblas

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    if (blas := find_openblas()) is not None:
        env["LD_PRELOAD"] = blas
    cmd = [sys.executable, "-m", "mlx_lm.server", "--port", str(port), *flags]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/models", timeout=1).status_code == 200:
                return child, base
        except httpx.HTTPError:
            pass
        if child.poll() is not None:
            sys.exit(f"mlx_lm.server exited with {child.returncode}")
        time.sleep(0.5)
    sys.exit("mlx_lm.server did not start")


def concurrent_pass(base: str, model: str, prompts: list[str], max_tokens: int) -> dict:
    """One streamed greedy request per prompt, all at once: texts, first-token times, aggregate tok/s."""
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=3600)

    def ask(prompt: str):
        start = time.perf_counter()
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, first, tokens = "", None, 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first if first is not None else time.perf_counter() - start
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, first, tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(ask, prompts))
    wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    return {
        "texts": [r[0] for r in results],
        "ttft_p50": percentile([r[1] for r in results], 0.5),
        "tok_s": tokens / wall,
        "tokens": tokens,
        "wall": wall,
    }


def compare(args) -> int:
    """--compare: each server in turn, each client count; prints a table and the ratios to mlx-lm batched."""
    from mlx_spec.fetch import default_pair_paths

    main, draft = (str(p) for p in default_pair_paths())
    servers = {
        "mlx-spec serve (pair)": ("spec", []),
        "mlx-lm server, main alone (batched)": ("lm", ["--model", main]),
        "mlx-lm server, with draft (serial)": ("lm", ["--model", main, "--draft-model", draft]),
    }
    if args.baseline:  # another checkout of mlx_spec, e.g. the one before batching
        servers[f"mlx-spec serve ({args.baseline})"] = ("spec", [])
    servers = {name: servers[name] for name in servers if name not in args.skip}
    results, reference = {}, {}
    for name, (kind, flags) in servers.items():
        log = []
        if kind == "spec":
            env = dict(os.environ, PYTHONPATH=args.baseline) if name.endswith(f"({args.baseline})") else None
            child, base, log = start_server([], env)
        else:
            child, base = start_mlx_lm(flags)
        try:
            model = "default_model"  # mlx-lm's name for the model it was started with
            if kind == "spec":
                model = openai.OpenAI(base_url=base, api_key="unused").models.list().data[0].id
            concurrent_pass(base, model, PROMPTS[:1], 4)  # warm up
            for clients in args.clients_list:
                prompts = [PROMPTS[i % len(PROMPTS)] for i in range(clients)]
                r = results[name, clients] = concurrent_pass(base, model, prompts, args.max_tokens)
                same = sum(t == u for t, u in zip(r["texts"], reference.setdefault(clients, r["texts"])))
                print(
                    f"{name}, {clients} clients: {r['tok_s']:.2f} tok/s aggregate ({r['tokens']} tokens in "
                    f"{r['wall']:.1f} s), first token p50 {r['ttft_p50']:.2f} s, {same}/{clients} texts equal "
                    "to the first server's",
                    flush=True,
                )
        except Exception:
            print(f"{name} failed (exit code {child.poll()}); its log, last lines:", *log[-20:], sep="\n  ")
            raise
        finally:
            child.send_signal(signal.SIGINT)
            child.wait(timeout=120)
    batched = "mlx-lm server, main alone (batched)"
    if not any(name == batched for name, _ in results):
        return 0
    print("\n| server | clients | tok/s | x mlx-lm batched | first token p50 s | x mlx-lm batched |")
    print("|---|---|---|---|---|---|")
    for (name, clients), r in results.items():
        b = results[batched, clients]
        print(
            f"| {name} | {clients} | {r['tok_s']:.2f} | {r['tok_s'] / b['tok_s']:.2f} | {r['ttft_p50']:.2f} | "
            f"{r['ttft_p50'] / b['ttft_p50']:.2f} |"
        )
    return 0


def rss_mb(pid: int) -> float | None:
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return None
    kib = re.search(r"VmRSS:\s+(\d+) kB", status.read_text())
    return int(kib.group(1)) / 1024 if kib else None


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="main model (default: the default pair)")
    p.add_argument("--draft-model", help="draft model")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--requests", type=int, default=64, help="requests in the concurrent pass (default 64)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default 16)")
    p.add_argument("--compare", action="store_true", help="mlx-spec against mlx-lm's server, several clients at once")
    p.add_argument("--clients-list", type=int, nargs="+", default=[1, 4, 8], help="client counts of --compare")
    p.add_argument("--baseline", help="--compare: also serve with this mlx_spec checkout (its PYTHONPATH)")
    p.add_argument("--skip", nargs="*", default=[], help="--compare: servers (by name) to leave out")
    args = p.parse_args(argv)
    if args.compare:
        return compare(args)

    flags = ["--max-tokens", str(args.max_tokens)]
    flags += ["--model", args.model] if args.model else []
    flags += ["--draft-model", args.draft_model] if args.draft_model else []
    child, base, log = start_server(flags)
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=3600)
    model = client.models.list().data[0].id

    def ask(prompt: str):
        start = time.perf_counter()
        try:
            answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}])
        except openai.APIError as e:
            return None, time.perf_counter() - start, repr(e)
        return answer, time.perf_counter() - start, None

    try:
        sequential = {prompt: ask(prompt)[0].choices[0].message.content for prompt in PROMPTS}
        rss_before = rss_mb(child.pid)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(ask, prompts))
        wall = time.perf_counter() - start
        rss_after = rss_mb(child.pid)
    finally:
        child.send_signal(signal.SIGINT)
        child.wait(timeout=120)

    answered = [(prompt, r) for prompt, r in zip(prompts, results) if r[0] is not None]
    exact = sum(r[0].choices[0].message.content == sequential[prompt] for prompt, r in answered)
    latencies = [seconds for _, seconds, _ in results]
    tokens = sum(r[0].usage.completion_tokens for _, r in answered)
    accepted = sum(r[0].stats["accepted_draft_tokens_count"] for _, r in answered)
    drafted = sum(r[0].stats["total_draft_tokens_count"] for _, r in answered)
    print(f"model {model}, draft {answered[0][1][0].stats['draft_model'] if answered else '?'}")
    print(
        f"{len(results)} requests from {args.clients} clients, {args.max_tokens} tokens each at most: "
        f"{len(answered)} answered, {len(results) - len(answered)} lost, {exact} equal to the sequential answer"
    )
    print(
        f"latency p50 {percentile(latencies, 0.5):.2f} s, p95 {percentile(latencies, 0.95):.2f} s, "
        f"max {max(latencies):.2f} s; {tokens} tokens in {wall:.1f} s ({tokens / wall:.2f} tok/s overall); "
        f"accepted {accepted}/{drafted} draft tokens"
    )
    if rss_before is not None and rss_after is not None:
        print(f"server RSS {rss_before:.0f} MB before the concurrent pass, {rss_after:.0f} MB after")
    print(f"server exit code {child.returncode}")
    errors = [error for _, _, error in results if error]
    if errors or child.returncode:
        print("errors:", *errors[:5], "server log, last lines:", *log[-10:], sep="\n  ")
    return 0 if not errors and exact == len(results) and child.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
