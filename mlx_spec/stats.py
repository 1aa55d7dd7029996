"""Counters and rates of one generation, with LM Studio's names where they exist."""

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import mlx.core as mx


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens prefilled for this call (new tokens only, with a reused cache)
    prompt_time: float = 0.0  # to the first token, as mlx-lm counts it (the prompt's rest may go in with it)
    generation_tokens: int = 0  # tokens yielded
    generation_time: float = 0.0  # from the first token to the last
    time_to_first_token: float = 0.0
    total_draft_tokens: int = 0  # drafted by every source
    accepted_draft_tokens: int = 0
    lookup_draft_tokens: int = 0  # of those, copied from the conversation (prompt lookup)
    lookup_accepted_tokens: int = 0
    mtp_draft_tokens: int = 0  # of those, drafted by the main model's own MTP layer (draft_model="mtp")
    mtp_accepted_tokens: int = 0
    num_rounds: int = 0
    host_syncs: int = 0  # device -> host waits while decoding; one per round
    acceptance_rule: str = ""  # "greedy", "rejection sampling" or "exact match" (a sampler of unknown settings)
    draft_lengths: Counter = field(default_factory=Counter)  # draft length -> rounds
    rounds_by_source: Counter = field(default_factory=Counter)  # "plain", "draft", "lookup", "mtp" -> rounds
    last_source: str | None = None  # where the last token came from: "draft", "lookup", "mtp", None (the main model)
    peak_memory: float = 0.0  # GB
    _start: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def model_draft_tokens(self) -> int:
        """Drafted by the draft model."""
        return self.total_draft_tokens - self.lookup_draft_tokens - self.mtp_draft_tokens

    @property
    def model_accepted_tokens(self) -> int:
        return self.accepted_draft_tokens - self.lookup_accepted_tokens - self.mtp_accepted_tokens

    @property
    def rejected_draft_tokens(self) -> int:
        return self.total_draft_tokens - self.accepted_draft_tokens

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_draft_tokens / self.total_draft_tokens if self.total_draft_tokens else 0.0

    @property
    def mean_tokens_per_round(self) -> float:
        return (self.accepted_draft_tokens + self.num_rounds) / self.num_rounds if self.num_rounds else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_time if self.generation_time else 0.0

    def start(self):
        self._start = time.perf_counter()

    def prompt_done(self):
        self.prompt_time = time.perf_counter() - self._start

    def record_round(self, num_draft: int, num_accepted: int, source: str = "draft"):
        self.num_rounds += 1
        self.total_draft_tokens += num_draft
        self.accepted_draft_tokens += num_accepted
        if source in ("lookup", "mtp"):
            setattr(self, f"{source}_draft_tokens", getattr(self, f"{source}_draft_tokens") + num_draft)
            setattr(self, f"{source}_accepted_tokens", getattr(self, f"{source}_accepted_tokens") + num_accepted)
        self.draft_lengths[num_draft] += 1
        self.rounds_by_source[source if num_draft else "plain"] += 1

    def record_token(self, source: str | None = None):
        """One token yielded; `source`: "draft", "lookup" or "mtp" for an accepted draft token, None for the main
        model's."""
        self.last_source = source
        now = time.perf_counter() - self._start
        if self.generation_tokens == 0:
            self.time_to_first_token = now
        self.generation_tokens += 1
        self.generation_time = now - self.prompt_time
        self.peak_memory = mx.get_peak_memory() / 1e9

    def add(self, other: "GenerationStats"):
        """Add another generation's counts (a chat turn's) to these totals."""
        for name in (
            "prompt_tokens",
            "prompt_time",
            "generation_tokens",
            "generation_time",
            "total_draft_tokens",
            "accepted_draft_tokens",
            "lookup_draft_tokens",
            "lookup_accepted_tokens",
            "mtp_draft_tokens",
            "mtp_accepted_tokens",
            "num_rounds",
            "host_syncs",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.draft_lengths.update(other.draft_lengths)
        self.rounds_by_source.update(other.rounds_by_source)
        self.acceptance_rule = other.acceptance_rule or self.acceptance_rule
        self.peak_memory = max(self.peak_memory, other.peak_memory)

    @property
    def mean_draft_length(self) -> float:
        return self.total_draft_tokens / self.num_rounds if self.num_rounds else 0.0

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_") and k != "last_source"}
        out["draft_lengths"] = dict(sorted(self.draft_lengths.items()))
        out["rounds_by_source"] = dict(sorted(self.rounds_by_source.items()))
        for name in (
            "model_draft_tokens",
            "model_accepted_tokens",
            "rejected_draft_tokens",
            "acceptance_rate",
            "mean_tokens_per_round",
            "mean_draft_length",
            "prompt_tps",
            "generation_tps",
        ):
            out[name] = getattr(self, name)
        return out

    def summary(self) -> str:
        lines = [
            f"Prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.2f} tokens-per-sec",
            f"Generation: {self.generation_tokens} tokens, {self.generation_tps:.2f} tokens-per-sec",
        ]
        if self.total_draft_tokens:
            lines.append(
                f"Accepted {self.accepted_draft_tokens}/{self.total_draft_tokens} draft tokens "
                f"({100 * self.acceptance_rate:.1f}%, {self.acceptance_rule}), "
                f"{self.mean_tokens_per_round:.2f} tokens per round, "
                f"draft length {self.mean_draft_length:.1f} on average"
            )
            parts = [
                f"from {name} {accepted}/{drafted}"
                for name, accepted, drafted in (
                    ("the conversation", self.lookup_accepted_tokens, self.lookup_draft_tokens),
                    ("the MTP layer", self.mtp_accepted_tokens, self.mtp_draft_tokens),
                    ("the draft model", self.model_accepted_tokens, self.model_draft_tokens),
                )
                if drafted
            ]
            if self.lookup_draft_tokens or self.mtp_draft_tokens:
                lines.append("  " + ", ".join(parts))
        lines.append(f"Peak memory: {self.peak_memory:.3f} GB")
        return "\n".join(lines)
