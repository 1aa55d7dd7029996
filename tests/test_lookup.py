"""Prompt lookup: the n-gram index alone, then drafting from the conversation inside the engine."""

import importlib

import mlx.core as mx
import numpy as np
import pytest
from test_accept import CRITICAL, chi_squared
from tiny import make_model, perturbed, reference, repetitive, spec, toy_tokenizer

from mlx_spec import GenerationStats, make_prompt_cache, speculative_generate_step, stream_generate, verify
from mlx_spec.adaptive import kept_apart
from mlx_spec.lookup import MAX_MATCH, LookupSource, Match, NgramIndex, index_for

# --- the index ------------------------------------------------------------------------------------


def indexed(tokens, **kwargs):
    index = NgramIndex(**kwargs)
    index.sync(tokens)
    return index


def test_finds_the_longest_suffix_at_its_most_recent_occurrence():
    #            0  1  2  3  4  5  6  7  8  9 10 11
    index = indexed([5, 6, 7, 8, 1, 6, 7, 9, 2, 5, 6, 7])
    assert index.match() == Match(start=3, length=3)  # "5 6 7" was followed by 8; "6 7" more recently by 9
    assert index.continuation(index.match(), 4) == [8, 1, 6, 7]
    assert indexed([1, 2, 3, 4]).match() is None
    assert indexed([3, 9, 4, 9]).match() == Match(start=2, length=1)


def test_a_match_is_measured_back_beyond_the_longest_n_gram():
    text = list(range(10, 30))
    index = indexed(text + [1] + text)
    assert index.match() == Match(start=len(text), length=MAX_MATCH)


def test_the_continuation_repeats_itself_past_the_end_of_the_conversation():
    index = indexed([4, 1, 2, 3, 1, 2, 3, 1, 2])
    match = index.match()
    assert match.start == 6  # "3 1 2" last followed by 3 at position 6
    assert index.continuation(match, 7) == [3, 1, 2, 3, 1, 2, 3]


def test_a_copy_resumes_after_a_swapped_token():
    """A reply copying earlier text with one token swapped (a renamed identifier): the copy cursor
    resumes right after the swapped token, where no n-gram of the reply's last tokens occurred."""
    source = list(range(100, 140))
    index = indexed(source + [7] + source[:20])
    assert index.match() == Match(start=20, length=MAX_MATCH)  # copying, exactly
    index.extend([99])  # the reply's own token where the source has 120
    match = index.match()
    assert match == Match(start=21, length=7, realigned=True)  # 7 of the last 8 agree with the source
    assert index.continuation(match, 3) == [121, 122, 123]
    index.extend([121, 122])  # the copy goes on, still judged by its alignment while the swap is in view
    assert index.match() == Match(start=23, length=8, realigned=True)  # 99 for 120 is a swap now: 8 of 8
    index.extend(source[23:30])
    assert index.match() == Match(start=30, length=9)  # exact again once the swap is 9 tokens back
    index.extend([98, 97])  # two tokens in a row that are not the source's: the reply stopped copying
    assert index.cursor is None and index.match() is None


def test_a_swap_is_copied_wherever_the_source_has_the_swapped_token():
    """An edit that renames throughout: once the reply put 99 where its source has 120 and copied on, later
    copies propose 99 wherever the source has 120, until the reply keeps a 120 of the source."""
    source = [100, 101, 120, 102, 103, 104, 105, 106, 107, 120, 108, 109, 110, 111, 112, 113, 114, 120, 115]
    index = indexed(source + [7] + source[:2])
    assert index.match() == Match(start=2, length=2)
    index.extend([99])  # the reply's own token where the source has 120
    assert index.continuation(index.match(), 3) == [102, 103, 104]
    index.extend(source[3:9])  # copied on: a swap
    assert index.swaps == {120: 99}
    match = index.match()
    assert match == Match(start=9, length=8, realigned=True)  # 7 equal, and the swapped token
    assert index.continuation(match, 4) == [99, 108, 109, 110]  # the source's second 120, swapped
    index.extend([99, *source[10:17], 120])  # the reply keeps the third 120: not a swap there
    assert index.swaps == {} and index.continuation(index.match(), 1) == [115]


def test_two_tokens_in_a_row_off_the_source_are_no_swap():
    source = list(range(100, 140))
    index = indexed(source + [7] + source[:20])
    index.extend([98, 97, *source[22:30]])  # the reply left its source, then met it again
    assert index.swaps == {} and index.match() == Match(start=30, length=8)
    index.extend([96])  # a swap learnt ...
    index.extend(source[31:33])
    assert index.swaps == {130: 96}
    index.sync(index.tokens[:-5])  # ... is forgotten with the tokens it was learnt from
    assert index.swaps == {} and index.cursor is None


