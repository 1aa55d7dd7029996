"""The public API end to end: streaming, stops, statistics, logits processors, drafts, bad input."""

import ast
import gc
import importlib
import re
import warnings
from pathlib import Path

import pytest
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tiny import VOCAB, make_model, perturbed, reference, spec, toy_tokenizer
from tiny_folders import save_model_folder

import mlx_spec
from mlx_spec import GenerationStats, IncompatibleDraftError, check_draft, make_prompt_cache, stream_generate
from mlx_spec.load import DraftMetadataWarning

PROMPT = [1, 5, 9, 22, 3]


@pytest.fixture(scope="module")
def pair():
    main = make_model("qwen2", layers=4)
    return main, perturbed(main, 0.005)


def test_generate_text_and_stream_agree(pair):
    main, draft = pair
    tok = toy_tokenizer(eos="<unk>")  # an end token the model never picks here
    expected = reference(main, PROMPT, 25)
    responses = list(stream_generate(main, tok, PROMPT, draft_model=draft, max_tokens=25, num_draft_tokens=3))
    assert [r.token for r in responses] == expected
    assert [r.finish_reason for r in responses] == [None] * 24 + ["length"]
    text = mlx_spec.generate(main, tok, PROMPT, draft_model=draft, max_tokens=25, num_draft_tokens=3)
    assert text == "".join(r.text for r in responses)
    assert text.split() == [f"w{t}" for t in expected]
    last = responses[-1]
    assert last.generation_tokens == 25 and last.prompt_tokens == len(PROMPT)
    assert last.stats.acceptance_rate > 0.3


@pytest.mark.parametrize("k", [1, 4, 9])
def test_end_token_stops_and_nothing_follows(pair, k):
    main, _ = pair
    expected = reference(main, PROMPT, 40)
    stop_at = next(i for i in range(5, 40) if expected[i] not in expected[:i])
    eos = expected[stop_at]
    tok = toy_tokenizer(eos=f"w{eos}")
    cache = make_prompt_cache(main, main)
    responses = list(
        stream_generate(main, tok, PROMPT, draft_model=main, prompt_cache=cache, max_tokens=40, num_draft_tokens=k)
    )
    assert [r.token for r in responses] == expected[: stop_at + 1]
    assert responses[-1].finish_reason == "stop"
    assert cache.tokens == PROMPT + expected[: stop_at + 1]  # nothing after the end token, even in the caches
    assert cache.main_offset == len(cache.tokens) - 1


def test_end_token_proposed_by_the_draft_is_accepted(pair):
    main, _ = pair
    expected = reference(main, PROMPT, 40)
    # With the main model as its own draft and k = 16, tokens 0..15 come from the draft
    eos = next(expected[i] for i in range(5, 16) if expected[i] not in expected[:i])
    tok = toy_tokenizer(eos=f"w{eos}")
    responses = list(stream_generate(main, tok, PROMPT, draft_model=main, max_tokens=40, num_draft_tokens=16))
    assert responses[-1].token == eos and responses[-1].from_draft


@pytest.mark.parametrize("max_tokens", [0, 1, 2, 7, 33])
@pytest.mark.parametrize("k", [1, 5])
def test_max_tokens_exactly(pair, max_tokens, k):
    main, draft = pair
    stats = GenerationStats()
    out = spec(PROMPT, main, draft, num_draft_tokens=k, max_tokens=max_tokens, stats=stats)
    assert out == reference(main, PROMPT, max_tokens)[:max_tokens]
    assert len(out) == max_tokens


def test_statistics_add_up(pair):
    main, draft = pair
    stats = GenerationStats()
    out = spec(PROMPT, main, draft, num_draft_tokens=4, max_tokens=64, stats=stats)
    assert stats.accepted_draft_tokens + stats.rejected_draft_tokens == stats.total_draft_tokens
    assert stats.generation_tokens == len(out) == stats.accepted_draft_tokens + stats.num_rounds
    assert stats.host_syncs == stats.num_rounds  # one host read per round
    assert sum(stats.draft_lengths.values()) == stats.num_rounds
    assert sum(k * n for k, n in stats.draft_lengths.items()) == stats.total_draft_tokens
    assert stats.mean_tokens_per_round == pytest.approx(len(out) / stats.num_rounds)
    assert stats.prompt_tokens == len(PROMPT)
    assert stats.generation_tps > 0 and stats.prompt_tps > 0 and stats.peak_memory > 0
    assert 0 < stats.time_to_first_token < stats.prompt_time + stats.generation_time
    d = stats.as_dict()
    assert d["acceptance_rate"] == stats.acceptance_rate and d["rejected_draft_tokens"] == stats.rejected_draft_tokens
    assert "Accepted" in stats.summary()


