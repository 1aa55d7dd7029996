"""Tiny chat models for the server's tools, reasoning and structured output: a byte-level BPE tokenizer with
Qwen's special tokens and a Qwen2.5-style chat template with tools; a random model, and a scripted one (a
bigram table in weights) whose greedy reply to any conversation is a text the test chooses."""

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models import llama
from tiny import make_model, perturbed
from tiny_folders import save_tokenizer, save_weights

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOOL_TAGS = ["<tool_call>", "</tool_call>"]
THINK_TAGS = ["<think>", "</think>"]

CHAT_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> \
XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or \
(message.role == 'assistant' and not message.tool_calls) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}{% for tool_call in message.tool_calls %}\
{% set tool_call = tool_call.function if tool_call.function is defined else tool_call %}<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking %}<think>
{% endif %}{% endif %}"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of bytes to printable characters (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer(pieces=(), thinking: bool = False):
    """Byte-level BPE without merges (every text encodes byte by byte), plus `pieces`: whole texts that are one
    token each (decoded, never produced by encoding), and Qwen's special tokens and tool (and think) tags."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    for piece in pieces:
        token = "".join(chars[b] for b in piece.encode())
        if piece not in SPECIAL + TOOL_TAGS + THINK_TAGS and token not in vocab:
            vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL)
    core.add_tokens(TOOL_TAGS + (THINK_TAGS if thinking else []))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )


def piece_id(tokenizer, piece: str) -> int:
    """The id of a one-token piece (a tag, or a text given to byte_tokenizer)."""
    token = "".join(_bytes_to_unicode()[b] for b in piece.encode()) if piece not in tokenizer.get_vocab() else piece
    return tokenizer.get_vocab()[token]


def scripted_model(tokenizer, script: list[str]):
    """A llama whose next token is a fixed function of the last one: after a newline (the end of the assistant's
    turn opening) it says the one-token pieces of `script` in order, then <|im_end|>; after any other token it
    ends. Attention and MLPs are zeroed; the embedding is one-hot and the output layer holds the table."""
    vocab = len(tokenizer)
    hidden = -(-vocab // 8) * 8
    model = llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=hidden,
            num_hidden_layers=1,
            intermediate_size=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=vocab,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
    )
    model.update(tree_map(lambda w: mx.zeros_like(w), model.parameters()))
    end = piece_id(tokenizer, "<|im_end|>")
    ids = [piece_id(tokenizer, "\n")] + [piece_id(tokenizer, p) for p in script]
    table = [end] * vocab
    for a, b in zip(ids, ids[1:] + [end]):
        table[a] = b
    embed = mx.zeros((vocab, hidden))
    embed[mx.arange(vocab), mx.arange(vocab)] = 1.0
    head = mx.zeros((vocab, hidden))
    head[mx.array(table), mx.arange(vocab)] = 10.0
    model.model.embed_tokens.weight = embed
    model.lm_head.weight = head
    model.model.norm.weight = mx.ones((hidden,))
    for layer in model.model.layers:
        layer.input_layernorm.weight = mx.ones((hidden,))
        layer.post_attention_layernorm.weight = mx.ones((hidden,))
    mx.eval(model.parameters())
    return model


def random_model(tokenizer, seed: int = 0):
    """A tiny random llama over the tokenizer's vocabulary, and a draft that agrees with it often."""
    model = make_model("llama", vocab=len(tokenizer), seed=seed)
    return model, perturbed(model, 0.01)


def save_chat_folder(model, tokenizer, folder) -> Path:
    """An MLX model folder (config, weights, tokenizer with the tools template) that mlx_spec.load reads."""
    folder = save_weights(model, folder)
    save_tokenizer(tokenizer, folder, CHAT_TEMPLATE)
    return folder
