"""Before each round: choose its source (plain, draft model, MTP layer, lookup) and length for the most tokens per
second.

A round is a `Choice`. PLAIN: the main model decodes one token. DRAFT: the draft model proposes k tokens; MTP: the
main model's own MTP layer chains k steps (mtp.py); LOOKUP: k tokens are copied from what followed an earlier
occurrence of the text's last tokens in the conversation (a `lookup.Match`); either way the main model verifies
them in one pass, which adds a token of its own. MTP is priced as a draft model is (its own `CostLine`, prior slope
`mtp_ratio` + VERIFY_SLOPE plain steps per token: an MTP step reads its layer and the output layer; its own
`RelativeAcceptance`, prior MTP_PRIOR), but never falls behind: the main model's passes feed its cache.
The `Controller` is pure and deterministic: it learns only from what `record` tells it after each round
(source, k, tokens accepted, the round's seconds, the draft's catching up, what an unused match would have
copied). The module is laid out as this text: cost model, acceptance model, what is kept, choice rule.

Cost model, T(k) seconds a round. T0, a plain round: the decayed mean of plain rounds' seconds (none yet: the
intercept of the draft, else lookup, line fitted at its prior slope; nothing at all: 1). Draft rounds T_d(k)
and lookup rounds T_l(k) each have a `CostLine`: a decayed least-squares line A + B k, its slope leaning on a
prior worth SLOPE_PRIOR (draft: B0 = cost_ratio * T0, the draft's bytes over the main model's; lookup:
VERIFY_SLOPE * T0), A at least T0 once a plain round was timed, and a draft token at least MIN_DRAFT_SLOPE * B0.
A verify pass is not linear in its rows, so a length already tried costs what its own rounds took (decayed by
LENGTH_DECAY, the line worth LENGTH_PRIOR rounds); the line prices the lengths not tried (draft: times UNTRIED,
so a length near the best gets a round). No round yet: T0 + prior slope * k. Rounds are timed by the caller
(None: a time that says nothing of k); once a kind of round has a cost, a round counts at most OUTLIER times
its expected seconds (plain: PLAIN_STEPS steps). The draft's cache falls behind while other rounds serve: a
draft round first catches it up, a batched forward timed apart and learnt as seconds per token (prior:
CATCH_UP_PRIOR draft steps); `catch_up_seconds(behind)` prices it.

Acceptance model, E(k) = 1 + sum_{i<=k} a_1...a_i expected tokens from a round of k (1: the main model's own),
a_i = P(draft token i accepted | tokens 1..i-1 were). An `Acceptance` keeps decayed counts per position (a round
observes the positions it accepted and the first it rejected); each a_i leans (2 observations' worth) on the pooled
rate of all positions, which starts from a prior worth 4. The draft model's (`RelativeAcceptance`, prior
DRAFT_PRIOR): a_i = the pooled rate times what position i accepted relative to the pooled rate when it was
observed, the ratio leaning on 1 (RELATIVE_PRIOR), at most MAX_RATE: a new text moves the whole, its profile over
positions stays. Lookup: one absolute `Acceptance` per match-length bucket (`bucket_of`: 1, 2, 3, 4-7, 8+ tokens,
then realigned copies, sure and unsure), priors LOOKUP_PRIORS; a round that had a match but used another source
records what copying would have had accepted (the tokens it emitted are the main model's).

What is learnt is kept (`learnt_for`, in `facts` while the models live): the main model's (`MainFacts`: plain and
lookup rounds, the share of tokens left uncopied) for every call with it, the draft's (`Learnt`) for every call
with the same pair (its cost, acceptance and catching up). Costs carry over whole; acceptance, a fact of the text,
at CARRY of its weight.

Choice rule (`Controller.choose`): plain, at 1 / T0 tokens per second, against each other source's best k, by
E(k) / T(k) (ties: fewer tokens); the fastest wins. Lookup is an option only with a match. Drafting is an option
only where catching up on the `behind` tokens the draft sat out pays back (`catch_up_pays`: less than drafting
saves over plain on the tokens ahead, at most HORIZON, times the share copying leaves to other rounds), and not
while a copy beats plain and catching up costs more than LAZY plain steps. Nothing learnt for the pair yet and
drafting an option: the round drafts `first_draft` tokens; a call's first round proposes at most `first_draft`.
Probes: once `probe_gap` plain rounds (since the last draft round) cost at least four times the catching up, a
plain choice becomes two one-token draft rounds (the first catches the draft up and is not timed, the second is),
and the gap doubles, up to `max_probe_gap`; a draft round chosen on its merits sets it back to `probe_every`.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

from . import facts

PLAIN, DRAFT, LOOKUP, MTP = "plain", "draft", "lookup", "mtp"


class Choice(NamedTuple):
    """A round's plan: where its draft tokens come from and how many (PLAIN: none)."""

    source: str
    num_draft: int
    bucket: int = 0  # LOOKUP: the match-length bucket