def ban_history(tokens, logits):
    """A logits processor: never repeat a token of the last 6 (depends on the exact history)."""
    logits[:, tokens[-6:]] = -1e9
    return logits


@pytest.mark.parametrize("temp_free_processors", ["repetition", "ban"])
def test_logits_processors_see_plain_decodings_history(pair, temp_free_processors):
    main, draft = pair
    procs = make_logits_processors(repetition_penalty=2.0) if temp_free_processors == "repetition" else [ban_history]
    expected = reference(main, PROMPT, 40, logits_processors=procs)
    assert expected != reference(main, PROMPT, 40)
    for k in (1, 3, 7):
        stats = GenerationStats()
        assert (
            spec(PROMPT, main, draft, num_draft_tokens=k, max_tokens=40, logits_processors=procs, stats=stats)
            == expected
        )
        assert stats.accepted_draft_tokens > 0


@pytest.mark.parametrize("draft_vocab", [VOCAB + 23, VOCAB - 7])
def test_draft_with_a_padded_or_shorter_vocabulary(pair, draft_vocab):
    main, _ = pair
    draft = make_model("qwen2", layers=2, vocab=draft_vocab, seed=3)
    assert spec(PROMPT, main, draft, num_draft_tokens=3, max_tokens=30) == reference(main, PROMPT, 30)
    spec(PROMPT, main, draft, num_draft_tokens=3, max_tokens=10, temp=1.0, seed=0)  # sampling too


def test_incompatible_draft_is_refused(tmp_path):
    main = make_model("llama", layers=2)
    draft = perturbed(main, 0.005)
    save_model = save_model_folder
    main_dir = save_model(main, toy_tokenizer(), tmp_path / "main")
    good_dir = save_model(draft, toy_tokenizer(), tmp_path / "good")
    bad_dir = save_model(draft, toy_tokenizer(prefix="v"), tmp_path / "bad")
    eos_dir = save_model(draft, toy_tokenizer(eos="w3"), tmp_path / "eos")
    m, tok = mlx_spec.load(str(main_dir))
    good, _ = mlx_spec.load(str(good_dir))
    assert mlx_spec.generate(m, tok, PROMPT, draft_model=good, max_tokens=5)
    bad, _ = mlx_spec.load(str(bad_dir))
    with pytest.raises(
        IncompatibleDraftError, match=r"main .*main.* and draft .*bad.* different vocabularies.*'w3' vs 'v3'"
    ):
        mlx_spec.generate(m, tok, PROMPT, draft_model=bad, max_tokens=5)
    with pytest.raises(IncompatibleDraftError, match="different vocabularies"):
        list(mlx_spec.speculative_generate_step(PROMPT, m, bad, max_tokens=5))
    eos, _ = mlx_spec.load(str(eos_dir))
    with pytest.raises(IncompatibleDraftError, match=r"different end tokens: \{1: '</s>'\} vs \{3: 'w3'\}"):
        check_draft(m, eos)


def test_draft_whose_special_token_strings_differ_is_used_with_a_warning(tmp_path):
    """Same ids, same tokens, same end tokens, but bos / pad strings that differ (an MLX Qwen draft has no
    bos_token, a GGUF-converted Qwen main has '<|endoftext|>'): metadata only, one warning per pair, exact output."""
    main = make_model("llama", layers=2)
    draft = perturbed(main, 0.005)
    other = toy_tokenizer()
    other.bos_token, other.pad_token = None, "<unk>"
    m, tok = mlx_spec.load(str(save_model_folder(main, toy_tokenizer(), tmp_path / "main")))
    d, draft_tok = mlx_spec.load(str(save_model_folder(draft, other, tmp_path / "draft")))
    assert (tok.bos_token, draft_tok.bos_token, tok.pad_token, draft_tok.pad_token) == ("<s>", None, None, "<unk>")
    with pytest.warns(DraftMetadataWarning) as caught:
        text = mlx_spec.generate(m, tok, PROMPT, draft_model=d, max_tokens=12)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert re.search(r"^main .*main.* and draft .*draft.* have different special token strings", message)
    assert "(bos_token: '<s>' vs None; pad_token: None vs '<unk>')" in message and "metadata only" in message
    assert text == mlx_spec.generate(m, tok, PROMPT, max_tokens=12)  # greedy: the main model's own text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per pair
        assert mlx_spec.generate(m, tok, PROMPT, draft_model=d, max_tokens=12) == text
        check_draft(m, d)


