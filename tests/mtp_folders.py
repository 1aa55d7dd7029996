"""Tiny random Qwen3.5 checkpoints in the Hugging Face layout, with MTP tensors (`mtp.*`), for test_mtp.py."""

import copy
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import qwen3_5
from tiny import toy_tokenizer
from tiny_folders import save_tokenizer

from mlx_spec.mtp import MTPHead

HIDDEN = 64
ZERO_CENTRED = ("layernorm.weight", "model.norm.weight", "q_norm.weight", "k_norm.weight")  # as mlx-lm's sanitize


def text_config(vocab: int, layers: int = 4) -> dict:
    return {
        "model_type": "qwen3_5_text",
        "hidden_size": HIDDEN,
        "num_hidden_layers": layers,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 1024,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 3,
        "full_attention_interval": 2,
        "tie_word_embeddings": False,
        "mtp_num_hidden_layers": 1,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [2, 1, 1],
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
    }


def next_config(vocab: int) -> dict:
    """Qwen3-Next: the Qwen3.5 text model's sizes, mixture-of-experts layers but the first, no multimodal wrapper."""
    config = {k: v for k, v in text_config(vocab).items() if k != "rope_parameters"}
    moe = dict(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0])
    moe |= dict(shared_expert_intermediate_size=32, moe_intermediate_size=32, norm_topk_prob=True)
    return config | moe | dict(model_type="qwen3_next", rope_theta=10000.0, partial_rotary_factor=0.5)


def build(vocab: int, seed: int = 0, mixing: float = 0.15, scale: float = 2.0, kind: str = "qwen3_5"):
    """(model, config, mtp weights as MTPHead names): a random Qwen3.5 (or Qwen3-Next) whose attention and MLP
    outputs are scaled by `mixing` (the next token depends mostly on the current one, but context still matters)
    and an MTP layer built to guess the token after next: it reads the next token's embedding as the main
    model's first layers would, so that its drafts are often, not always, right."""
    from mlx_lm.models import qwen3_next

    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    if kind == "qwen3_5":
        config = {"model_type": "qwen3_5", "text_config": text_config(vocab)}
        model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(copy.deepcopy(config)))
    else:
        config = next_config(vocab)
        model = qwen3_next.Model(qwen3_next.ModelArgs.from_dict(copy.deepcopy(config)))
    params = []
    for key, w in tree_flatten(model.parameters()):
        w = w.astype(mx.float32)
        if w.ndim >= 2 and "embed_tokens" not in key:
            w = w * scale
            if key.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
                w = w * mixing
        elif w.ndim == 1 and w.size > 1 and key.endswith("norm.weight"):
            w = w * mx.array(1.0 + rng.normal(0.0, 0.2, w.shape).astype(np.float32))
        params.append((key, w))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    text = getattr(model, "language_model", model)
    args = text.args
    head = MTPHead(type(text.model.layers[1])(args, 1), args.hidden_size, args.rms_norm_eps)
    donor = text.model.layers[1]  # a full-attention layer of the body: its weights, with some noise
    head.layers[0].update(
        tree_unflatten(
            [
                (k, w + 0.3 * mx.std(w) * mx.random.normal(w.shape) if w.ndim >= 2 else w)
                for k, w in tree_flatten(donor.parameters())
            ]
        )
    )
    eye = mx.eye(HIDDEN)
    head.fc.weight = mx.concatenate([eye * 2.0, 0.3 * mx.random.normal((HIDDEN, HIDDEN)) / HIDDEN**0.5], axis=1)
    head.norm.weight = text.model.norm.weight
    mx.eval(head.parameters())
    return model, config, dict(tree_flatten(head.parameters()))


