"""Models in: MLX folders, hub ids and .gguf files -> (model, tokenizer); draft compatibility check."""

import weakref
from pathlib import Path

import mlx_lm
from mlx_lm.tokenizer_utils import TokenizerWrapper

_loaded = {}  # id(model) -> (name, tokenizer) while the model lives, for the draft check
_verdicts = {}  # (id(model), id(draft_model)) -> None (compatible) or the error's message, while both models live


class IncompatibleDraftError(ValueError):
    """The draft model cannot serve the main model (different vocabulary or special tokens)."""


def load(path_or_hub_id: str, dtype: str | None = None, q_bits: int | None = None, **kwargs):
    """Load (model, tokenizer) from an MLX folder, a hub id, or a .gguf file.

    A .gguf file is converted once into the user cache (see `mlx_spec.gguf`);
    `dtype` and `q_bits` choose the converted weights. Other keyword arguments
    go to `mlx_lm.load`.
    """
    source = str(path_or_hub_id)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {source}")
        from .gguf import convert_cached

        path = convert_cached(path, dtype=dtype, q_bits=q_bits)
    elif path.exists() and not (path / "config.json").is_file():
        raise ValueError(f"{source} is not an MLX model folder (no config.json)")
    elif not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise ValueError(f"model not found: {source} is neither a folder nor a hub id (owner/name)")
    try:
        model, tokenizer = mlx_lm.load(str(path if path.exists() else source), **kwargs)
    except Exception as e:  # hub unreachable, repo missing, unsupported model type
        if not path.exists():
            raise ValueError(
                f"could not fetch {source} from the Hugging Face hub (offline, or no such model): {type(e).__name__}"
            ) from e
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"could not load model {source}: {type(e).__name__}: {first_line}") from e
    _loaded[id(model)] = (source, tokenizer)
    weakref.finalize(model, _loaded.pop, id(model), None)
    return model, tokenizer


def model_name(model) -> str:
    entry = _loaded.get(id(model))
    return entry[0] if entry else f"<{type(model).__module__.rsplit('.', 1)[-1]} model>"


def tokenizer_of(model):
    entry = _loaded.get(id(model))
    return entry[1] if entry else None


def output_size(model) -> int:
    """Rows of the model's output layer (its logits' last dimension)."""
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    if size is None:
        size = model.model.embed_tokens.weight.shape[0]
    return size


def check_draft(model, draft_model, tokenizer=None, draft_tokenizer=None):
    """Raise IncompatibleDraftError unless the draft speaks the main model's vocabulary.

    Tokens are compared for every id both models can emit, so an embedding
    table padded beyond the tokenizer is fine; special tokens must agree.
    Without both tokenizers (models built in code) nothing can be compared.
    The verdict on a pair is kept for the life of both models: comparing two
    large vocabularies takes about half a second, once.
    """
    key = (id(model), id(draft_model))
    if key not in _verdicts:
        tokenizer = tokenizer if tokenizer is not None else tokenizer_of(model)
        draft_tokenizer = draft_tokenizer if draft_tokenizer is not None else tokenizer_of(draft_model)
        if tokenizer is None or draft_tokenizer is None:
            return
        try:
            _compare_vocabularies(model, draft_model, tokenizer, draft_tokenizer)
            _verdicts[key] = None
        except IncompatibleDraftError as error:
            _verdicts[key] = error.args  # not the error: its traceback would keep the models alive
        for m in {id(model): model, id(draft_model): draft_model}.values():
            weakref.finalize(m, _verdicts.pop, key, None)
    if _verdicts[key] is not None:
        raise IncompatibleDraftError(*_verdicts[key])


def _compare_vocabularies(model, draft_model, tokenizer, draft_tokenizer):
    if isinstance(tokenizer, TokenizerWrapper):
        tokenizer = tokenizer._tokenizer
    main_loaded, draft_loaded = tokenizer_of(model), tokenizer_of(draft_model)
    eos_main = _eos_ids(main_loaded if main_loaded is not None else tokenizer)
    eos_draft = _eos_ids(draft_loaded if draft_loaded is not None else draft_tokenizer)
    if isinstance(draft_tokenizer, TokenizerWrapper):
        draft_tokenizer = draft_tokenizer._tokenizer
    names = f"main {model_name(model)} and draft {model_name(draft_model)}"
    limit = min(output_size(model), output_size(draft_model))
    main_vocab = {i: t for t, i in tokenizer.get_vocab().items() if i < limit}
    draft_vocab = {i: t for t, i in draft_tokenizer.get_vocab().items() if i < limit}
    differ = sorted(i for i in main_vocab.keys() | draft_vocab.keys() if main_vocab.get(i) != draft_vocab.get(i))
    if differ:
        examples = ", ".join(f"id {i}: {main_vocab.get(i)!r} vs {draft_vocab.get(i)!r}" for i in differ[:3])
        raise IncompatibleDraftError(
            f"{names} have different vocabularies ({len(differ)} of {limit} ids differ; {examples})"
        )
    for what in ("bos_token", "eos_token", "pad_token"):
        a, b = getattr(tokenizer, what, None), getattr(draft_tokenizer, what, None)
        if a != b:
            raise IncompatibleDraftError(f"{names} have different {what}: {a!r} vs {b!r}")
    if eos_main != eos_draft:
        raise IncompatibleDraftError(f"{names} have different end tokens: {sorted(eos_main)} vs {sorted(eos_draft)}")


def _eos_ids(tokenizer) -> set:
    if isinstance(tokenizer, TokenizerWrapper):
        return set(tokenizer.eos_token_ids)
    return {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
