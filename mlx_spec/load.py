"""Models in: MLX folders, hub ids and .gguf files -> (model, tokenizer); draft compatibility check."""

import json
import warnings
from pathlib import Path

import mlx.nn as nn
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import facts
from .compat import SPECIAL_TOKEN_NAMES, incompatibility, metadata_difference, special_tokens


class IncompatibleDraftError(ValueError):
    """The draft model cannot serve the main model (a shared id is another token, or other ids end generation)."""


class DraftMetadataWarning(UserWarning):
    """The draft's bos / eos / pad token strings differ from the main model's, though every id both can emit is
    the same token and the same ids end generation: metadata only, so the draft serves (the output is exact)."""


def load(
    path_or_hub_id: str,
    dtype: str | None = None,
    q_bits: int | None = None,
    *,
    group=None,
    pipeline: bool = False,
    **kwargs,
):
    """Load (model, tokenizer) from an MLX folder, a hub id, or a .gguf file.

    A .gguf file is converted once into the user cache (see `mlx_spec.gguf`);
    `dtype` and `q_bits` choose the converted weights. With `group` (an
    `mx.distributed` group of more than one rank, e.g. `mx.distributed.init()`)
    the model is split over its ranks by mlx-lm's `sharded_load`: tensor
    parallel, or in a pipeline with `pipeline=True` (see `mlx_spec.distributed`).
    Other keyword arguments go to `mlx_lm.load`.
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
    elif not path.exists() and not _is_hub_id(source):
        raise ValueError(f"model not found: {source} is neither a folder nor a hub id (owner/name)")
    try:
        if group is not None and group.size() > 1:
            from .distributed import sharded_load

            model, tokenizer = sharded_load(path if path.exists() else source, group, pipeline, **kwargs)
        else:
            model, tokenizer = mlx_lm.load(str(path if path.exists() else source), **kwargs)
    except Exception as e:  # hub unreachable, repo missing, unsupported model type
        if not path.exists():
            raise ValueError(
                f"could not fetch {source} from the Hugging Face hub (offline, or no such model): {type(e).__name__}"
            ) from e
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"could not load model {source}: {type(e).__name__}: {first_line}") from e
    description = _describe(model, source, path if path.exists() else None)
    known = facts.of(model)  # what `load` knew, while the model lives
    known.source, known.description, known.tokenizer = source, description, tokenizer
    return model, tokenizer


def _is_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def _describe(model, source: str, folder: Path | None) -> str:
    """The model's name, weight type and origin: its GGUF file, Hugging Face id, or folder."""
    weights = model_dtype(model)
    if folder is None:
        return f"{source} ({weights}, Hugging Face hub)"
    from .gguf import SOURCE_KEY

    config = json.loads((folder / "config.json").read_text())
    where = _home_relative(folder.absolute())
    gguf_source = config.get(SOURCE_KEY)
    if gguf_source:
        gguf_file = Path(gguf_source["gguf_file"])
        name = gguf_source.get("gguf_name") or gguf_file.stem
        if name.endswith(" GGUF"):  # the name of the repository that published the file
            name = name[: -len(" GGUF")]
        kind = f"{gguf_source['gguf_type']} " if gguf_source.get("gguf_type") else ""
        return f"{name} ({weights}, from {kind}{gguf_file.name}, {where})"
    hub_id = config.get("_name_or_path") or ""  # set by Hugging Face's tools
    return f"{hub_id} ({weights}, {where})" if _is_hub_id(hub_id) else f"{where} ({weights})"