def write_folder(folder, vocab: int = 97, seed: int = 0, with_mtp: bool = True, **kwargs) -> Path:
    """A Hugging Face Qwen3.5 (or, kind="qwen3_next", Qwen3-Next) folder (model.language_model.* tensors (Qwen3.5)
    or model.*, conv1d as (C, 1, K), one tensor per expert, zero-centred norms stored as w - 1, `mtp.*` tensors)
    with a word-level tokenizer, as `mlx_spec.load` reads it."""
    model, config, mtp = build(vocab, seed, **kwargs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = {}
    for key, w in tree_flatten(model.parameters()):
        name = key.replace("language_model.model.", "model.language_model.").replace(
            "language_model.lm_head", "lm_head"
        )
        if "conv1d.weight" in key:
            w = w.moveaxis(2, 1)  # (C, K, 1) -> Hugging Face's (C, 1, K)
        elif w.ndim == 1 and key.endswith(ZERO_CENTRED):
            w = w - 1.0  # Qwen3.5 stores (1 + w) norms as w
        hf |= _per_expert(name, w)
    if with_mtp:
        for key, w in mtp.items():
            hf |= _per_expert(f"mtp.{key}", w - 1.0 if w.ndim == 1 and "norm" in key.rsplit(".", 2)[-2] else w)
    mx.save_safetensors(str(folder / "model.safetensors"), hf, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(toy_tokenizer(vocab), folder)
    return folder


def _per_expert(name: str, w: mx.array) -> dict:
    """Hugging Face's layout of an expert weight: one tensor per expert (mlx-lm stacks them in `switch_mlp`)."""
    if ".switch_mlp." not in name:
        return {name: w}
    return {name.replace("switch_mlp", f"experts.{e}"): w[e] for e in range(w.shape[0])}


DEEPSEEK_LAYERS = 61  # mlx-lm's deepseek_v3 drops the MTP layer only at index 61, DeepSeek-V3's own


def write_deepseek_folder(folder, vocab: int = 97, seed: int = 0, mixing: float = 0.02) -> tuple[Path, dict]:
    """A tiny DeepSeek-V3 folder (61 layers, MLA, MoE) whose 62nd layer is an MTP layer in the Hugging Face
    layout (per-expert tensors, MLA's kv_b_proj), with enorm / hnorm / eh_proj / shared_head, made to guess the
    token after next as the Qwen one is. Returns the folder and the MTP decoder layer's weights as mlx-lm's
    class holds them."""
    from mlx_lm.models import deepseek_v3

    mx.random.seed(seed)
    config = dict(
        model_type="deepseek_v3", vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=DEEPSEEK_LAYERS, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=1024, rope_theta=10000.0,
    )  # fmt: skip
    args = deepseek_v3.ModelArgs.from_dict(config)
    model = deepseek_v3.Model(args)
    mtp_layer = deepseek_v3.DeepseekV3DecoderLayer(args, DEEPSEEK_LAYERS)
    for module in (model, mtp_layer):
        module.update(
            tree_unflatten(
                [
                    (k, w * mixing if k.endswith(("o_proj.weight", "down_proj.weight")) else w)
                    for k, w in tree_flatten(module.parameters())
                ]
            )
        )
    mx.eval(model.parameters(), mtp_layer.parameters())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    prefix = f"model.layers.{DEEPSEEK_LAYERS}."
    for key, w in tree_flatten(mtp_layer.parameters()):
        if ".switch_mlp." in key:  # Hugging Face: one tensor per expert
            for e in range(w.shape[0]):
                weights[prefix + key.replace("switch_mlp", f"experts.{e}")] = w[e]
        elif key == "self_attn.embed_q.weight":  # Hugging Face: MLA's kv_b_proj, split by mlx-lm's sanitize
            unembed = dict(tree_flatten(mtp_layer.parameters()))["self_attn.unembed_out.weight"]
            kv_b = mx.concatenate([w.swapaxes(-1, -2), unembed], axis=1)
            weights[prefix + "self_attn.kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1])
        elif key != "self_attn.unembed_out.weight":
            weights[prefix + key] = w
    eye = mx.eye(HIDDEN)
    weights[prefix + "eh_proj.weight"] = mx.concatenate([eye * 2.0, 0.3 * mx.random.normal((HIDDEN, HIDDEN)) / 8], 1)
    weights[prefix + "enorm.weight"] = mx.ones(HIDDEN)
    weights[prefix + "hnorm.weight"] = mx.ones(HIDDEN)
    weights[prefix + "shared_head.norm.weight"] = model.model.norm.weight
    weights[prefix + "shared_head.head.weight"] = model.lm_head.weight
    weights[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    toy_tokenizer(vocab).save_pretrained(str(folder))
    return folder, dict(tree_flatten(mtp_layer.parameters()))