def test_extend_equals_indexing_at_once():
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 5, 300)]
    grown = NgramIndex()
    for i in range(0, 300, 7):
        grown.extend(tokens[i : i + 7])
        at_once = indexed(tokens[: i + 7])
        assert (grown.last, grown.previous) == (at_once.last, at_once.previous)
        grown.match()  # moves the copy cursor, which learns swaps: the tables do not depend on it


def test_tokens_cut_back_or_changed_are_forgotten_exactly():
    index = indexed([1, 2, 3, 4, 5, 1, 2, 3, 9, 9, 1, 2, 3])
    assert index.continuation(index.match(), 1) == [9]
    index.sync([1, 2, 3, 4, 5, 1, 2, 3])  # the conversation was cut back (an early stop, a new turn)
    assert index.match() == Match(start=3, length=3)  # "1 2 3" -> 9 forgotten, "1 2 3" -> 4 restored
    index.sync([1, 2, 3, 4, 7, 7, 1, 2, 3])  # changed in the middle: re-indexed from there
    assert index.tokens == [1, 2, 3, 4, 7, 7, 1, 2, 3]
    assert index.continuation(index.match(), 2) == [4, 7]
    assert index.last == indexed([1, 2, 3, 4, 7, 7, 1, 2, 3]).last
    index.sync([8, 8])  # a new conversation in the same caches
    assert index.tokens == [8, 8] and index.match() == Match(start=1, length=1)


def test_memory_is_bounded():
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, 1000, 5000)]
    index = indexed(tokens, max_entries=100)
    assert all(len(table) <= 100 for table in index.last)
    index.extend([tokens[-3], tokens[-2]])  # the most recent n-grams are kept
    assert index.match() is not None


def test_a_round_costs_the_same_at_32k_tokens():
    """Work per round (tokens touched: the round's new tokens indexed, one look-up) does not grow with the
    conversation: 200 rounds over a 32k-token conversation touch as many tokens as over a 100-token one."""
    rng = np.random.default_rng(2)

    def work_per_round(num_tokens):
        index = indexed([int(t) for t in rng.integers(0, 50, num_tokens)])
        index.work = 0
        for _ in range(200):
            match = index.match()
            proposal = index.continuation(match, 8) if match else []
            index.extend(proposal[:3] + [int(rng.integers(0, 50))])  # 3 accepted + the main model's token
        return index.work / 200

    small, large = work_per_round(100), work_per_round(32768)
    assert large <= 1.2 * small and large < 60


def test_the_index_lives_with_its_caches():
    main = make_model("llama", layers=1)
    cache = make_prompt_cache(main)
    cache.tokens.extend([1, 2, 3, 1, 2])
    index = index_for(cache)
    assert index_for(cache) is index and index.match() == Match(start=2, length=2)
    cache.truncate(3)
    assert index_for(cache).tokens == [1, 2, 3]


def test_a_round_that_did_not_copy_counts_the_tokens_a_copy_would_have_proposed():
    cache = make_prompt_cache(make_model("llama", layers=1))
    cache.tokens.extend([1, 2, 3, 4, 5, 1, 2])
    source = LookupSource(cache, 100, without_q=True)
    assert source.match() == Match(start=2, length=2)  # the copy: 3, 4, 5, 1, 2, 3, ...
    assert [source.copied(t) for t in ([3, 4, 9], [3, 4, 5], [7], [3, 4, 5, 1, 2, 3])] == [2, 3, 0, 6]


# --- inside the engine ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def copier():
    """A main model whose text repeats, and a draft that agrees with it often."""
    main = repetitive(make_model("llama", layers=2))
    return main, perturbed(main, 0.01)


PROMPT = [1, 5, 9, 22, 3, 17, 40]


@pytest.mark.parametrize("with_draft", [False, True])
@pytest.mark.parametrize("k", ["auto", 2, 6])
def test_greedy_is_exact_and_copies(copier, with_draft, k):
    main, draft = copier
    expected = reference(main, PROMPT, 120)
    stats = GenerationStats()
    got = spec(PROMPT, main, draft if with_draft else None, num_draft_tokens=k, max_tokens=120, stats=stats)
    assert got == expected
    assert 0 < stats.lookup_accepted_tokens < stats.lookup_draft_tokens  # copies accepted and rejected


