"""One rank of the sharded tests (tests/test_distributed.py starts it through tests/ranks.py).

Argument: a JSON file {"main", "draft", "pipeline", "runs": [{"name", "prompt", "kwargs", "draft"}],
"skew": rank whose clock runs oddly, "stop": {"rank", "after", "how": "exit" | "hang"}, "openblas": preload it, as
the command line does (real weights)}. Prints one line `RESULT {name, tokens, rounds}` per run, where `rounds`
lists each round's (source, num_draft, num_accepted). Started without ranks, it runs the same in one process.
"""

import json
import os
import signal
import sys
import time

import mlx.core as mx

import mlx_spec
from mlx_spec import decode
from mlx_spec.distributed import group_of, world

generate_module = sys.modules["mlx_spec.generate"]  # mlx_spec.generate is the function


class SkewedClock:
    """time's module, but perf_counter runs at a rate that changes every call: the rank's rounds seem to
    take other times than rank 0's."""

    def __init__(self):
        self.calls, self.offset = 0, 0.0

    def perf_counter(self):
        self.calls += 1
        self.offset += 0.05 * (self.calls % 7)
        return time.perf_counter() * 3.0 + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


def main():
    spec = json.loads(open(sys.argv[1]).read())
    if spec.get("openblas"):
        from mlx_spec.blas import ensure_openblas

        ensure_openblas()
    group = world()
    rank = group.rank() if group is not None else 0
    if spec.get("skew") == rank:
        decode.time = SkewedClock()
    log = []
    plain_rounds = generate_module.rounds

    def logged_rounds(*args, **kwargs):
        for round_ in plain_rounds(*args, **kwargs):
            log.append((round_.source, round_.num_draft, round_.num_accepted))
            yield round_

    generate_module.rounds = logged_rounds
    model, _ = mlx_spec.load(spec["main"], group=group, pipeline=spec.get("pipeline", False))
    assert group_of(model) is group
    draft, _ = mlx_spec.load(spec["draft"]) if spec.get("draft") else (None, None)
    stop = spec.get("stop") or {}
    for run in spec["runs"]:
        log.clear()
        tokens = []
        steps = mlx_spec.speculative_generate_step(
            mx.array(run["prompt"]), model, draft if run.get("draft", True) else None, **run.get("kwargs", {})
        )
        for token, _, _ in steps:
            tokens.append(token)
            if stop.get("rank") == rank and len(tokens) == stop["after"]:
                print("STOPPING", flush=True)
                if stop["how"] == "exit":
                    os._exit(9)
                os.kill(os.getpid(), signal.SIGSTOP)
        print("RESULT " + json.dumps({"name": run["name"], "tokens": tokens, "rounds": log}), flush=True)
    if group is not None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # no rank leaves while another still sends


if __name__ == "__main__":
    main()
