"""Run a script as several local ranks of MLX's ring backend, as mlx.launch does, with each rank's exit status.

mlx.launch stops every rank once one fails and does not return a failing rank's status, so the tests start the
ranks themselves (a hostfile of free localhost ports, MLX_RANK and MLX_HOSTFILE per process) and read each
rank's status and output, as MLX's own tests of the ring backend do.
"""

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: still running at the timeout (then killed)
    stdout: str
    stderr: str

    def lines(self, prefix: str) -> list:
        """The JSON values of the stdout lines that start with `prefix`."""
        return [json.loads(line[len(prefix) :]) for line in self.stdout.splitlines() if line.startswith(prefix)]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_ranks(
    args: list[str],
    tmp_path: Path,
    num_ranks: int = 2,
    timeout: float = 120,
    grace: float | None = None,
    env=None,
    stdin: str | None = None,
) -> list[RankResult]:
    """Run `python args...` as `num_ranks` ring ranks on localhost; each rank's result, after at most `timeout`
    seconds, and at most `grace` seconds after rank 0 ended (a rank still running then is killed: returncode
    None). `stdin`: rank 0's input (the others read none)."""
    procs = start_ranks(args, tmp_path, num_ranks, env, stdin is not None)
    deadline = time.monotonic() + timeout
    results = []
    for rank, proc in enumerate(procs):
        left = max(deadline - time.monotonic(), 0.1)
        try:
            given = stdin if rank == 0 else None
            out, err = proc.communicate(given, timeout=left if rank == 0 or grace is None else min(left, grace))
            code = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            code = None
        results.append(RankResult(rank, code, out, err))
    return results


def start_ranks(args: list[str], tmp_path: Path, num_ranks: int = 2, env=None, stdin: bool = False) -> list:
    """The processes of `python args...` as `num_ranks` ring ranks on localhost, started (rank 0's stdin a pipe
    where `stdin`, the others' none)."""
    hostfile = Path(tmp_path) / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(num_ranks)]))
    base = dict(os.environ, PYTHONPATH=str(ROOT), MLX_HOSTFILE=str(hostfile), **(env or {}))
    base.pop("MLX_RANK", None)
    return [
        subprocess.Popen(
            [sys.executable, *args],
            env=dict(base, MLX_RANK=str(rank)),
            stdin=subprocess.PIPE if stdin and rank == 0 else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for rank in range(num_ranks)
    ]