@pytest.mark.parametrize(
    "arch, options",
    [
        ("llama", {}),
        ("qwen2", dict(max_kv_size=16)),
        ("qwen2", dict(kv_bits=4, kv_group_size=32, quantized_kv_start=20)),
        ("qwen2", dict(logits_processors="repetition")),
        ("gemma3_text", {}),
    ],
    ids=["standard", "rotating", "quantized", "processors", "sliding-window"],
)
@pytest.mark.parametrize("with_draft", [False, True])
def test_greedy_is_exact_with_every_cache_kind(arch, options, with_draft):
    from mlx_lm.sample_utils import make_logits_processors

    main = repetitive(make_model(arch, layers=4, hidden=128), 0.0 if arch == "gemma3_text" else 0.01)
    draft = perturbed(main, 0.01) if with_draft else None
    kw = dict(options)
    if kw.get("logits_processors"):
        kw["logits_processors"] = make_logits_processors(repetition_penalty=1.2)  # 1.5: no copy is accepted
    prompt = [(7 * i + 3) % 90 + 3 for i in range(20)]
    expected = reference(main, prompt, 160, **kw)
    stats = GenerationStats()
    cache = make_prompt_cache(main, draft, max_kv_size=kw.get("max_kv_size"))
    # a fixed length copies wherever the conversation has a match, whatever a round costs on tiny models
    got = spec(prompt, main, draft, num_draft_tokens=4, max_tokens=160, stats=stats, prompt_cache=cache, **kw)
    assert got == expected
    assert stats.lookup_accepted_tokens > 0
    if "max_kv_size" in kw:
        assert len(cache.tokens) > 10 * kw["max_kv_size"]  # long after the wrap
    # auto: copies, and between them plain rounds (each queued behind the one before) or drafts; which of
    # them, the timing of rounds on tiny models decides (the sliding-window model copies nearly all of it)
    stats = GenerationStats()
    assert spec(prompt, main, draft, max_tokens=160, stats=stats, **kw) == expected
    assert stats.rounds_by_source["lookup"] > 0 and len(stats.rounds_by_source) > 1


@pytest.mark.parametrize("cut", [True, False])
def test_the_draft_reads_the_prompt_when_a_round_first_drafts(copier, monkeypatch, cut):
    """With lookup on, the first token does not wait for the draft to read the prompt: a one-token reply
    leaves the draft cache empty. Lookup off, neither where the prompt's pass gives the first token (the
    output layer cut to its last row); else the draft reads it before the first round, as before."""
    main, draft = copier
    if not cut:
        monkeypatch.setattr(verify, "HEADED_TYPES", ())
    prompt = [(7 * i + 3) % 90 + 3 for i in range(200)]
    for lookup, read in ((True, 0), (False, 0 if cut else len(prompt) - 1)):
        cache = make_prompt_cache(main, draft)
        assert spec(prompt, main, draft, max_tokens=1, prompt_cache=cache, prompt_lookup=lookup) == reference(
            main, prompt, 1
        )
        assert cache.draft_offset == read
    cache = make_prompt_cache(main, draft)
    stats = GenerationStats()
    assert spec(PROMPT, main, draft, max_tokens=60, prompt_cache=cache, stats=stats) == reference(main, PROMPT, 60)
    assert stats.model_draft_tokens > 0 and cache.draft_offset >= len(PROMPT)  # it caught up and drafted


def test_early_stop_then_continue_equals_a_fresh_run(copier):
    """The index follows the caches when they are cut back: an early stop, then the next turn."""
    main, draft = copier
    cache = make_prompt_cache(main, draft)
    steps = speculative_generate_step(PROMPT, main, draft, max_tokens=100, prompt_cache=cache)
    first = [next(steps)[0] for _ in range(37)]
    steps.close()
    cache.truncate(len(cache.tokens) - 5)  # as a chat turn re-rendered with a different ending
    turn = [30, 31, 32] + PROMPT
    stats = GenerationStats()
    cont = spec(turn, main, draft, max_tokens=60, prompt_cache=cache, stats=stats)
    assert cont == reference(main, PROMPT + first[:-5] + turn, 60)
    assert stats.lookup_accepted_tokens > 0


def test_statistics_by_source_add_up(copier):
    main, draft = copier
    stats = GenerationStats()
    sources = []
    for response in stream_generate(
        main, toy_tokenizer(eos="<unk>"), PROMPT, draft_model=draft, max_tokens=150, stats=stats
    ):
        sources.append(response.source)
        assert response.from_draft == (response.source is not None)
    assert stats.lookup_draft_tokens + stats.model_draft_tokens == stats.total_draft_tokens
    assert stats.lookup_accepted_tokens + stats.model_accepted_tokens == stats.accepted_draft_tokens
    assert sources.count("lookup") == stats.lookup_accepted_tokens > 0
    assert sources.count("draft") == stats.model_accepted_tokens > 0
    assert sources.count(None) == stats.num_rounds == sum(stats.rounds_by_source.values())
    assert stats.generation_tokens == len(sources) == 150
    assert "from the conversation" in stats.summary()