# --- cost model: seconds per round -------------------------------------------------------------------------------
SLOPE_PRIOR = 2.0  # weight of the prior slope in a cost line's fit
OUTLIER = 1.5  # a round's seconds count at most this times what its kind of round was expected to take
# A plain round waits for a step queued behind the one before it: when that round found its token ready
# (the pipeline's jitter), this one waits for two steps. So a plain round is an outlier only beyond
# OUTLIER times two steps: clamped at one, their mean came out up to a fifth low on this CPU.
PLAIN_STEPS = 2
LENGTH_PRIOR = 1.0  # rounds' worth of the cost line in the cost of a round length seen before
LENGTH_DECAY = 0.9  # per round of that length: the cost of a length follows the context as it grows
# A draft length never tried is priced at this share of the line, so that one near the best gets a round of
# its own: a line through the lengths tried may overprice one between them (quicksort's 8-row verify costs
# 10 % more than 7 rows, 9 rows 30 %: auto went from 6 to 8 and never tried 7; replay from 8 starts, auto /
# best k +0.9 %). Not for copies, up to 16 long, where trying each costs more rounds than it finds.
UNTRIED = 0.95
# A draft token costs a step of the draft model: its line's slope is at least this share of the prior (the
# draft's bytes over the main model's, times T0). Else a draft round timed at or below a plain step floored
# the line flat at T0, and every length looked as cheap as one (a never-agreeing draft then drafted 10).
MIN_DRAFT_SLOPE = 0.5
VERIFY_SLOPE = 0.1  # prior cost of one more verified row, in plain steps (a lookup round's slope; 0.09 on this CPU)
CATCH_UP_PRIOR = 0.05  # prior seconds per token the draft catches up on, in draft steps (a batched forward)


class Ratio:
    """sum(y) / sum(x) over what was recorded, older records decayed."""

    def __init__(self):
        self.x, self.y = 0.0, 0.0

    @property
    def seen(self) -> bool:
        return self.x > 0

    def record(self, x: float, y: float, decay: float):
        self.x, self.y = self.x * decay + x, self.y * decay + y

    def value(self, prior: float, weight: float = 0.0) -> float:
        """The ratio, leaning on `prior` worth `weight` of x; `prior` while nothing was recorded."""
        return (self.y + weight * prior) / (self.x + weight) if self.x + weight > 0 else prior


