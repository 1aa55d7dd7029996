"""The acceptance math alone: greedy prefix matching and rejection sampling."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_spec.accept import accept, accept_exact, accept_greedy


def scores_with_argmax(tokens, vocab=8):
    s = np.zeros((len(tokens), vocab), np.float32)
    s[np.arange(len(tokens)), tokens] = 1.0
    return mx.array(s)


@pytest.mark.parametrize(
    "draft, main_argmax, expected",
    [
        ([3, 1, 2], [3, 1, 0, 5], (2, 0)),  # rejected at the third: main's own token there
        ([3, 1, 2], [3, 1, 2, 5], (3, 5)),  # all accepted: the bonus token from position k+1
        ([3, 1, 2], [4, 1, 2, 5], (0, 4)),  # a later match does not count after a mismatch
        ([], [6], (0, 6)),  # no draft: plain decoding
    ],
)
def test_accept_greedy(draft, main_argmax, expected):
    num_accepted, next_token = accept_greedy(mx.array(draft, mx.int32), scores_with_argmax(main_argmax))
    assert (num_accepted.item(), next_token.item()) == expected


@pytest.mark.parametrize(
    "draft, sampled, expected",
    [
        ([3, 1, 2], [3, 1, 7, 5], (2, 7)),  # the main model's own draw where the draft's differs
        ([3, 1, 2], [3, 1, 2, 5], (3, 5)),
        ([3, 1, 2], [4, 1, 2, 5], (0, 4)),
        ([], [6], (0, 6)),
    ],
)
def test_accept_exact(draft, sampled, expected):
    num_accepted, next_token = accept_exact(mx.array(draft, mx.int32), mx.array(sampled, mx.int32))
    assert (num_accepted.item(), next_token.item()) == expected


def chi_squared(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return (((counts - expected) ** 2)[keep] / expected[keep]).sum(), keep.sum() - 1


# Critical values of chi-squared at p = 0.001
CRITICAL = {3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def run_trials(p, q, num_trials, seed=0):
    """Draw d_i ~ q_i, then accept; returns the first emitted token and num_accepted per trial."""
    key = mx.random.key(seed)
    outs = []
    for _ in range(num_trials):
        key, draft_key, accept_key = mx.random.split(key, 3)
        draft = mx.random.categorical(mx.log(q), key=draft_key).astype(mx.int32)
        num_accepted, next_token = accept(draft, q, p, accept_key)
        first = mx.where(num_accepted > 0, draft[0], next_token)
        outs.append(mx.stack([first, num_accepted]))
    out = np.array(mx.stack(outs))
    return out[:, 0], out[:, 1]


def test_rejection_sampling_follows_p_and_accepts_sum_min():
    rng = np.random.default_rng(0)
    vocab = 6
    p = rng.dirichlet(np.ones(vocab), size=3).astype(np.float32)  # p_1..p_3 (k = 2)
    q = rng.dirichlet(np.ones(vocab), size=2).astype(np.float32)
    q[0, 5] = 0.0  # the draft never proposes token 5 first: only the residual can emit it
    q[0] /= q[0].sum()
    first, num_accepted = run_trials(mx.array(p), mx.array(q), 4000)

    counts = np.bincount(first, minlength=vocab)
    stat, dof = chi_squared(counts, p[0])
    assert stat < CRITICAL[dof], (counts, p[0] * len(first))
    assert counts[5] > 0

    # P(first draft accepted) = sum_x min(p(x), q(x)), far above exact-match's sum_x p(x) q(x)
    theory = np.minimum(p[0], q[0]).sum()
    rate = (num_accepted > 0).mean()
    sigma = np.sqrt(theory * (1 - theory) / len(first))
    assert abs(rate - theory) < 4 * sigma, (rate, theory)
    assert theory > (p[0] * q[0]).sum() + 10 * sigma


def test_chi_squared_detects_a_wrong_distribution():
    """Negative control: emitting the draft's token unconditionally fails the same check."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6)).astype(np.float32)
    q = rng.dirichlet(np.ones(6)).astype(np.float32)
    counts = np.bincount(rng.choice(6, size=4000, p=q / q.sum()), minlength=6)
    stat, dof = chi_squared(counts, p)
    assert stat > CRITICAL[dof]


def test_identical_distributions_accept_everything():
    p = mx.array(np.full((3, 5), 0.2, np.float32))
    q = p[:2]
    _, num_accepted = run_trials(p, q, 200)
    assert (num_accepted == 2).all()


def test_all_accepted_samples_the_bonus_from_the_last_main_row():
    vocab = 4
    q = mx.array(np.eye(vocab, dtype=np.float32)[[1, 2]])  # the draft is sure: 1, then 2
    p = mx.array(np.array([[0, 1, 0, 0], [0, 0, 1, 0], [0.5, 0, 0, 0.5]], np.float32))
    first_tokens = []
    key = mx.random.key(3)
    for _ in range(300):
        key, sub = mx.random.split(key)
        num_accepted, next_token = accept(mx.array([1, 2], mx.int32), q, p, sub)
        assert num_accepted.item() == 2
        first_tokens.append(next_token.item())
    assert set(first_tokens) == {0, 3}