def test_rounds_that_use_another_source_report_what_the_copy_would_have_accepted(copier, monkeypatch):
    """Each round that had a match and did not copy tells the policy how many of the tokens it emitted the
    copy would have proposed in a row: checked against the copy and the text, round by round."""
    generate = importlib.import_module("mlx_spec.generate")  # the module, not the function of its name
    main, draft = copier
    cache = make_prompt_cache(main, draft)
    rounds, make = [], generate._policy

    def spying(*args):
        policy = make(*args)
        record = policy.record

        def spied(choice, num_accepted, seconds, catch_up=None, unused=None):
            if unused is not None:  # the copy as proposed now, and where the round's tokens will go
                match, n, _ = unused
                rounds.append(
                    (choice, num_accepted, unused, index_for(cache).continuation(match, n), len(cache.tokens))
                )
            record(choice, num_accepted, seconds, catch_up, unused)

        policy.record = spied
        return policy

    monkeypatch.setattr(generate, "_policy", spying)
    with kept_apart("test: unused copies"):  # learnt from nothing before, whatever ran earlier in this process
        out = spec(PROMPT, main, draft, max_tokens=150, prompt_cache=cache)
    assert out == reference(main, PROMPT, 150)
    text = PROMPT + out
    assert rounds and all(choice.source != "lookup" for choice, *_ in rounds)
    for _, accepted, (match, n, m), proposal, at in rounds:
        assert isinstance(match, Match) and n == accepted + 1 and len(proposal) == n
        emitted = text[at : at + n]
        assert proposal[:m] == emitted[:m] and (m == n or proposal[m] != emitted[m])


def test_lookup_off_with_no_draft_is_plain_decoding(copier):
    main, _ = copier
    stats = GenerationStats()
    assert spec(PROMPT, main, None, max_tokens=50, stats=stats, prompt_lookup=False) == reference(main, PROMPT, 50)
    assert stats.total_draft_tokens == 0 and stats.num_rounds == 50


def test_bad_prompt_lookup_is_refused(copier):
    main, _ = copier
    with pytest.raises(ValueError, match="prompt_lookup must be True or False, got 'yes'"):
        spec(PROMPT, main, None, max_tokens=5, prompt_lookup="yes")


# --- sampling: a copied token is a draft with q = one-hot ---------------------------------------------

VOCAB = 12


def dist(model, tokens, temp, top_p=1.0, top_k=0):
    from test_sampling import shaped

    logits = np.array(model(mx.array(tokens)[None])[0, -1].astype(mx.float32))
    return shaped(logits, temp, top_p=top_p, top_k=top_k)


@pytest.mark.parametrize("shape", [dict(temp=1.0), dict(temp=0.7, top_p=0.9, top_k=8)])
@pytest.mark.parametrize("with_draft", [False, True])
def test_sampled_tokens_follow_the_main_distribution(shape, with_draft):
    main = make_model("qwen2", layers=2, vocab=VOCAB, scale=1.0)
    draft = perturbed(main, 0.3) if with_draft else None
    prompt = [3, 7, 7, 4, 3, 7, 7, 4, 3, 7]  # the first round decodes plainly: after "7", its likeliest token,
    p1 = dist(main, prompt, **shape)  # "3 7 7" occurred before and the second round copies "4"
    p2 = sum(p1[x] * dist(main, prompt + [x], **shape) for x in range(VOCAB) if p1[x] > 0)
    p4 = dist(main, prompt + [7], **shape)[4]
    runs = 1000
    firsts, seconds, copied, accepted = [], [], 0, 0
    for seed in range(runs):
        stats = GenerationStats()
        out = spec(prompt, main, draft, num_draft_tokens=3, max_tokens=3, seed=seed, stats=stats, **shape)
        firsts.append(out[0])
        seconds.append(out[1])
        assert stats.lookup_draft_tokens == 1 if out[0] == 7 else stats.lookup_draft_tokens <= 1
        if out[0] == 7:  # the second round copied "4", the one token it could
            copied += 1
            accepted += stats.lookup_accepted_tokens
    # q = one-hot(4): the copied token is accepted with probability p(4)
    assert copied > runs / 2
    sigma = np.sqrt(p4 * (1 - p4) / copied)
    assert abs(accepted / copied - p4) < 4 * sigma + 1e-9, (accepted / copied, p4)
    for tokens, p in ((firsts, p1), (seconds, p2)):
        stat, dof = chi_squared(np.bincount(tokens, minlength=VOCAB), p)
        assert stat < CRITICAL.get(dof, 3 * dof + 10), (np.bincount(tokens, minlength=VOCAB), p * runs)
