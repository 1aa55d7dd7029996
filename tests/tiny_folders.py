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


def save_model_folder(model, tokenizer, folder, max_position_embeddings=None) -> Path:
    """Write `model` and `tokenizer` as an MLX model folder that `mlx_spec.load` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in asdict(model.args).items() if v is not None}
    if max_position_embeddings is not None:
        config["max_position_embeddings"] = max_position_embeddings
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    tokenizer.backend_tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer.save_pretrained(str(folder))
    # transformers 5 would rebuild a tokenizer of class "TokenizersBackend" as the model type's own (byte-level BPE)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    tokenizer_config.pop("backend", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
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
