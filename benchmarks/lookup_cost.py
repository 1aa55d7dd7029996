#!/usr/bin/env python3
"""Host cost of prompt lookup per round, against the length of the conversation.

  python3 benchmarks/lookup_cost.py [--rounds 2000]

A round indexes the tokens the previous round appended, finds the match and
copies up to 16 tokens; the conversation is text that repeats itself in part
(tokens of a small vocabulary, so that matches are found and followed). The
first sync of an index over a whole conversation (a process that starts on a
saved conversation) is timed too. Prints microseconds; nothing here touches the device.
"""

import argparse
import statistics
import time

import numpy as np

from mlx_spec.lookup import NgramIndex


def conversation(num_tokens: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    tokens = [int(t) for t in rng.integers(0, 5000, 512)]
    while len(tokens) < num_tokens:  # copies of earlier stretches between new text
        start = int(rng.integers(0, len(tokens) - 64))
        tokens += tokens[start : start + int(rng.integers(8, 64))] + [int(t) for t in rng.integers(0, 5000, 32)]
    return tokens[:num_tokens]


def per_round_us(num_tokens: int, rounds: int) -> tuple[float, float]:
    """(µs per round, µs of the first sync over the whole conversation)."""
    tokens = conversation(num_tokens + 4 * rounds)
    index = NgramIndex()
    start = time.perf_counter()
    index.sync(tokens[:num_tokens])
    sync_us = 1e6 * (time.perf_counter() - start)
    times, position = [], num_tokens
    for _ in range(rounds):
        start = time.perf_counter()
        index.extend(tokens[len(index.tokens) : position])
        match = index.match()
        if match is not None:
            index.continuation(match, 16)
        times.append(time.perf_counter() - start)
        position += 4  # e.g. three accepted tokens and the main model's own
    return 1e6 * statistics.median(times), sync_us


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args(argv)
    print("| conversation tokens | µs per round (median) | first sync of the whole conversation, ms |")
    print("|---|---|---|")
    for num_tokens in (1024, 8192, 32768, 131072):
        round_us, sync_us = per_round_us(num_tokens, args.rounds)
        print(f"| {num_tokens} | {round_us:.1f} | {sync_us / 1e3:.1f} |")


if __name__ == "__main__":
    main()