def _home_relative(path: Path) -> str:
    try:
        return str(Path("~") / path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def model_dtype(model) -> str:
    """The weights' type: 'float32', 'bfloat16', ... or '4-bit' for quantized weights."""
    weights = dict(tree_flatten(model.parameters()))
    if any(k.endswith(".scales") for k in weights):
        bits = getattr(next(m for _, m in model.named_modules() if hasattr(m, "bits")), "bits", "?")
        return f"{bits}-bit"
    return str(next(iter(weights.values())).dtype).replace("mlx.core.", "")


def model_name(model) -> str:
    """One line naming the model and where it came from, e.g. 'Qwen2.5 Coder 1.5B Instruct (float32, from Q4_K_M
    qwen2.5-coder-1.5b-instruct.gguf, ~/.cache/mlx_spec/converted/...)'; models built in code: '<llama model>'."""
    if isinstance(model, str):  # draft_model="mtp"
        return "the main model's MTP layer"
    known = facts.known(model)
    if known is not None and known.description is not None:
        return known.description
    return f"<{type(model).__module__.rsplit('.', 1)[-1]} model>"


def model_source(model) -> str | None:
    """What `load` was given for this model (folder, hub id or .gguf file); None for models built in code;
    "mtp" for draft_model="mtp"."""
    if isinstance(model, str):
        return model
    known = facts.known(model)
    return known.source if known is not None else None


def tokenizer_of(model):
    known = facts.known(model)
    return known.tokenizer if known is not None else None


def output_size(model) -> int:
    """Rows of the model's output layer (its logits' last dimension): its `lm_head`'s, else the vocabulary size
    of its config or of a multimodal wrapper's text config, else the rows of its largest embedding table."""
    heads = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "lm_head" and hasattr(m, "weight")]
    if len(heads) == 1:
        return heads[0].weight.shape[0]
    for part in (model, getattr(model, "language_model", None)):
        args = getattr(part, "args", None)
        for config in (args, getattr(args, "text_config", None)):
            size = config.get("vocab_size") if isinstance(config, dict) else getattr(config, "vocab_size", None)
            if size:
                return int(size)
    tables = [
        m.weight.shape[0] for _, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))
    ]
    if not tables:
        raise ValueError(f"cannot tell the vocabulary size of a {type(model).__module__} model")
    return max(tables)


def check_draft(model, draft_model, tokenizer=None, draft_tokenizer=None):
    """Raise IncompatibleDraftError unless the draft speaks the main model's vocabulary.

    Tokens are compared for every id both models can emit, so an embedding
    table padded beyond the tokenizer is fine; the ids that end generation
    must agree. Special token strings (bos / eos / pad) that differ while
    those agree are metadata: a DraftMetadataWarning naming both values,
    once per pair, and the draft is used.
    Without both tokenizers (models built in code) nothing can be compared.
    The verdict on a pair is kept for the life of both models: comparing two
    large vocabularies takes about half a second, once.
    """
    known = facts.known_pair(model, draft_model)
    if known is None or not known.checked:
        tokenizer = tokenizer if tokenizer is not None else tokenizer_of(model)
        draft_tokenizer = draft_tokenizer if draft_tokenizer is not None else tokenizer_of(draft_model)
        if tokenizer is None or draft_tokenizer is None:
            return
        try:
            note = _compare_vocabularies(model, draft_model, tokenizer, draft_tokenizer)
            if note:  # before the verdict is kept: where warnings are errors, every call raises alike
                warnings.warn(note, DraftMetadataWarning, stacklevel=2)
            incompatible = None
        except IncompatibleDraftError as error:
            incompatible = error.args  # not the error: its traceback would keep the models alive
        known = facts.pair(model, draft_model)  # kept while both models live
        known.checked, known.incompatible = True, incompatible
    if known.incompatible is not None:
        raise IncompatibleDraftError(*known.incompatible)


def _compare_vocabularies(model, draft_model, tokenizer, draft_tokenizer) -> str | None:
    """Raise IncompatibleDraftError, or return the warning on metadata that differs (None if nothing does)."""
    main_loaded, draft_loaded = tokenizer_of(model), tokenizer_of(draft_model)
    eos_main = _eos_ids(main_loaded if main_loaded is not None else tokenizer)  # a wrapper's eos_token_ids too
    eos_draft = _eos_ids(draft_loaded if draft_loaded is not None else draft_tokenizer)
    if isinstance(tokenizer, TokenizerWrapper):
        tokenizer = tokenizer._tokenizer
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
    difference = metadata_difference(main_special, draft_special)
    if difference:
        return (
            f"{names} have different special token strings ({difference}), but every id both can emit is the "
            "same token and the same ids end generation: metadata only, the draft is used"
        )
    return None


def _eos_ids(tokenizer) -> set:
    if isinstance(tokenizer, TokenizerWrapper):
        return set(tokenizer.eos_token_ids)
    return {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
