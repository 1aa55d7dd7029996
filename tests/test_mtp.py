"""The main model's MTP layer as a draft source: loading it, exact output, its cache, sampling, errors."""

import itertools
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from mtp_folders import write_deepseek_folder, write_folder
from test_accept import chi_squared
from test_recurrent import CRITICAL_12, first_three_marginals
from tiny import reference

import mlx_spec
from mlx_spec import GenerationStats, make_prompt_cache, speculative_generate_step
from mlx_spec.mtp import MissingMTPError, head_for, load_head
from mlx_spec.verify import body_and_head

PROMPT = [5, 17, 42, 9, 88, 23, 61, 7]
K = 4


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = write_folder(tmp_path_factory.mktemp("mtp") / "qwen3_5", vocab=97, mixing=0.02)
    model, _ = mlx_spec.load(str(folder))
    return model, folder


def rounds_of(flags: list[bool]) -> list[int]:
    """Accepted drafts per round, from the from-draft flags of the tokens yielded (a round: its accepted
    drafts, then the main model's own token)."""
    out, run = [], 0
    for flag in flags:
        if flag:
            run += 1
        else:
            out.append(run)
            run = 0
    return out


def test_greedy_output_equals_plain_decoding(qwen):
    model, _ = qwen
    accepted, rng = set(), np.random.default_rng(0)
    for prompt in [PROMPT] + [rng.integers(3, 97, 6).tolist() for _ in range(7)]:  # greedy text falls into cycles
        expected = reference(model, prompt, 60)
        stats = GenerationStats()
        steps = list(
            speculative_generate_step(
                prompt, model, "mtp", num_draft_tokens=K, max_tokens=60, prompt_lookup=False, stats=stats
            )
        )
        assert [t for t, _, _ in steps] == expected
        assert stats.rounds_by_source["mtp"] > 5 and stats.host_syncs == stats.num_rounds  # one host read a round
        accepted |= set(rounds_of([f for _, _, f in steps])[1:-1])  # the first round is plain, the last cut short
    assert accepted == set(range(K + 1))  # rejections at every position, and full acceptances


def test_greedy_with_lookup_and_auto_equals_plain_decoding(qwen):
    model, _ = qwen
    prompt = PROMPT * 3 + PROMPT[:2]
    expected = reference(model, prompt, 60)
    stats = GenerationStats()
    assert [t for t, _, _ in speculative_generate_step(prompt, model, "mtp", max_tokens=60, stats=stats)] == expected
    assert stats.rounds_by_source["mtp"] > 0 and stats.rounds_by_source["lookup"] > 0
    shortlisted = speculative_generate_step(
        PROMPT, model, "mtp", num_draft_tokens=K, max_tokens=40, draft_vocab_size=50
    )
    assert [t for t, _, _ in shortlisted] == reference(model, PROMPT, 40)  # drafts among the first 50 ids only
    one_token = speculative_generate_step([5], model, "mtp", num_draft_tokens=K, max_tokens=12, prompt_lookup=False)
    assert [t for t, _, _ in one_token] == reference(model, [5], 12)  # the first round cannot draft: plain
    assert mlx_spec.generate(model, _tokenizer(qwen), PROMPT, draft_model="mtp", max_tokens=20) == (
        mlx_spec.generate(model, _tokenizer(qwen), PROMPT, max_tokens=20)
    )


def _tokenizer(qwen):
    from mlx_spec.load import tokenizer_of

    return tokenizer_of(qwen[0])


def sequential_mtp_cache(model, tokens: list[int], num_entries: int) -> KVCache:
    """The MTP cache fed one entry at a time from a fresh main pass: the reference for what rounds leave."""
    body, _ = body_and_head(model)
    hidden = body(mx.array(tokens)[None])
    head, cache = head_for(model), [KVCache()]
    for j in range(num_entries):
        head(body.embed_tokens(mx.array([[tokens[j + 1]]])), hidden[:, j : j + 1], cache)
    return cache[0]


