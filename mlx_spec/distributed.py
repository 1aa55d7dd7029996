"""Several ranks (mlx.distributed): the main model sharded by mlx-lm, every rank running the same rounds.

The main model is split by mlx-lm's `sharded_load` (tensor parallel through `shard(group)`, or a pipeline
through `model.model.pipeline(group)`); the draft model and the lookup are whole on every rank. Every rank
runs the same rounds in lockstep, so whatever decides a round must be the same on every rank:
- tokens: an all-reduce (tensor parallel) or the pipeline's all-gather gives every rank the same logits, so
  greedy choices, acceptance and stop checks agree; random draws agree once every rank has rank 0's seed
  (`start_call`, one all_sum at a call's start);
- the adaptive controller's choices: it is deterministic, fed the same rounds; its measured seconds are
  rank 0's on every rank (`Lockstep`: rank 0's clock rides on the next round's host read in one small
  all_sum, and every rank learns it then).
A rank that dies or hangs: a `DistributedError` naming it (a lost connection), or the `Watchdog` ends the
process with one line once no round finished within `timeout` seconds.
"""

import json
import os
import pickle
import struct
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from . import facts

TIMEOUT_ENV = "MLX_SPEC_TIMEOUT"
DEFAULT_TIMEOUT = 120.0  # seconds a rank waits for the others in one round (or a prompt chunk) before it stops
HUNG_EXIT = 3  # the exit status of a rank that the watchdog stopped


class DistributedError(RuntimeError):
    """Another rank stopped answering (it died, or its connection broke)."""


def world() -> mx.distributed.Group | None:
    """The group of the ranks this process was launched with (mlx.launch), None when it runs alone."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def is_printing_rank() -> bool:
    """Whether this process prints and serves: rank 0 of its group, or a process running alone."""
    group = world()
    return group is None or group.rank() == 0


def group_of(model) -> mx.distributed.Group | None:
    """The group a main model is split over: the one `load(..., group=...)` gave it, else that of mlx-lm's
    sharded layers or pipeline stages found in it (a model that `mlx_lm.sharded_load` returned); None: whole."""
    if world() is None:  # a process alone (the usual case): nothing to look for
        return None
    known = facts.known(model)
    if known is not None and known.group is not None:
        return known.group
    group = world() if getattr(getattr(model, "model", None), "pipeline_size", 1) > 1 else None
    for _, module in model.named_modules() if group is None else ():
        found = getattr(module, "group", None)
        if isinstance(found, mx.distributed.Group) and found.size() > 1:
            group = found
            break
    if group is not None:
        facts.of(model).group = group
    return group


def splits(model) -> list[str]:
    """How mlx-lm can split a model: "tensor" (it has `shard`), "pipeline" (its `model` has `pipeline`)."""
    ways = ["tensor"] if hasattr(model, "shard") else []
    return ways + (["pipeline"] if hasattr(getattr(model, "model", None), "pipeline") else [])


def sharded_load(folder: Path, group: mx.distributed.Group, pipeline: bool = False, **kwargs):
    """(model, tokenizer): the model of an MLX `folder` split over `group` by mlx-lm's `sharded_load`,
    tensor parallel, or in a pipeline with `pipeline`. `kwargs`: `tokenizer_config`, `trust_remote_code`.

    mlx-lm's pipeline picks each rank's weight files from `model.safetensors.index.json`; a folder of one
    `model.safetensors` has none, so it reads a copy of the folder made of links and a written index."""
    from mlx_lm.utils import sharded_load as mlx_lm_sharded_load

    kwargs = {k: v for k, v in kwargs.items() if k in ("tokenizer_config", "trust_remote_code")}
    groups = (group, None) if pipeline else (None, group)
    with _indexed(Path(folder)) as indexed:
        try:
            model, tokenizer = mlx_lm_sharded_load(str(indexed), *groups, **kwargs)
        except ValueError as e:
            if "does not support" in str(e):
                raise ValueError(f"{folder}: {e} (it supports: {', '.join(_folder_splits(indexed)) or 'none'})") from e
            raise
    facts.of(model).group = group
    return model, tokenizer


@contextmanager
def _indexed(folder: Path):
    if (folder / "model.safetensors.index.json").is_file() or not (folder / "model.safetensors").is_file():
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="mlx_spec_shard_") as tmp:
        for item in folder.iterdir():
            os.symlink(item.absolute(), Path(tmp) / item.name)
        names = _safetensors_names(folder / "model.safetensors")
        index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in names}}
        (Path(tmp) / "model.safetensors.index.json").write_text(json.dumps(index))
        yield Path(tmp)


def _safetensors_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header (read without loading the tensors)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return [name for name in header if name != "__metadata__"]


def _folder_splits(folder: Path) -> list[str]:
    from mlx_lm.utils import load_model

    model, _ = load_model(folder, lazy=True, strict=False)
    return splits(model)


def add_arguments(p):
    """The command line's flags of a sharded run (generate, chat, serve, bench)."""
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="under mlx.launch: split the main model in a pipeline (default: tensor parallel where it can)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help=f"under mlx.launch: stop when the ranks made no progress for S seconds (default {DEFAULT_TIMEOUT:g})",
    )