class CostLine:
    """Seconds of a round of k > 0 drafts, T(k) = A + B k: a decayed least-squares line, and beside it
    what rounds of each length k took, where seen.

    The line's slope is pulled towards a prior B0 with the weight of SLOPE_PRIOR
    (in rounds times k^2), so that few lengths, or one slow round, cannot tilt it
    far. A verify pass over k+1 rows is not a line in k (a BLAS or GPU kernel
    works in blocks of rows: on this CPU 16 rows cost less than 9), so a length
    seen before is expected to cost what it cost, the line worth LENGTH_PRIOR of
    its rounds; the line prices lengths never tried, times `untried`. No length is
    expected to cost less than `floor + min_slope * k` (a plain step, and a draft
    step per draft token), whatever its rounds measured.
    """

    def __init__(self, decay: float = 0.95, untried: float = 1.0):
        self.decay, self.untried = decay, untried
        self.sums = [0.0] * 5  # decayed sums of w, w k, w k^2, w t, w k t
        self.by_length: dict[int, Ratio] = {}  # k -> seconds per round of k drafts

    @property
    def seen(self) -> bool:
        return self.sums[0] > 0

    def record(self, k: int, seconds: float):
        self.by_length.setdefault(k, Ratio()).record(1.0, seconds, LENGTH_DECAY)
        k = float(k)
        self.sums = [s * self.decay + x for s, x in zip(self.sums, (1.0, k, k * k, seconds, k * seconds))]

    def seconds(self, k: int, slope_prior: float, floor: float = 0.0, min_slope: float = 0.0) -> float:
        """T(k): what rounds of k took, leaning on the line (see `line`) worth LENGTH_PRIOR rounds."""
        a, b = self.line(slope_prior, floor, min_slope)
        seen = self.by_length.get(k)
        estimate = self.untried * (a + b * k) if seen is None else seen.value(a + b * k, LENGTH_PRIOR)
        return max(estimate, floor + min_slope * k)

    def line(self, slope_prior: float, floor: float = 0.0, min_slope: float = 0.0) -> tuple[float, float]:
        """(A, B), given the prior slope B0; A at least `floor`, the line still through the mean round where
        a slope of at least `min_slope` allows."""
        w, wk, wkk, wt, wkt = self.sums
        mean_k, mean_t = wk / w, wt / w
        lam = SLOPE_PRIOR
        b = max((w * (wkt + lam * slope_prior) - wk * wt) / (w * (wkk + lam) - wk * wk), min_slope)
        if mean_t - b * mean_k < floor:  # too steep for what the rounds cost on average
            b = max((mean_t - floor) / mean_k, min_slope)
        return max(mean_t - b * mean_k, floor), b


# --- acceptance model: expected tokens per round -----------------------------------------------------------------
MAX_POSITIONS = 32  # positions whose acceptance is tracked (the longest round drafts SLACK tokens)
# Exact lookup matches are bucketed by length (1, 2, 3, 4-7, 8+ tokens): a longer match is a surer copy.
# A copy realigned after a swapped token (lookup.Match.realigned) has two buckets of its own, the last: where
# at least REALIGNED_SURE of the last 8 tokens agree with its source, and where fewer do (text that only
# shares a few tokens with an earlier passage, not an edited copy of it: its next token is rarely the copy's).
MATCH_BUCKETS = (1, 2, 3, 4, 8)
REALIGNED_SURE = 5
LOOKUP_PRIORS = (0.2, 0.4, 0.6, 0.8, 0.9, 0.8, 0.15)  # prior acceptance of each bucket (tuned with replay.py)
# The draft's prior acceptance, worth 4 rounds. Erring high is cheap: a round that drafted too far sees
# its rejection at once, while one that drafted too little was all accepted and never sees how much
# further it could have gone (replay, 128 tokens, fresh: quicksort 0.92 of the best k at 0.8, 0.99 here).
DRAFT_PRIOR = 0.85
MTP_PRIOR = 0.75  # the MTP layer's prior acceptance (MTPLX and vLLM report 0.6-0.9 per depth on Qwen3.5/3-Next)
RELATIVE_PRIOR = 8.0  # observations' worth of "as the pooled rate" in the draft's rate at a position
MAX_RATE = 0.99  # the most a position's acceptance is expected to be


def bucket_of(match) -> int:
    """The acceptance bucket of a lookup.Match."""
    if match.realigned:
        return len(MATCH_BUCKETS) + (match.length < REALIGNED_SURE)
    return sum(match.length >= b for b in MATCH_BUCKETS) - 1