def test_mtp_cache_is_exact_after_rejections(qwen):
    """Turns on one pair, each stopped inside a round (the caches are cut back): after each, the MTP cache holds
    what feeding it one entry at a time from a fresh main pass gives; over the turns, rounds rejected at every
    position and accepted all."""
    model, _ = qwen
    caches, accepted, rng = make_prompt_cache(model, "mtp"), set(), np.random.default_rng(1)
    for turn in [PROMPT] + [rng.integers(3, 97, 3).tolist() for _ in range(5)]:
        steps = speculative_generate_step(
            turn, model, "mtp", num_draft_tokens=K, max_tokens=40, prompt_lookup=False, prompt_cache=caches
        )
        accepted |= set(rounds_of([f for _, _, f in itertools.islice(steps, 37)])[1:])
        steps.close()
        mtp = caches.mtp[0]
        assert 0 < mtp.offset <= len(caches.tokens) - 2
        expected = sequential_mtp_cache(model, caches.tokens, mtp.offset)
        for got, want in ((mtp.keys, expected.keys), (mtp.values, expected.values)):
            assert np.allclose(np.array(got[..., : mtp.offset, :]), np.array(want[..., : mtp.offset, :]), atol=1e-4)
    assert accepted == set(range(K + 1))


SAMPLED_VOCAB = 12
RUNS = 400


def test_sampled_tokens_follow_the_main_distribution(tmp_path):
    """Tokens 1-3 at temp 1 with MTP drafts of 3 follow the main model's distribution: the chi-squared test of
    each against the enumerated marginals, by rejection sampling with the MTP layer's q (no seed), and by coupled
    sampling (a seed)."""
    folder = write_folder(tmp_path / "small", vocab=SAMPLED_VOCAB, mixing=0.02, scale=1.0)
    model, _ = mlx_spec.load(str(folder))
    prompt = [3, 7, 1]
    marginals = first_three_marginals(model, prompt, 1.0)
    for seeded in (False, True):
        stats, samples = GenerationStats(), []
        for seed in range(RUNS):
            mx.random.seed(seed)
            steps = speculative_generate_step(
                prompt, model, "mtp", num_draft_tokens=3, max_tokens=6, temp=1.0, stats=stats, prompt_lookup=False,
                seed=seed if seeded else None,
            )  # fmt: skip
            samples.append([t for t, _, _ in itertools.islice(steps, 3)])
            steps.close()
        assert stats.acceptance_rule == ("coupled sampling" if seeded else "rejection sampling")
        samples = np.array(samples)
        for position, p in enumerate(marginals):
            counts = np.bincount(samples[:, position], minlength=SAMPLED_VOCAB)
            stat, dof = chi_squared(counts, p)
            assert stat < CRITICAL_12[dof], (seeded, position, counts, p * RUNS)
        assert stats.rounds_by_source["mtp"] > RUNS / 2
        assert 0 < stats.accepted_draft_tokens < stats.total_draft_tokens  # accepted and rejected, rolled back


def test_a_folder_without_mtp_tensors_is_a_clear_error(tmp_path):
    folder = write_folder(tmp_path / "plain", vocab=97, with_mtp=False)
    model, _ = mlx_spec.load(str(folder))
    with pytest.raises(MissingMTPError, match=rf"{folder} holds no MTP tensors.*Hugging Face Qwen3.5"):
        list(speculative_generate_step(PROMPT, model, "mtp", max_tokens=4))
    with pytest.raises(ValueError, match="draft_model must be a model, None or 'mtp', got 'mpt'"):
        list(speculative_generate_step(PROMPT, model, "mpt", max_tokens=4))


def test_zero_centred_norms_are_detected_in_an_export(qwen, tmp_path):
    """A folder in MLX's layout (the body's norms shifted by mlx-lm) whose MTP norms are zero-centred, and one
    whose MTP norms are shifted too: both give the layer read from the Hugging Face folder."""
    model, folder = qwen
    reference_head = dict(tree_flatten(load_head(model, folder).parameters()))
    raw = {k: v for k, v in mx.load(str(folder / "model.safetensors")).items() if k.startswith("mtp.")}
    body = {k: v for k, v in tree_flatten(model.parameters())}
    for shift in (0.0, 1.0):
        export = tmp_path / f"export{shift}"
        export.mkdir()
        mtp = {k: v + shift if v.ndim == 1 and "norm" in k.rsplit(".", 2)[-2] else v for k, v in raw.items()}
        mx.save_safetensors(str(export / "model.safetensors"), {**body, **mtp})
        (export / "config.json").write_text(json.dumps(json.loads((folder / "config.json").read_text())))
        head = dict(tree_flatten(load_head(model, export).parameters()))
        assert all(np.allclose(np.array(head[k]), np.array(w)) for k, w in reference_head.items())


