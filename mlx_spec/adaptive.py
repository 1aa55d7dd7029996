"""Before each round: choose the draft length k (0 = plain decoding) that maximises expected tokens per second.

Pure and deterministic: it learns only from what `record` tells it after each
round (draft length, tokens accepted, seconds the round took).
"""

from typing import List, Optional


class DraftController:
    """Adaptive draft length.

    Acceptance: a_i = P(draft token i accepted | tokens 1..i-1 accepted), per
    position, from counts decayed by each drafting round (recent rounds weigh more). Expected tokens
    of a round with k drafts: E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j.
    Cost: seconds of a round T(k) = A + B k, a decayed least-squares fit over
    the rounds seen; until two draft lengths were seen, B = A * cost_ratio,
    the prior (e.g. the draft's parameter count over the main model's).
    Choice: argmax over k in 0..max_draft of E(k) / T(k). When plain decoding
    wins, a round with one draft token probes every `probe_every` rounds, so a
    later stretch of easy tokens is caught.
    """

    def __init__(self, max_draft: int = 10, cost_ratio: float = 0.3, decay: float = 0.95,
                 probe_every: int = 8, first_draft: int = 3):
        self.max_draft = max_draft
        self.cost_ratio = cost_ratio
        self.decay = decay
        self.probe_every = probe_every
        self.first_draft = first_draft
        self.tried = [0.0] * (max_draft + 1)  # decayed trials at position i (index 1..max_draft)
        self.accepted = [0.0] * (max_draft + 1)
        self.sums = [0.0] * 5  # decayed sums of w, w k, w k^2, w t, w k t
        self.num_rounds = 0
        self.plain_streak = 0

    # --- learning -------------------------------------------------------------
    def record(self, num_draft: int, num_accepted: int, seconds: Optional[float]):
        d = self.decay
        if num_draft > 0:  # plain rounds teach nothing about acceptance: keep what is known
            self.tried = [x * d for x in self.tried]
            self.accepted = [x * d for x in self.accepted]
        for i in range(1, min(num_draft, num_accepted + 1) + 1):  # positions observed this round
            self.tried[i] += 1.0
            self.accepted[i] += 1.0 if i <= num_accepted else 0.0
        if seconds is not None:  # None: the round's time says nothing about T(k)
            k = float(num_draft)
            self.sums = [s * d + x for s, x in zip(self.sums, (1.0, k, k * k, seconds, k * seconds))]
        self.num_rounds += 1
        self.plain_streak = self.plain_streak + 1 if num_draft == 0 else 0

    def acceptance(self) -> List[float]:
        """a_1..a_max_draft; positions with little data lean on the pooled rate."""
        pooled = (sum(self.accepted) + 1.0) / (sum(self.tried) + 2.0)
        return [(self.accepted[i] + 2.0 * pooled) / (self.tried[i] + 2.0) for i in range(1, self.max_draft + 1)]

    def cost(self) -> tuple:
        """(A, B) of T(k) = A + B k, in seconds."""
        w, wk, wkk, wt, wkt = self.sums
        det = w * wkk - wk * wk
        if w > 0 and det > 1e-6 * w * w:
            b = (w * wkt - wk * wt) / det
            a = (wt - b * wk) / w
            if a > 0 and b >= 0:
                return a, b
        mean_k, mean_t = wk / w, wt / w
        a = mean_t / (1.0 + self.cost_ratio * mean_k)
        return a, self.cost_ratio * a

    # --- deciding -------------------------------------------------------------
    def expected_tokens(self, k: int) -> float:
        total, run = 1.0, 1.0
        for a in self.acceptance()[:k]:
            run *= a
            total += run
        return total

    def best(self) -> int:
        a, b = self.cost()
        return max(range(self.max_draft + 1), key=lambda k: (self.expected_tokens(k) / (a + b * k), -k))

    def choose(self) -> int:
        if self.num_rounds == 0:
            return min(self.first_draft, self.max_draft)
        k = self.best()
        if k == 0 and self.plain_streak >= self.probe_every:
            return 1
        return k