def share(values: list[float], group: mx.distributed.Group) -> list[float]:
    """Rank 0's `values` on every rank (one all_sum; exact for integers below 2**24)."""
    mine = values if group.rank() == 0 else [0.0] * len(values)
    return mx.distributed.all_sum(mx.array(mine, mx.float32), group=group).tolist()


def share_object(obj, group: mx.distributed.Group):
    """Rank 0's `obj` (picklable; None for nothing) on every rank, as mlx_lm.server shares its requests: one
    all_sum of its size, and one of its bytes unless it is None. The other ranks' `obj` is not read."""
    data = pickle.dumps(obj) if group.rank() == 0 and obj is not None else b""
    size = int(mx.distributed.all_sum(mx.array(len(data)), group=group).item())
    if size == 0:
        return None
    mine = mx.array(memoryview(data), mx.uint8) if data else mx.zeros((size,), mx.uint8)
    shared = mx.distributed.all_sum(mine, group=group)
    mx.eval(shared)  # a buffer is read as it is: evaluated first
    return obj if group.rank() == 0 else pickle.loads(bytes(memoryview(shared)))


def shared_reader(read, group: mx.distributed.Group):
    """`read(prompt) -> line` (raising EOFError or KeyboardInterrupt) that reads on rank 0 and gives every rank
    what rank 0 read, so that all ranks run the same commands (a chat under mlx.launch)."""

    def shared(prompt: str) -> str:
        what = None
        if group.rank() == 0:
            try:
                what = ("line", read(prompt))
            except EOFError:
                what = ("eof",)
            except KeyboardInterrupt:
                what = ("interrupt",)
        what = share_object(what, group)
        if what[0] == "eof":
            raise EOFError
        if what[0] == "interrupt":
            raise KeyboardInterrupt
        return what[1]

    return shared


def start_call(group: mx.distributed.Group, policy, needs_seed: bool):
    """(policy, lockstep) of a sharded call, once every collective queued before it (on mlx-lm's stream too: a
    generator of mlx-lm's left a step queued there) is done, so that every rank's collectives pair up. Where the call draws from MLX's global generator (`needs_seed`) or
    its policy chooses among sources from measured seconds, one all_sum at its start gives every rank rank 0's
    random seed and the controller's prior cost ratio (a pipeline stage's weights differ per rank). An adaptive
    controller is wrapped in a `Lockstep` (also returned): one that can only decode plainly learns no seconds
    (what it would learn of the main model serves later calls that choose); a fixed draft length learns none."""
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)  # a step mlx-lm queued ahead on its stream must not race this call's collectives
    adaptive = hasattr(policy, "record_cost")  # else a FixedDraft
    chooses = adaptive and (policy.max_draft > 0 or policy.max_lookup > 0)
    if needs_seed or chooses:
        seed = mx.random.randint(0, 2**24, ()).item() if needs_seed else 0
        seed, ratio = share([seed, policy.cost_ratio if chooses else 0.0], group)
        if needs_seed:
            mx.random.seed(int(seed))
        if chooses:
            policy.cost_ratio = ratio
    if not adaptive:
        return policy, None
    lockstep = Lockstep(policy, group, chooses)
    return lockstep, lockstep