def test_command_line_drafts_with_mtp_and_names_a_folder_without(qwen, tmp_path, capsys):
    from mlx_spec.chat import MAGENTA, paint
    from mlx_spec.cli import main

    _, folder = qwen
    # transformers reads the toy tokenizer as Qwen3.5's own, which knows the special tokens only
    prompt = "<s><unk></s><unk><unk><s>"
    args = ["generate", "--model", str(folder), "-p", prompt, "--ignore-chat-template", "-m", "24", "--json"]
    args += ["--no-prompt-lookup"]
    assert main(args + ["--draft-model", "mtp", "--num-draft-tokens", "3"]) == 0
    drafted = json.loads(capsys.readouterr().out)
    assert main(args + ["--no-draft"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert drafted["tokens"] == plain["tokens"] and drafted["draft_model"] == "mtp"
    assert drafted["mtp_draft_tokens"] == drafted["total_draft_tokens"] > 0
    assert drafted["rounds_by_source"]["mtp"] > 0
    assert paint("x", True, True, "mtp") == f"{MAGENTA}x\x1b[0m"
    without = write_folder(tmp_path / "plain", vocab=97, with_mtp=False)
    assert main(["generate", "--model", str(without), "-p", "w5", "--draft-model", "mtp"]) == 1
    assert f"{without} holds no MTP tensors" in " ".join(capsys.readouterr().err.split())


def test_convert_keeps_the_mtp_tensors(qwen, tmp_path, capsys):
    """`mlx-spec convert` of a Hugging Face folder: mlx-lm's conversion, and mtp.safetensors beside it, which
    gives the layer read from the original (or, with --mtp-bits, that layer quantized; with --q-bits the body is)."""
    from mlx_spec.cli import main

    model, folder = qwen
    original = dict(tree_flatten(head_for(model).parameters()))
    for extra in ([], ["--mtp-bits", "8"], ["--q-bits", "8", "--mtp-bits", "4"]):  # the body quantized too
        out = tmp_path / f"converted{len(extra)}"
        assert main(["convert", str(folder), str(out), "--dtype", "float32", *extra]) == 0
        converted, _ = mlx_spec.load(str(out))
        head = dict(tree_flatten(head_for(converted).parameters()))
        if extra:
            assert head["fc.scales"].size > 0 and "fc.scales" not in original
        else:
            assert all(np.allclose(np.array(head[k]), np.array(w), atol=1e-6) for k, w in original.items())
        expected = reference(converted, PROMPT, 24)
        steps = speculative_generate_step(  # the MTP step's output layer cut too (quantized, with --q-bits)
            PROMPT, converted, "mtp", num_draft_tokens=3, max_tokens=24, draft_vocab_size=50
        )
        assert [t for t, _, _ in steps] == expected
    assert main(["convert", str(folder), str(tmp_path / "converted0")]) == 1
    assert "exists" in capsys.readouterr().err


def test_deepseek_v3_mtp_layer(tmp_path):
    """DeepSeek-V3 keeps its MTP layer as the decoder layer after the last (mlx-lm drops it, at index 61 only):
    greedy output with it equals plain decoding, its rounds draft, and its cache is exact."""
    folder, layer = write_deepseek_folder(tmp_path / "deepseek")
    model, _ = mlx_spec.load(str(folder))
    head = head_for(model)
    assert head.chain_normed is False
    loaded = dict(tree_flatten(head.layers[0].parameters()))
    assert loaded.keys() == layer.keys() and all(
        np.allclose(np.array(loaded[k]), np.array(w)) for k, w in layer.items()
    )
    caches = make_prompt_cache(model, "mtp")
    stats = GenerationStats()
    steps = speculative_generate_step(
        PROMPT, model, "mtp", num_draft_tokens=3, max_tokens=24, prompt_lookup=False, stats=stats, prompt_cache=caches
    )
    assert [t for t, _, _ in steps] == reference(model, PROMPT, 24)
    assert stats.rounds_by_source["mtp"] > 3 and stats.accepted_draft_tokens > 0
    mtp = caches.mtp[0]
    expected = sequential_mtp_cache(model, caches.tokens, mtp.offset)
    for got, want in ((mtp.keys, expected.keys), (mtp.values, expected.values)):  # MLA: latent and rope keys
        assert np.allclose(np.array(got[..., : mtp.offset, :]), np.array(want[..., : mtp.offset, :]), atol=1e-4)


def test_mtp_beside_a_draft_model(qwen):
    """mtp=True with a draft model: the controller has both (and plain) to choose from each round; the output
    stays the main model's, and both draft sources serve rounds (the first drafting round is the draft model's,
    while nothing is learnt of the pair)."""
    from tiny import first_layers

    model, _ = qwen
    draft = first_layers(model, 2)  # the body's first two layers: cheaper, and they agree often (near-bigram)
    stats = GenerationStats()
    steps = speculative_generate_step(PROMPT, model, draft, mtp=True, max_tokens=80, stats=stats, prompt_lookup=False)
    assert [t for t, _, _ in steps] == reference(model, PROMPT, 80)
    assert stats.rounds_by_source["mtp"] > 0 and stats.rounds_by_source["draft"] > 0, stats.rounds_by_source
    assert stats.mtp_draft_tokens + stats.model_draft_tokens + stats.lookup_draft_tokens == stats.total_draft_tokens


def test_qwen3_next_mtp_layer(tmp_path):
    """Qwen3-Next (no multimodal wrapper, mixture-of-experts layers stored one tensor per expert): its MTP
    layer loads and drafts, and greedy output equals plain decoding."""
    model, _ = mlx_spec.load(str(write_folder(tmp_path / "next", vocab=97, mixing=0.02, kind="qwen3_next")))
    assert "switch_mlp.gate_proj.weight" in " ".join(k for k, _ in tree_flatten(head_for(model).parameters()))
    stats = GenerationStats()
    steps = speculative_generate_step(
        PROMPT, model, "mtp", num_draft_tokens=3, max_tokens=30, prompt_lookup=False, stats=stats
    )
    assert [t for t, _, _ in steps] == reference(model, PROMPT, 30)
    assert stats.rounds_by_source["mtp"] > 3 and 0 < stats.accepted_draft_tokens < stats.total_draft_tokens


def test_a_cache_the_mtp_layer_has_not_read_decodes_without_it(qwen):
    """A prompt cache filled without the MTP layer holds hidden states it never saw: the next call warns and
    decodes without it (exactly, with lookup and plain rounds)."""
    model, _ = qwen
    caches = make_prompt_cache(model)
    first = [t for t, _, _ in speculative_generate_step(PROMPT, model, max_tokens=8, prompt_cache=caches)]
    stats = GenerationStats()
    with pytest.warns(UserWarning, match=r"holds \d+ tokens the MTP layer has not read"):
        steps = speculative_generate_step([11, 4], model, "mtp", max_tokens=8, prompt_cache=caches, stats=stats)
        second = [t for t, _, _ in steps]
    assert first == reference(model, PROMPT, 8)
    assert second == reference(model, PROMPT + first + [11, 4], 8) and "mtp" not in stats.rounds_by_source


def test_convert_keeps_deepseek_v3s_mtp_layer(tmp_path):
    """mlx-lm's conversion drops DeepSeek-V3's layer after the last; `mlx-spec convert` keeps it beside, and
    the converted folder drafts with it as the original does."""
    from mlx_spec.cli import main

    folder, _ = write_deepseek_folder(tmp_path / "deepseek")
    original, _ = mlx_spec.load(str(folder))
    assert main(["convert", str(folder), str(tmp_path / "converted"), "--dtype", "float32"]) == 0
    converted, _ = mlx_spec.load(str(tmp_path / "converted"))
    heads = [dict(tree_flatten(head_for(m).parameters())) for m in (original, converted)]
    assert heads[0].keys() == heads[1].keys()
    assert all(np.allclose(np.array(heads[0][k]), np.array(heads[1][k])) for k in heads[0])
    assert head_for(converted).chain_normed is False
    steps = speculative_generate_step(PROMPT, converted, "mtp", num_draft_tokens=3, max_tokens=16)
    assert [t for t, _, _ in steps] == reference(converted, PROMPT, 16)