class Acceptance:
    """a_i = P(draft token i accepted | tokens 1..i-1 accepted), per position, from decayed counts.

    Positions with few observations lean on the pooled rate of all positions,
    which itself starts from `prior` worth `prior_rounds` observations, so one
    unlucky first round does not stop drafting for long. Counts decay by
    `decay` per round of this source (recent rounds weigh more).
    """

    def __init__(self, prior: float, prior_rounds: float = 4.0, decay: float = 0.95):
        self.prior, self.prior_rounds, self.decay = prior, prior_rounds, decay
        self.tried = [0.0] * (MAX_POSITIONS + 1)  # decayed trials at position i (index 1..MAX_POSITIONS)
        self.accepted = [0.0] * (MAX_POSITIONS + 1)

    def weigh(self, factor: float):
        """Scale what was learnt to `factor` of its weight (its rates stay, but for the prior's larger say)."""
        self.tried = [x * factor for x in self.tried]
        self.accepted = [x * factor for x in self.accepted]

    @staticmethod
    def observed(num_draft: int, num_accepted: int) -> range:
        """The positions a round observed: those accepted and the first rejected, if any."""
        return range(1, min(num_draft, num_accepted + 1) + 1)

    def record(self, num_draft: int, num_accepted: int):
        self.weigh(self.decay)
        for i in self.observed(num_draft, num_accepted):
            self.tried[i] += 1.0
            self.accepted[i] += 1.0 if i <= num_accepted else 0.0

    def pooled(self) -> float:
        """The rate of all positions together, from `prior` worth `prior_rounds` observations."""
        return (sum(self.accepted) + self.prior_rounds * self.prior) / (sum(self.tried) + self.prior_rounds)

    def rates(self, k: int) -> list[float]:
        """a_1..a_k."""
        pooled = self.pooled()
        return [(self.accepted[i] + 2.0 * pooled) / (self.tried[i] + 2.0) for i in range(1, k + 1)]

    def expected_tokens(self, max_k: int) -> list[float]:
        """E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j for k = 0..max_k."""
        out, run = [1.0], 1.0
        for a in self.rates(max_k):
            run *= a
            out.append(out[-1] + run)
        return out


class RelativeAcceptance(Acceptance):
    """The draft model's a_i: the pooled rate times what position i accepts relative to it.

    A text's acceptance moves as a whole (code after prose, the next call), its
    profile over positions much less. Each observation of position i is set
    against the pooled rate at that time; a_i = pooled * (accepted_i /
    expected_i), the ratio leaning on 1 with RELATIVE_PRIOR observations. So a
    position the controller has not drafted to of late follows the pooled rate,
    which every round observes, instead of keeping a rate from other text: with
    absolute rates, quicksort after a story drafted one token a round, all
    accepted, for 20 rounds, since positions 2+ kept the story's rates.
    """

    def __init__(self, prior: float, prior_rounds: float = 4.0, decay: float = 0.95):
        super().__init__(prior, prior_rounds, decay)
        self.expected = [0.0] * (MAX_POSITIONS + 1)  # decayed sums of the pooled rate when position i was observed

    def weigh(self, factor: float):
        super().weigh(factor)
        self.expected = [x * factor for x in self.expected]

    def record(self, num_draft: int, num_accepted: int):
        pooled = self.pooled()
        super().record(num_draft, num_accepted)
        for i in self.observed(num_draft, num_accepted):
            self.expected[i] += pooled

    def rates(self, k: int) -> list[float]:
        p, w = self.pooled(), RELATIVE_PRIOR
        return [min(p * (self.accepted[i] + w * p) / (self.expected[i] + w * p), MAX_RATE) for i in range(1, k + 1)]


# --- what is learnt, kept for the next call ----------------------------------------------------------------------
CARRY = 0.3  # weight of acceptance learnt in earlier calls, at a call's start


@dataclass
class MainFacts:
    """What the controller knows of a main model, whatever the draft: plain and lookup rounds."""

    plain: Ratio = field(default_factory=Ratio)  # seconds per plain round
    lookup_cost: CostLine = field(default_factory=CostLine)
    lookup: list = field(default_factory=lambda: [Acceptance(p) for p in LOOKUP_PRIORS])  # per match bucket
    uncopied: Ratio = field(default_factory=Ratio)  # share of the tokens emitted by rounds that copied none


@dataclass
class Learnt:
    """What the controller knows of one (main, draft) pair; it carries over to the next call."""

    main: MainFacts = field(default_factory=MainFacts)
    draft_cost: CostLine = field(default_factory=lambda: CostLine(untried=UNTRIED))
    draft: RelativeAcceptance = field(default_factory=lambda: RelativeAcceptance(DRAFT_PRIOR))
    catch_up: Ratio = field(default_factory=Ratio)  # the draft's seconds per token caught up on
    # the main model's own MTP layer (mtp.py), a draft source of its own: it never falls behind
    mtp_cost: CostLine = field(default_factory=lambda: CostLine(untried=UNTRIED))
    mtp: RelativeAcceptance = field(default_factory=lambda: RelativeAcceptance(MTP_PRIOR))
    num_rounds: int = 0


