"""Models in: MLX folders, hub ids and .gguf files -> (model, tokenizer); draft compatibility check."""

import weakref
from pathlib import Path

import mlx_lm
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .compat import SPECIAL_TOKEN_NAMES, incompatibility, special_tokens

_loaded = {}  # id(model) -> (name, tokenizer) while the model lives, for the draft check


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
    """
    tokenizer = tokenizer or tokenizer_of(model)
    draft_tokenizer = draft_tokenizer or tokenizer_of(draft_model)
    if tokenizer is None or draft_tokenizer is None:
        return
    if isinstance(tokenizer, TokenizerWrapper):
        tokenizer = tokenizer._tokenizer
    eos_main = _eos_ids(tokenizer_of(model) or tokenizer)
    eos_draft = _eos_ids(tokenizer_of(draft_model) or draft_tokenizer)
    if isinstance(draft_tokenizer, TokenizerWrapper):
        draft_tokenizer = draft_tokenizer._tokenizer
    names = f"main {model_name(model)} and draft {model_name(draft_model)}"
    limit = min(output_size(model), output_size(draft_model))
    main_vocab = {i: t for t, i in tokenizer.get_vocab().items() if i < limit}
    draft_vocab = {i: t for t, i in draft_tokenizer.get_vocab().items() if i < limit}
    main_special = special_tokens(*(getattr(tokenizer, w, None) for w in SPECIAL_TOKEN_NAMES), eos_main)
    draft_special = special_tokens(*(getattr(draft_tokenizer, w, None) for w in SPECIAL_TOKEN_NAMES), eos_draft)
    reason = incompatibility(main_vocab, draft_vocab, limit, main_special, draft_special)
    if reason:
        raise IncompatibleDraftError(f"{names} have {reason}")


def _eos_ids(tokenizer) -> set:
    if isinstance(tokenizer, TokenizerWrapper):
        return set(tokenizer.eos_token_ids)
    return {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
