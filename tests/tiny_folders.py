"""Tiny MLX model folders on disk (config.json, safetensors, tokenizer with a chat template) for CLI tests."""

import json
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tiny import make_model, perturbed, toy_tokenizer
from tokenizers import decoders

# Role markers and turn ends are vocabulary words, so a rendered conversation tokenizes back exactly.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}w3{% elif m.role == 'user' %}w4{% else %}w5{% endif %}"
    " {{ m.content }} </s> "
    "{% endfor %}"
    "{% if add_generation_prompt %}w5 {% endif %}"
)


def save_weights(model, folder, **config) -> Path:
    """`folder` (made) with config.json (`model.args`, updated by `config`) and model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**{k: v for k, v in asdict(model.args).items() if v is not None}, **config}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return folder


def save_tokenizer(tokenizer, folder, chat_template: str = CHAT_TEMPLATE):
    """`tokenizer` into `folder`, with `chat_template`, as a tokenizer that transformers reads back as it is."""
    tokenizer.save_pretrained(str(folder))
    # transformers 5 would rebuild a tokenizer of class "TokenizersBackend" as the model type's own (byte-level BPE)
    tokenizer_config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=chat_template)
    tokenizer_config.pop("backend", None)
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def save_model_folder(model, tokenizer, folder, max_position_embeddings=None) -> Path:
    """Write `model` and `tokenizer` as an MLX model folder that `mlx_spec.load` reads."""
    config = {} if max_position_embeddings is None else {"max_position_embeddings": max_position_embeddings}
    folder = save_weights(model, folder, **config)
    tokenizer.backend_tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    save_tokenizer(tokenizer, folder)
    return folder


def write_tiny_pair(root, max_position_embeddings=None):
    """Folders `main` (a tiny random llama) and `draft` (it, perturbed) under `root`; returns their paths.

    Not qwen2: transformers 5 rebuilds the tokenizer of every qwen2 folder as Qwen2's byte-level BPE.
    """
    main = make_model("llama", layers=2)
    draft = perturbed(main, 0.01)
    root = Path(root)
    return (
        save_model_folder(main, toy_tokenizer(), root / "main", max_position_embeddings),
        save_model_folder(draft, toy_tokenizer(), root / "draft", max_position_embeddings),
    )
