"""Before each round: choose the draft length k (0 = plain decoding) that maximises expected tokens per second.

Pure and deterministic: it learns only from what `record` tells it after each
round (draft length, tokens accepted, seconds the round took).
"""

SLOPE_PRIOR = 2.0  # weight of the prior slope in the cost line's fit
OUTLIER = 1.5  # a round's seconds count at most this times what its kind of round was expected to take


class DraftController:
    """Adaptive draft length.

    Acceptance: a_i = P(draft token i accepted | tokens 1..i-1 accepted), per
    position, from counts decayed by each drafting round (recent rounds weigh
    more). Positions with few observations lean on the pooled rate of all
    positions, which itself starts from `prior_acceptance` worth `prior_rounds`
    observations, so one unlucky first round does not stop drafting for long.
    Expected tokens of a round with k drafts: E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j.
    Cost: plain rounds T(0) and drafting rounds T(k) = A + B k are learnt apart
    (a verify pass over k+1 tokens is not a plain step plus k cheap rows), from
    a decayed average and a decayed least-squares line whose slope leans on the
    prior B = T(0) * cost_ratio (e.g. the draft's bytes over the main model's)
    until several draft lengths were seen; until a plain round was seen,
    T(0) = A. A round slower than 1.5x its expectation counts as 1.5x.
    Choice: argmax over k in 0..max_draft of E(k) / T(k). While plain decoding
    wins, two one-token rounds probe after `probe_every` plain rounds (the
    first catches the draft up on the skipped tokens and is not timed, the
    second is); each probe that does not bring drafting back doubles the gap
    (up to `max_probe_gap`), so a pair whose draft never agrees costs little,
    and code after prose is still caught.
    """

    def __init__(
        self,
        max_draft: int = 10,
        cost_ratio: float = 0.3,
        decay: float = 0.95,
        probe_every: int = 4,
        max_probe_gap: int = 64,
        first_draft: int = 3,
        prior_acceptance: float = 0.8,
        prior_rounds: float = 4.0,
    ):
        self.max_draft = max_draft
        self.cost_ratio = cost_ratio
        self.decay = decay
        self.probe_every = probe_every
        self.max_probe_gap = max_probe_gap
        self.first_draft = first_draft
        self.prior_acceptance = prior_acceptance
        self.prior_rounds = prior_rounds
        self.tried = [0.0] * (max_draft + 1)  # decayed trials at position i (index 1..max_draft)
        self.accepted = [0.0] * (max_draft + 1)
        self.plain = [0.0, 0.0]  # decayed sums over plain rounds of w, w t
        self.sums = [0.0] * 5  # decayed sums over drafting rounds of w, w k, w k^2, w t, w k t
        self.num_rounds = 0
        self.plain_streak = 0
        self.probe_gap = probe_every
        self.probe_left = 0

    # --- learning -------------------------------------------------------------
    def record(self, num_draft: int, num_accepted: int, seconds: float | None):
        d = self.decay
        if num_draft > 0:  # plain rounds teach nothing about acceptance: keep what is known
            self.tried = [x * d for x in self.tried]
            self.accepted = [x * d for x in self.accepted]
        for i in range(1, min(num_draft, num_accepted + 1) + 1):  # positions observed this round
            self.tried[i] += 1.0
            self.accepted[i] += 1.0 if i <= num_accepted else 0.0
        if seconds is not None:  # None: the round's time says nothing about T(k)
            if (self.plain if num_draft == 0 else self.sums)[0] > 0:  # one slow round must not rule for long
                seconds = min(seconds, OUTLIER * self.round_seconds(num_draft))
            if num_draft == 0:
                self.plain = [s * d + x for s, x in zip(self.plain, (1.0, seconds))]
            else:
                k = float(num_draft)
                self.sums = [s * d + x for s, x in zip(self.sums, (1.0, k, k * k, seconds, k * seconds))]
        self.num_rounds += 1
        self.plain_streak = self.plain_streak + 1 if num_draft == 0 else 0

    def acceptance(self) -> list[float]:
        """a_1..a_max_draft."""
        n0 = self.prior_rounds
        pooled = (sum(self.accepted) + n0 * self.prior_acceptance) / (sum(self.tried) + n0)
        return [(self.accepted[i] + 2.0 * pooled) / (self.tried[i] + 2.0) for i in range(1, self.max_draft + 1)]

    def cost(self) -> tuple[float, float, float]:
        """(T0, A, B): seconds of a plain round, and T(k) = A + B k of a drafting round.

        The line is a least-squares fit whose slope is pulled towards the prior
        B0 = T0 * cost_ratio with the weight of `SLOPE_PRIOR` (in rounds times k^2),
        so that few draft lengths, or one slow round, cannot tilt it far.
        """
        w, wk, wkk, wt, wkt = self.sums
        t0 = self.plain[1] / self.plain[0] if self.plain[0] > 0 else None
        if w == 0:  # no timed drafting round yet
            t0 = 1.0 if t0 is None else t0
            return t0, t0, self.cost_ratio * t0
        mean_k, mean_t = wk / w, wt / w
        b0 = self.cost_ratio * (mean_t / (1.0 + self.cost_ratio * mean_k) if t0 is None else t0)
        lam = SLOPE_PRIOR
        b = max((w * (wkt + lam * b0) - wk * wt) / (w * (wkk + lam) - wk * wk), 0.0)
        a = max(mean_t - b * mean_k, 0.0)
        return (a if t0 is None else t0), a, b

    def round_seconds(self, k: int) -> float:
        t0, a, b = self.cost()
        return t0 if k == 0 else a + b * k

    # --- deciding -------------------------------------------------------------
    def expected_tokens(self, k: int) -> float:
        total, run = 1.0, 1.0
        for a in self.acceptance()[:k]:
            run *= a
            total += run
        return total

    def best(self) -> int:
        return max(range(self.max_draft + 1), key=lambda k: (self.expected_tokens(k) / self.round_seconds(k), -k))

    def choose(self) -> int:
        if self.num_rounds == 0:
            return min(self.first_draft, self.max_draft)
        if self.probe_left > 0:
            self.probe_left -= 1
            return 1
        k = self.best()
        if k > 0:
            self.probe_gap = self.probe_every
        elif self.plain_streak >= self.probe_gap:
            self.probe_gap = min(2 * self.probe_gap, self.max_probe_gap)
            self.probe_left = 1  # the first round catches the draft up on skipped tokens; the second is timed
            return 1
        return k