_store = None  # where the controller learns: None the process's own store, (name,) that of kept_apart(name)


@contextmanager
def kept_apart(name):
    """Within: the controller learns into, and from, a store of `name`'s own, as if in a process of its own
    (the benchmark runs each variant so: the first variant on a new prompt does not learn for the others)."""
    global _store
    outer = _store
    _store = (name,)
    try:
        yield
    finally:
        _store = outer


def learnt_for(main_model, draft_model) -> Learnt:
    """The process's store for this pair (its main model's facts shared with every other pair), dropped
    with either model (see `facts`)."""
    pair = facts.pair(main_model, draft_model)
    if _store not in pair.learnt:
        main_facts = facts.of(main_model).main_facts
        pair.learnt[_store] = Learnt(main_facts.setdefault(_store, MainFacts()))
    return pair.learnt[_store]


# --- choice rule -------------------------------------------------------------------------------------------------
LAZY = 3.0  # plain steps' worth of catching up that the draft puts off while a copy beats plain decoding
HORIZON = 512  # the most tokens ahead that a draft catching up on a backlog is expected to serve
UNCOPIED_PRIOR = (0.5, 8.0)  # prior share of tokens not copied from the conversation, worth 8 tokens


class Controller:
    """Adaptive source and length of each round: `choose` before it, `record` after it (the module docstring
    tells how).

    `learnt`: what earlier calls learnt (`learnt_for`), else a fresh `Learnt`; `max_draft`, `max_lookup`: the
    most tokens a draft or lookup round proposes (`has_draft` False: no draft rounds); `cost_ratio`: a draft
    step's prior cost in plain steps (the draft's bytes over the main model's); `decay`: per round, of plain
    rounds' seconds, catching up and the uncopied share; `probe_every`, `max_probe_gap`: plain rounds before the
    first probe, and the most between probes; `first_draft`: the most tokens a call's first round proposes (the
    first token waits for the whole round), and what a round drafts while nothing is learnt.
    """

    def __init__(
        self,
        learnt: Learnt | None = None,
        max_draft: int = 10,
        max_lookup: int = 16,
        has_draft: bool = True,
        cost_ratio: float = 0.3,
        decay: float = 0.95,
        probe_every: int = 4,
        max_probe_gap: int = 64,
        first_draft: int = 3,
        max_mtp: int = 0,
        mtp_ratio: float = 0.05,
    ):
        self.learnt = learnt if learnt is not None else Learnt()
        self.max_draft = max_draft if has_draft else 0
        self.max_lookup = max_lookup
        self.cost_ratio = cost_ratio
        self.decay = decay
        self.probe_every = probe_every
        self.max_probe_gap = max_probe_gap
        self.first_draft = first_draft
        self.max_mtp, self.mtp_ratio = max_mtp, mtp_ratio
        self.fresh = self.learnt.num_rounds == 0  # nothing known yet: the first round drafts first_draft
        self.first_round = True  # of this call
        self.plain_streak = 0
        self.probe_gap = probe_every
        self.probe_left = 0
        if not self.fresh:  # a new call's text: what was accepted before is a prior the call soon outweighs
            for acceptance in (self.learnt.draft, self.learnt.mtp, *self.learnt.main.lookup):
                acceptance.weigh(CARRY)

    # --- cost model -------------------------------------------------------------------
    def plain_seconds(self) -> float:
        learnt = self.learnt
        if learnt.main.plain.seen:
            return learnt.main.plain.value(1.0)
        lines = (
            (learnt.draft_cost, self.cost_ratio),
            (learnt.mtp_cost, self.mtp_ratio),
            (learnt.main.lookup_cost, VERIFY_SLOPE),
        )
        for line, prior in lines:
            if line.seen:  # T0 unseen: taken as A of a line whose slope leans on a prior relative to it
                w, wk, _, wt, _ = line.sums
                t0 = (wt / w) / (1.0 + prior * wk / w)  # the mean round's seconds at the prior slope
                return line.line(prior * t0)[0] or t0  # a line through the origin or below: the prior's
        return 1.0

    def round_seconds(self, source: str, k: int) -> float:
        t0 = self.plain_seconds()
        if source == PLAIN or k == 0:
            return t0
        learnt = self.learnt
        line, prior, min_share = {
            DRAFT: (learnt.draft_cost, self.cost_ratio, MIN_DRAFT_SLOPE),
            MTP: (learnt.mtp_cost, self.mtp_ratio + VERIFY_SLOPE, MIN_DRAFT_SLOPE),  # an MTP step and a row
            LOOKUP: (learnt.main.lookup_cost, VERIFY_SLOPE, 0.0),  # rows of a verify pass may come almost free
        }[source]
        if not line.seen:
            return t0 + prior * t0 * k
        floor = t0 if learnt.main.plain.seen else 0.0  # the line's: no verify beats a plain step
        return line.seconds(k, prior * t0, floor, min_share * prior * t0)

    def catch_up_seconds(self, behind: int) -> float:
        """Seconds the draft takes to catch up on `behind` tokens it has not seen (the last one included,
        which goes in with the first draft step in any case): a batched forward, learnt, first a prior."""
        per_token = self.learnt.catch_up.value(CATCH_UP_PRIOR * self.cost_ratio * self.plain_seconds())
        return max(behind - 1, 0) * per_token

    # --- learning: both models, from each round ---------------------------------------
    def record(self, choice: Choice, num_accepted: int, seconds: float | None, catch_up=None, unused=None):
        """Learn from a round; `catch_up`: (tokens, seconds) the draft spent catching up in it, not in `seconds`;
        `unused`: (match, n, m) where the round had a lookup match and used another source: of the n tokens
        it emitted, the first m are those the match's copy would have proposed. Those tokens are the main
        model's, so a copy of them would have been accepted: m of n (m < n: and the next rejected) is what
        the copy's round would have seen, greedy; above temperature 0 a sample of it, with its odds."""
        learnt, main, d = self.learnt, self.learnt.main, self.decay
        source, k = choice.source, choice.num_draft
        if source == DRAFT:
            learnt.draft.record(k, num_accepted)
        elif source == MTP:
            learnt.mtp.record(k, num_accepted)
        elif source == LOOKUP:
            main.lookup[choice.bucket].record(k, num_accepted)
        if unused is not None:
            match, emitted, copied = unused
            main.lookup[bucket_of(match)].record(emitted, copied)
        self.record_cost(choice, seconds, catch_up)
        if self.max_lookup > 0:  # how much of the text copying leaves to other rounds, where it may copy
            emitted = num_accepted + 1
            main.uncopied.record(emitted, 0 if source == LOOKUP and num_accepted > 0 else emitted, d)
        learnt.num_rounds += 1
        self.fresh = self.first_round = False
        self.plain_streak = self.plain_streak + 1 if source == PLAIN else 0 if source == DRAFT else self.plain_streak

    def record_cost(self, choice: Choice, seconds: float | None, catch_up=None):
        """Learn what a round cost (see `record`); apart from its tokens where the seconds come later."""
        learnt, main, d = self.learnt, self.learnt.main, self.decay
        source, k = choice.source, choice.num_draft
        if catch_up is not None:
            learnt.catch_up.record(*catch_up, d)
        if seconds is not None:  # None: the round's time says nothing about T(k)
            if self._cost_seen(source):  # one slow round must not rule for long
                steps = PLAIN_STEPS if source == PLAIN else 1
                seconds = min(seconds, OUTLIER * steps * self.round_seconds(source, k))
            if source == PLAIN:
                main.plain.record(1.0, seconds, d)
            else:
                {DRAFT: learnt.draft_cost, MTP: learnt.mtp_cost, LOOKUP: main.lookup_cost}[source].record(k, seconds)

    def _cost_seen(self, source: str) -> bool:
        learnt, main = self.learnt, self.learnt.main
        lines = {PLAIN: main.plain, DRAFT: learnt.draft_cost, MTP: learnt.mtp_cost, LOOKUP: main.lookup_cost}
        return lines[source].seen

    # --- choice rule ------------------------------------------------------------------
    def best(self, source: str, max_k: int, bucket: int = 0) -> tuple[float, int]:
        """(tokens per second, k) of the best length of `source`."""
        acceptance = {DRAFT: self.learnt.draft, MTP: self.learnt.mtp}.get(source) or self.learnt.main.lookup[bucket]
        expected = acceptance.expected_tokens(max_k)
        rate, k = max((expected[k] / self.round_seconds(source, k), -k) for k in range(1, max_k + 1))
        return rate, -k

    def catch_up_pays(self, draft_rate: float, behind: int, left: int | None) -> bool:
        """Whether drafting at `draft_rate` tokens per second pays back the draft's catching up: what it
        saves over plain decoding on the tokens ahead (up to HORIZON) that copying has not been serving."""
        if behind <= 1:
            return True
        ahead = min(left if left is not None else HORIZON, HORIZON) * self.learnt.main.uncopied.value(*UNCOPIED_PRIOR)
        return self.catch_up_seconds(behind) < ahead * (self.plain_seconds() - 1.0 / draft_rate)

    def choose(self, match=None, behind: int = 1, left: int | None = None) -> Choice:
        """The next round's plan; `match`: the conversation's lookup match (lookup.Match) or None; `behind`:
        tokens the draft model has not seen (the last one included); `left`: tokens still to emit."""
        choice = self._choose(match, behind, left)
        if self.first_round and choice.num_draft > self.first_draft:
            return choice._replace(num_draft=self.first_draft)
        return choice

    def keeps_plain(self, match=None, behind: int = 1, left: int | None = None) -> bool:
        """Whether `choose` would decode plainly now; learns and changes nothing (a plain round asks it
        whether to queue the next step before its own token is read)."""
        probing = self.probe_left, self.probe_gap
        plain = self.choose(match, behind, left).source == PLAIN
        self.probe_left, self.probe_gap = probing
        return plain

    def _choose(self, match, behind: int, left: int | None) -> Choice:
        bucket = None if match is None or self.max_lookup == 0 else bucket_of(match)
        lookup = None if bucket is None else self.best(LOOKUP, self.max_lookup, bucket)  # (tokens per second, k)
        draft = None  # the same of the best draft length, where drafting pays its catching up
        if self.max_draft > 0:
            draft = self.best(DRAFT, self.max_draft)
            copying = lookup is not None and lookup[0] > 1.0 / self.plain_seconds()
            waits = copying and self.catch_up_seconds(behind) > LAZY * self.plain_seconds()
            draft = draft if not waits and self.catch_up_pays(draft[0], behind, left) else None
        if self.fresh and draft is not None:
            return Choice(DRAFT, min(self.first_draft, self.max_draft))
        if self.probe_left > 0:
            self.probe_left -= 1
            return Choice(DRAFT, 1)
        options = [(1.0 / self.plain_seconds(), Choice(PLAIN, 0))]
        if draft is not None:
            options.append((draft[0], Choice(DRAFT, draft[1])))
        if self.max_mtp > 0:
            rate, k = self.best(MTP, self.max_mtp)
            options.append((rate, Choice(MTP, k)))
        if lookup is not None:
            options.append((lookup[0], Choice(LOOKUP, lookup[1], bucket)))
        choice = max(options, key=lambda o: (o[0], -o[1].num_draft))[1]
        if choice.source == DRAFT:
            self.probe_gap = self.probe_every
        elif (
            choice.source == PLAIN
            and self.max_draft > 0
            and self.plain_streak >= self.probe_gap
            # a probe spends on catching up at most a quarter of the plain stretch before it
            and self.catch_up_seconds(behind) <= self.plain_seconds() * self.plain_streak / 4
        ):
            self.probe_gap = min(2 * self.probe_gap, self.max_probe_gap)
            self.probe_left = 1  # the first round catches the draft up on skipped tokens; the second is timed
            return Choice(DRAFT, 1)
        return choice
