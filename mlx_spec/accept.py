"""Acceptance math for one round: pure functions, in-graph, no models and no I/O.

Notation (Leviathan et al. 2023, Chen et al. 2023): p = main model, q = draft.
"""

import mlx.core as mx


def _leading_true(flags: mx.array) -> mx.array:
    """Number of leading True entries of a 1-d bool array (0 for an empty one)."""
    return mx.cumprod(flags.astype(mx.int32)).sum().astype(mx.int32)


def accept_greedy(draft_tokens: mx.array, main_scores: mx.array) -> tuple[mx.array, mx.array]:
    """Greedy verification.

    draft_tokens: (k,) ids d_1..d_k; main_scores: (k+1, V) main logits (or any
    monotone transform of them) at the k+1 verified positions.
    Accept the longest prefix where d_i = argmax p_i; the next token is the
    argmax of p at the first position not accepted (p_{k+1} if all were).
    Returns (num_accepted, next_token) as 0-d int32 arrays.
    """
    return accept_exact(draft_tokens, mx.argmax(main_scores, axis=-1).astype(mx.int32))


def accept_exact(draft_tokens: mx.array, main_tokens: mx.array) -> tuple[mx.array, mx.array]:
    """Exact-match verification (mlx-lm's rule, for a sampler of unknown settings).

    draft_tokens: (k,) ids d_1..d_k; main_tokens: (k+1,) the main model's own
    token at each verified position (its sampler's draw from p_i, or argmax p_i).
    Accept the longest prefix where d_i = main_tokens_i; the next token is the
    main token at the first position not accepted. Every emitted token is the
    main model's own draw, so the output follows p whatever the draft proposed;
    a position is accepted with probability sum_x p(x) q(x) only.
    Returns (num_accepted, next_token) as 0-d int32 arrays.
    """
    num_draft = draft_tokens.shape[0]
    num_accepted = _leading_true(main_tokens[:num_draft] == draft_tokens)
    return num_accepted, mx.take(main_tokens, num_accepted)


def accept_coupled(draft_tokens: mx.array, main_scores: mx.array, noise: mx.array) -> tuple[mx.array, mx.array]:
    """Coupled sampling (a seeded call; see sampling.CoupledDraws).

    draft_tokens: (k,) ids d_1..d_k; main_scores: (k+1, V) the shaped log-probabilities s_1..s_{k+1};
    noise: (k+1, V) Gumbel noise G_1..G_{k+1} of those positions, the noise the drafts were drawn with.
    The main model's token at position i is argmax(s_i + G_i), a sample of softmax(s_i); accept the longest
    prefix where d_i equals it; the next token is the main model's at the first position not accepted.
    Every emitted token is argmax(s_i + G_i), whatever was drafted: the same seed gives the same text.
    Returns (num_accepted, next_token) as 0-d int32 arrays.
    """
    return accept_exact(draft_tokens, mx.argmax(main_scores + noise, axis=-1).astype(mx.int32))


def accept(
    draft_tokens: mx.array,
    draft_probs: mx.array,
    main_probs: mx.array,
    key: mx.array,
) -> tuple[mx.array, mx.array]:
    """Rejection sampling (speculative sampling).

    draft_tokens: (k,) with d_i ~ q_i; draft_probs: (k, V) = q_1..q_k;
    main_probs: (k+1, V) = p_1..p_{k+1}; key: PRNG key.
    Draft token d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)),
    in order, stopping at the first rejection. At a rejection at position j the
    next token is drawn from normalize(max(0, p_j - q_j)); when all k were
    accepted, from p_{k+1}. The emitted tokens then follow p exactly, and the
    expected acceptance per position is sum_x min(p(x), q(x)).
    Returns (num_accepted, next_token) as 0-d int32 arrays.
    """
    num_draft = draft_tokens.shape[0]
    uniform_key, residual_key = mx.random.split(key)
    rows = mx.arange(num_draft)
    p_x = main_probs[rows, draft_tokens]
    q_x = draft_probs[rows, draft_tokens]
    u = mx.random.uniform(shape=(num_draft,), key=uniform_key)
    num_accepted = _leading_true(u * q_x < p_x)

    # Row k of the residual is p_{k+1} itself: q is padded with a row of zeros.
    q_padded = mx.concatenate([draft_probs, mx.zeros((1, main_probs.shape[-1]))], axis=0)
    residual = mx.take(mx.maximum(main_probs - q_padded, 0.0), num_accepted, axis=0)
    # p == q up to rounding leaves no residual mass: fall back to p itself.
    p_row = mx.take(main_probs, num_accepted, axis=0)
    residual = mx.where(residual.sum() > 1e-9, residual, p_row)
    next_token = mx.random.categorical(mx.log(residual), key=residual_key)
    return num_accepted, next_token.astype(mx.int32)
