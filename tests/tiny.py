"""Tiny random models for the tests: several architectures, drafts that agree often, a toy tokenizer."""

import copy

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.generate import generate_step
from mlx_lm.models import gemma3_text, llama, qwen2

VOCAB = 97


def make_model(
    arch: str = "llama",
    layers: int = 2,
    seed: int = 0,
    vocab: int = VOCAB,
    window: int = 8,
    scale: float = 2.0,
    hidden: int = 64,
):
    """A float32 model with random weights; `scale` multiplies them (sharper logits)."""
    mx.random.seed(seed)
    common = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab,
    )
    if arch == "llama":
        model = llama.Model(
            llama.ModelArgs(model_type="llama", rope_theta=10000.0, tie_word_embeddings=False, **common)
        )
    elif arch == "qwen2":
        model = qwen2.Model(qwen2.ModelArgs(model_type="qwen2", **common))
    elif arch == "gemma3_text":
        model = gemma3_text.Model(
            gemma3_text.ModelArgs(
                model_type="gemma3_text",
                head_dim=16,
                query_pre_attn_scalar=16,
                sliding_window=window,
                sliding_window_pattern=2,
                **common,
            )
        )
    else:
        raise ValueError(arch)
    if scale != 1.0:
        model.update(tree_map(lambda w: w * scale, model.parameters()))
    mx.eval(model.parameters())
    return model


def repetitive(model, attention: float = 0.01):
    """`model` with its attention outputs scaled by `attention`: nearly a bigram model, whose greedy text
    falls into cycles that prompt lookup can copy, with a few departures where the context still matters."""
    model.update(
        tree_unflatten([(k, w * attention if "o_proj" in k else w) for k, w in tree_flatten(model.parameters())])
    )
    mx.eval(model.parameters())
    return model


def perturbed(model, noise: float, seed: int = 1):
    """A copy of `model` with Gaussian noise of relative size `noise` on every weight: a draft that agrees often."""
    mx.random.seed(seed)
    draft = copy.deepcopy(model)
    params = [(k, w + noise * mx.std(w) * mx.random.normal(w.shape)) for k, w in tree_flatten(model.parameters())]
    draft.update(tree_unflatten(params))
    mx.eval(draft.parameters())
    return draft


def first_layers(model, num_layers: int):
    """A copy of `model` keeping only its first `num_layers` blocks (a self-draft)."""
    draft = copy.deepcopy(model)
    inner = draft.model
    inner.layers = inner.layers[:num_layers]
    if hasattr(draft, "args"):
        draft.args = copy.copy(draft.args)
        draft.args.num_hidden_layers = num_layers
    return draft


def quantized(model, bits: int = 4):
    q = copy.deepcopy(model)
    nn.quantize(q, group_size=32, bits=bits)
    mx.eval(q.parameters())
    return q


def reference(model, prompt, max_tokens, **kwargs):
    """Plain decoding with mlx-lm's generate_step: the output we must reproduce."""
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kwargs)]


def spec(prompt, model, draft, **kwargs):
    from mlx_spec import speculative_generate_step

    return [t for t, _, _ in speculative_generate_step(prompt, model, draft, **kwargs)]


def toy_tokenizer(vocab: int = VOCAB, eos: str = "</s>", prefix: str = "w"):
    """A word-level tokenizer: ids 0,1,2 = <s>, </s>, <unk>; id i >= 3 = f"{prefix}{i}"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<s>": 0, "</s>": 1, "<unk>": 2}
    words.update({f"{prefix}{i}": i for i in range(3, vocab)})
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token=eos, unk_token="<unk>")
