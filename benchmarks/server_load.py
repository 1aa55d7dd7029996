"""Load on `mlx-spec serve`: concurrent clients through the openai client; nothing lost, answers exact, latency.

Starts the server in a subprocess (the default pair unless --model is given), asks each prompt once alone
(greedy: the reference answers), then sends --requests requests from --clients threads at once and prints
how many were answered, whether each answer equals its sequential one, latency percentiles, throughput and the
server's resident memory before and after.

    python3 benchmarks/server_load.py --clients 8 --requests 64 --max-tokens 16
"""

import argparse
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def start_server(flags: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    """`mlx-spec serve --port 0 FLAGS`; returns it, its base URL, and its log (read on a thread)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "mlx_spec.cli", "serve", "--port", "0", *flags], stderr=subprocess.PIPE, text=True
    )
    log = []
    for line in child.stderr:
        log.append(line)
        if match := re.search(r"at (http://\S+/v1) \(Ctrl-C stops\)", line):
            threading.Thread(target=lambda: log.extend(child.stderr), daemon=True).start()
            return child, match.group(1), log
    sys.exit("".join(log) or f"the server exited with {child.wait()}")


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
    args = p.parse_args(argv)

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