class Lockstep:
    """The round policy of a sharded call: the adaptive controller fed rank 0's clock on every rank.

    `record` gives the controller a round's tokens at once (the same on every rank) and keeps the round's
    seconds; `attach` makes the next lazy round's read also carry rank 0's seconds of the oldest kept round
    (one all_sum of two numbers, evaluated with the round's readout: no host read of its own), and `settle`,
    after that read, gives them to the controller. Every rank thus learns the same seconds at the same point:
    its choices stay rank 0's, one round later than in one process.
    """

    def __init__(self, policy, group: mx.distributed.Group, learns_seconds: bool = True):
        self.policy, self.group, self.learns_seconds = policy, group, learns_seconds
        self.kept = deque()  # (choice, seconds, catch_up) recorded here, rank 0's seconds not yet known
        self.riding = {}  # id(readout) -> (choice, seconds, catch_up, shared array)
        self.num_shared = 0  # all_sums made: the collectives this adds to a call's rounds

    def choose(self, *args, **kwargs):
        return self.policy.choose(*args, **kwargs)

    def keeps_plain(self, *args, **kwargs):
        return self.policy.keeps_plain(*args, **kwargs)

    def record(self, choice, num_accepted: int, seconds: float | None, catch_up=None, unused=None):
        self.policy.record(choice, num_accepted, None, None, unused)
        if self.learns_seconds and (seconds is not None or catch_up is not None):
            self.kept.append((choice, seconds, catch_up))

    def attach(self, readout: mx.array) -> mx.array:
        """`readout`, made to carry rank 0's seconds of the oldest kept round (if any) to every rank."""
        if not self.kept:
            return readout
        choice, seconds, catch_up = self.kept.popleft()
        mine = [seconds or 0.0, catch_up[1] if catch_up else 0.0]
        if self.group.rank() != 0:
            mine = [0.0, 0.0]
        shared = mx.distributed.all_sum(mx.array(mine, mx.float32), group=self.group)
        self.num_shared += 1
        readout = mx.depends(readout, shared)
        self.riding[id(readout)] = (choice, seconds, catch_up, shared, readout)
        return readout

    def settle(self, readout: mx.array):
        """After `readout` was read: the controller learns the seconds it carried."""
        riding = self.riding.pop(id(readout), None)
        if riding is None:
            return
        choice, seconds, catch_up, shared, _ = riding
        seconds_0, catch_up_0 = shared.tolist()  # evaluated with the readout
        self.policy.record_cost(
            choice,
            seconds_0 if seconds is not None else None,
            (catch_up[0], catch_up_0) if catch_up is not None else None,
        )


def timeout_seconds(timeout: float | None = None) -> float:
    """The watchdog's bound: `timeout`, else $MLX_SPEC_TIMEOUT, else DEFAULT_TIMEOUT."""
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    if not timeout > 0:
        raise ValueError(f"the distributed timeout must be > 0 seconds, got {timeout}")
    return timeout


class Watchdog:
    """Ends the process with one line on stderr once an armed stretch made no progress for `timeout` seconds:
    a collective that waits for a rank that hangs never returns, and no Python code runs in this thread."""

    def __init__(self):
        self.deadline, self.timeout, self.what = None, 0.0, ""
        self.thread = None

    @contextmanager
    def armed(self, what: str, group: mx.distributed.Group, timeout: float | None = None):
        """Within: no progress (`beat`) for `timeout` seconds stops the process; a lost connection to another
        rank raises DistributedError."""
        outer = self.deadline, self.timeout, self.what
        self.timeout, self.what = timeout_seconds(timeout), f"rank {group.rank()} of {group.size()}: {what}"
        self.beat()
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, daemon=True, name="mlx_spec watchdog")
            self.thread.start()
        try:
            yield self
        except RuntimeError as e:
            if isinstance(e, DistributedError) or "[ring]" not in str(e) and "connection" not in str(e):
                raise
            raise DistributedError(f"{self.what}: another rank stopped answering ({e})") from e
        finally:
            self.deadline, self.timeout, self.what = outer

    def beating(self, callback):
        """`callback`, which also counts as progress."""

        def beating(*args):
            self.beat()
            return callback(*args)

        return beating

    def beat(self):
        if self.timeout:
            self.deadline = time.monotonic() + self.timeout

    def _watch(self):
        while True:
            time.sleep(min(0.1, self.timeout / 10) if self.timeout else 0.1)
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                sys.stderr.write(
                    f"mlx-spec: error: {self.what}: no answer from the other ranks within {self.timeout:g} s "
                    f"(a rank died or hangs); stopping (${TIMEOUT_ENV} or --timeout sets the bound)\n"
                )
                sys.stderr.flush()
                os._exit(HUNG_EXIT)


_watchdog = None


def watchdog() -> Watchdog:
    global _watchdog
    if _watchdog is None:
        _watchdog = Watchdog()
    return _watchdog