def test_eos_token_string_that_differs_where_the_end_ids_agree_is_a_warning():
    main = make_model("llama", layers=2)
    draft = perturbed(main, 0.005)
    tok = TokenizerWrapper(toy_tokenizer(), eos_token_ids=[1, 2])
    draft_tok = TokenizerWrapper(toy_tokenizer(eos="<unk>"), eos_token_ids=[1, 2])
    with pytest.warns(DraftMetadataWarning, match=r"eos_token: '</s>' vs '<unk>'\)"):
        check_draft(main, draft, tok, draft_tok)
    other = perturbed(main, 0.005, seed=2)  # another pair: the end ids differ, an error naming them
    with pytest.raises(
        IncompatibleDraftError, match=r"different end tokens: \{1: '</s>', 2: '<unk>'\} vs \{2: '<unk>'\}$"
    ):
        check_draft(main, other, tok, TokenizerWrapper(toy_tokenizer(eos="<unk>")))


def test_load_errors_name_the_source(tmp_path):
    with pytest.raises(ValueError, match="nowhere/at/all"):
        mlx_spec.load(str(tmp_path / "nowhere/at/all"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        mlx_spec.load(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="missing.gguf"):
        mlx_spec.load(str(tmp_path / "missing.gguf"))


BAD = [
    (dict(num_draft_tokens=0), "num_draft_tokens.*0"),
    (dict(num_draft_tokens=-2), "num_draft_tokens.*-2"),
    (dict(num_draft_tokens=33), "num_draft_tokens.*33"),
    (dict(num_draft_tokens=2.5), "num_draft_tokens.*2.5"),
    (dict(max_tokens=-2), "max_tokens.*-2"),
    (dict(temp=-0.5), "temp.*-0.5"),
    (dict(top_p=0.0), "top_p.*0.0"),
    (dict(top_p=1.5), "top_p.*1.5"),
    (dict(top_k=-1), "top_k.*-1"),
    (dict(min_p=-0.1), "min_p.*-0.1"),
    (dict(min_p=1.0), "min_p.*1.0"),
    (dict(max_kv_size=6, num_draft_tokens=4), "max_kv_size=6.*num_draft_tokens=4"),
    (dict(kv_bits=7), "kv_bits.*7"),
    (dict(kv_bits=4, kv_group_size=48), "kv_group_size.*48"),
    (dict(prompt_cache=[]), "prompt_cache"),
    (dict(draft_vocab_size=0), "draft_vocab_size.*0"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_input_is_a_value_error_naming_the_value(pair, kwargs, message):
    main, draft = pair
    with pytest.raises(ValueError, match=message):
        spec(PROMPT, main, draft, **kwargs)


def test_bad_prompts(pair):
    main, draft = pair
    with pytest.raises(ValueError, match="empty"):
        spec([], main, draft)
    with pytest.raises(ValueError, match=f"\\[0, {VOCAB}\\).*{VOCAB + 5}"):
        spec([1, VOCAB + 5], main, draft)
    with pytest.raises(ValueError, match="empty"):
        list(stream_generate(main, toy_tokenizer(), "", draft_model=draft))


def test_kv_group_size_that_does_not_divide_the_head_dimension(pair):
    main, draft = pair
    with pytest.raises(ValueError, match="kv_group_size=64 does not divide the model's head dimension 16"):
        spec(PROMPT, main, draft, kv_bits=4, kv_group_size=64, quantized_kv_start=2, max_tokens=4)


def test_bad_input_leaves_a_reused_cache_untouched(pair):
    main, draft = pair
    cache = make_prompt_cache(main, draft)
    spec(PROMPT, main, draft, max_tokens=5, prompt_cache=cache)
    before = list(cache.tokens)
    with pytest.raises(ValueError):
        spec([3], main, draft, temp=-1, prompt_cache=cache)
    assert cache.tokens == before


class NoLength:
    """A tokenizer that cannot be asked its length (as some wrappers): only `is None` tells it from no tokenizer."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __len__(self):
        raise TypeError("no len() for this tokenizer")


def test_check_draft_takes_a_tokenizer_without_a_length(pair):
    main, draft = pair
    check_draft(main, draft, NoLength(toy_tokenizer()), NoLength(toy_tokenizer()))
    with pytest.raises(IncompatibleDraftError, match="'w3' vs 'v3'"):
        check_draft(main, perturbed(main, 0.01), NoLength(toy_tokenizer()), NoLength(toy_tokenizer(prefix="v")))


def test_vocabularies_are_compared_once_per_pair(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    pairs = importlib.import_module("mlx_spec.facts")._pairs
    main = make_model("llama", layers=2)
    draft = perturbed(main, 0.005)
    m, tok = mlx_spec.load(str(save_model_folder(main, toy_tokenizer(), tmp_path / "main")))
    d, _ = mlx_spec.load(str(save_model_folder(draft, toy_tokenizer(), tmp_path / "draft")))
    bad, _ = mlx_spec.load(str(save_model_folder(draft, toy_tokenizer(prefix="v"), tmp_path / "bad")))
    calls = []
    get_vocab = PreTrainedTokenizerFast.get_vocab
    monkeypatch.setattr(PreTrainedTokenizerFast, "get_vocab", lambda self: calls.append(self) or get_vocab(self))
    for _ in range(2):
        mlx_spec.generate(m, tok, PROMPT, draft_model=d, max_tokens=3)
        for _ in range(2):
            with pytest.raises(IncompatibleDraftError, match="different vocabularies"):
                mlx_spec.generate(m, tok, PROMPT, draft_model=bad, max_tokens=3)
    assert len(calls) == 4  # each pair's two vocabularies, once
    key = (id(m), id(d))
    assert pairs[key].checked and pairs[key].incompatible is None
    del d
    gc.collect()
    assert key not in pairs  # the verdict goes with the draft model


def import_graph() -> dict[str, set[str]]:
    """mlx_spec's modules, its subpackages' included -> the mlx_spec modules each imports, anywhere in it (inside
    functions too), read with `ast`: `from .x import ...`, `from ..x import ...`, `from . import x`,
    `from mlx_spec.x import ...`, `import mlx_spec.x`. A module is named by its dotted path below the package
    ("server.engine"), a subpackage by its folder ("server"); the package itself is "__init__"."""
    package = Path(mlx_spec.__file__).parent

    def name_of(path: Path) -> str:
        parts = path.relative_to(package).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"

    files = {name_of(path): path for path in sorted(package.rglob("*.py"))}

    def target(name: str) -> str:  # a dotted name below the package -> the module it names, or the one defining it
        parts = name.split(".") if name else []
        while parts and ".".join(parts) not in files:
            parts.pop()
        return ".".join(parts) or "__init__"

    graph = {}
    for module, path in files.items():
        here = [] if module == "__init__" else module.split(".")
        home = here if path.name == "__init__.py" else here[:-1]  # the package its relative imports start from
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.level - 1 <= len(home), f"{path}: a relative import above mlx_spec"
                    base = ".".join(home[: len(home) - node.level + 1] + ([node.module] if node.module else []))
                elif node.module == "mlx_spec" or node.module.startswith("mlx_spec."):
                    base = node.module[len("mlx_spec.") :] if "." in node.module else ""
                else:
                    continue
                # from package import x, y: submodules, or names its __init__ defines; from module import x: module
                edges.update(target(f"{base}.{alias.name}" if base else alias.name) for alias in node.names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "mlx_spec" or alias.name.startswith("mlx_spec."):
                        edges.add(target(alias.name[len("mlx_spec.") :] if "." in alias.name else ""))
        graph[module] = edges - {module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle():
    graph = import_graph()
    assert {"bench", "bench_report", "generate", "load", "compat"} <= set(graph)
    assert "bench_report" in graph["bench"] and "generate" in graph["bench"]  # the parser sees the edges
    # and the subpackages' modules, with their relative imports: `from .engine import`, `from ..cache import`
    assert {"server", "server.models", "server.engine", "server.app"} <= set(graph)
    assert {"server.engine", "server.models", "options"} <= graph["server.app"]
    assert {"server.models", "cache", "generate"} <= graph["server.engine"]
    assert {"server.app", "server.engine", "server.models"} == graph["server"]
    assert "server" in graph["cli"] and "__init__" not in graph["server.engine"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # and finds cycles
    assert import_cycles(graph) == []
