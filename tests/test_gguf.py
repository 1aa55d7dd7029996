"""GGUF -> MLX conversion on tiny qwen2 / llama files written in the test (offline, seconds)."""

import importlib
import json

import gguf
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import TokenType

import mlx_spec
from mlx_spec import gguf as conv
from mlx_spec.load import model_name

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, CONTEXT = 64, 256, 4, 2, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "d e", "Ġ de", "Ġde f"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Tensor types per GGUF tensor kind (Q4_K data is random blocks: gguf cannot quantize k-quants).
TYPES = {
    "token_embd": Q.F16,
    "output": Q.Q8_0,
    "attn_q": Q.F16,
    "attn_k": Q.F32,
    "attn_v": Q.Q8_0,
    "attn_output": Q.Q4_0,
    "ffn_gate": Q.Q8_0,
    "ffn_up": Q.Q5_0,
    "ffn_down": Q.Q4_K,
}
MLX_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def vocabulary():
    tokens = byte_chars() + [m.replace(" ", "") for m in MERGES] + SPECIALS + ["<tool_call>"]
    types = [TokenType.NORMAL] * (len(tokens) - 4) + [TokenType.CONTROL] * 3 + [TokenType.USER_DEFINED]
    return tokens, types


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of llama Q/K weights."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_q4_k(rng, rows: int, cols: int) -> np.ndarray:
    """Random but well-formed Q4_K blocks (144 bytes per 256 values, with sane f16 scales)."""
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:4] = np.array([0.004, 0.002], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def add_tensor(writer, rng, name: str, values: np.ndarray, qtype) -> np.ndarray:
    """Add `values` as `qtype`; return what the GGUF holds, dequantized."""
    if qtype == Q.Q4_K:
        data = random_q4_k(rng, *values.shape)
    elif qtype == Q.F32:
        data = values.astype(np.float32)
    elif qtype == Q.F16:
        data = values.astype(np.float16)
    else:
        data = gguf.quants.quantize(values, qtype)
    writer.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    return gguf.quants.dequantize(data, qtype).reshape(values.shape)


def write_model(path, arch="qwen2", *, eos=None, tied=False, rope_freqs=False, seed=0, name=None, file_type=None):
    """Write a tiny random GGUF model; return its weights in mlx-lm (Hugging Face) layout.

    Like the real files, qwen2 adds no BOS token and llama (llama 3) does. `name` and `file_type`
    (a gguf.LlamaFileType) go into the general metadata when given.
    """
    rng = np.random.default_rng(seed)
    tokens, types = vocabulary()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>") if eos is None else eos)
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(arch == "llama")
    writer.add_chat_template(TEMPLATE)
    if name is not None:
        writer.add_name(name)
    if file_type is not None:
        writer.add_file_type(file_type)

    def tensor(gguf_name, mlx_name, shape, qtype, scale=0.2):
        values = (rng.standard_normal(shape) * scale).astype(np.float32)
        kind = gguf_name.split(".")[-2]
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            assert qtype in (Q.F32, Q.F16), "the test's reference needs element-wise types here"
            heads = HEADS if kind == "attn_q" else KV_HEADS
            add_tensor(writer, rng, gguf_name, llama_cpp_permute(values, heads), qtype)
            weights[mlx_name] = gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype)
        else:
            weights[mlx_name] = add_tensor(writer, rng, gguf_name, values, qtype)

    weights = {}
    vocab, kv_dim = len(tokens), HIDDEN // HEADS * KV_HEADS
    tensor("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN), TYPES["token_embd"])
    if not tied:
        tensor("output.weight", "lm_head.weight", (vocab, HIDDEN), TYPES["output"])
    tensor("output_norm.weight", "model.norm.weight", (HIDDEN,), Q.F32)
    if rope_freqs:
        writer.add_tensor(
            "rope_freqs.weight", conv.llama3_rope_factors(LLAMA3_SCALING, HIDDEN // HEADS, 10000.0).astype(np.float32)
        )
    shapes = {
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (kv_dim, HIDDEN),
        "attn_v": (kv_dim, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }
    for layer in range(LAYERS):
        prefix, mlx_prefix = f"blk.{layer}", f"model.layers.{layer}"
        for kind, shape in shapes.items():
            tensor(f"{prefix}.{kind}.weight", f"{mlx_prefix}.{MLX_NAMES[kind]}.weight", shape, TYPES[kind])
        for kind in ("attn_norm", "ffn_norm"):
            tensor(f"{prefix}.{kind}.weight", f"{mlx_prefix}.{MLX_NAMES[kind]}.weight", (HIDDEN,), Q.F32, 1.0)
        if arch == "qwen2":
            for kind, size in (("attn_q", HIDDEN), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                tensor(f"{prefix}.{kind}.bias", f"{mlx_prefix}.{MLX_NAMES[kind]}.bias", (size,), Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def reference_logits(arch, weights, tokens, *, tied=False, rope_scaling=None, dtype=mx.float32, q_bits=None):
    """Logits of the mlx-lm model class holding `weights` directly (config written by hand)."""
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    args = module.ModelArgs(
        model_type=arch,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        intermediate_size=FFN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rms_norm_eps=1e-6,
        vocab_size=len(vocabulary()[0]),
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        max_position_embeddings=CONTEXT,
        rope_scaling=rope_scaling,
    )
    model = module.Model(args)
    model.load_weights([(k, mx.array(v).astype(dtype)) for k, v in weights.items()], strict=True)
    if q_bits:
        nn.quantize(model, group_size=64, bits=q_bits)
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def converted_logits(folder, tokens) -> np.ndarray:
    model, _ = mlx_lm.load(str(folder))
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


TOKENS = [5, 70, 261, 100, 263, 44, 259, 200, 3]


@pytest.mark.parametrize(
    "arch, tied, rope_freqs", [("qwen2", False, False), ("llama", True, False), ("llama", False, True)]
)
def test_converted_model_matches_the_weights(tmp_path, arch, tied, rope_freqs):
    weights = write_model(tmp_path / "m.gguf", arch, tied=tied, rope_freqs=rope_freqs)
    out = conv.convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=lambda _: None)

    saved = mx.load(str(out / "model.safetensors"))
    assert set(saved) == set(weights)
    for name, values in weights.items():
        np.testing.assert_allclose(np.array(saved[name]), values, rtol=1e-6, atol=1e-7, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert config.get("rope_scaling") == (LLAMA3_SCALING if rope_freqs else None)

    expected = reference_logits(arch, weights, TOKENS, tied=tied, rope_scaling=config.get("rope_scaling"))
    np.testing.assert_allclose(converted_logits(out, TOKENS), expected, atol=1e-4, rtol=1e-4)


def test_quantized_values_round_trip(tmp_path):
    """The GGUF's quantized weights come back within their quantization error of the originals."""
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((64, 256)) * 0.2).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "qwen2")
    held = {
        qtype: add_tensor(writer, rng, f"{qtype.name}.weight", values, qtype)
        for qtype in (Q.F32, Q.F16, Q.Q8_0, Q.Q5_0, Q.Q4_0)
    }
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for qtype, tolerance in ((Q.F32, 0), (Q.F16, 1e-3), (Q.Q8_0, 0.01), (Q.Q5_0, 0.06), (Q.Q4_0, 0.12)):
        assert np.abs(held[qtype] - values).max() <= tolerance, qtype.name


def test_tokenizer_encodes_decodes_and_templates(tmp_path):
    write_model(tmp_path / "m.gguf")
    out = conv.convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=lambda _: None)
    _, tokenizer = mlx_lm.load(str(out))
    tokens, _ = vocabulary()

    ids = tokenizer.encode(" the def")
    assert ids == [tokens.index("Ġthe"), tokens.index("Ġdef")]
    text = "héllo 世界\n  the<|im_end|> 12 <tool_call>"
    ids = tokenizer.encode(text)
    assert tokens.index("<|im_end|>") in ids and tokens.index("<tool_call>") in ids
    assert tokenizer.decode(ids) == text

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.decode(prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token_ids == {tokens.index("<|im_end|>")}


def test_llama_tokenizer_adds_bos(tmp_path):
    write_model(tmp_path / "m.gguf", "llama", tied=True)
    out = conv.convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=lambda _: None)
    _, tokenizer = mlx_lm.load(str(out))
    tokens, _ = vocabulary()
    assert tokenizer.encode(" the 1234") == [
        tokens.index("<|endoftext|>"),
        tokens.index("Ġthe"),
        *(tokens.index(c) for c in "Ġ123"),
        tokens.index("4"),
    ]


def test_wrong_eos_is_replaced_by_the_chat_end_token(tmp_path):
    """Like the real Qwen files' metadata said: eos id 1, an ordinary token."""
    write_model(tmp_path / "m.gguf", eos=1)
    out = conv.convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=lambda _: None)
    im_end = vocabulary()[0].index("<|im_end|>")

    assert json.loads((out / "config.json").read_text())["eos_token_id"] == im_end
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [im_end]
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    _, tokenizer = mlx_lm.load(str(out))
    assert tokenizer.eos_token_ids == {im_end}


def test_control_eos_is_kept_and_chat_end_added(tmp_path):
    tokens, _ = vocabulary()
    write_model(tmp_path / "m.gguf", eos=tokens.index("<|endoftext|>"))
    out = conv.convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=lambda _: None)
    eos_ids = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert eos_ids == [tokens.index("<|endoftext|>"), tokens.index("<|im_end|>")]


@pytest.mark.parametrize("q_bits", [4, 8])
def test_requantized_model_loads_and_stays_close(tmp_path, q_bits):
    weights = write_model(tmp_path / "m.gguf")
    out = conv.convert_gguf(
        tmp_path / "m.gguf", tmp_path / "out", dtype="bfloat16", q_bits=q_bits, progress=lambda _: None
    )
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": q_bits, "mode": "affine"}
    saved = mx.load(str(out / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.scales" in saved
    assert saved["model.norm.weight"].dtype == mx.bfloat16

    expected = reference_logits("qwen2", weights, TOKENS, dtype=mx.bfloat16, q_bits=q_bits)
    np.testing.assert_allclose(converted_logits(out, TOKENS), expected, atol=1e-5)


def test_float16_weights(tmp_path):
    weights = write_model(tmp_path / "m.gguf")
    out = conv.convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float16", progress=lambda _: None)
    saved = mx.load(str(out / "model.safetensors"))
    assert {a.dtype for a in saved.values()} == {mx.float16}
    expected = reference_logits("qwen2", weights, TOKENS, dtype=mx.float16)
    np.testing.assert_allclose(converted_logits(out, TOKENS), expected, atol=1e-5)


def test_unknown_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"architecture 'phi3' in .*phi\.gguf"):
        conv.convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_options_and_failed_writes_leave_no_folder(tmp_path, monkeypatch):
    write_model(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="q_bits 3"):
        conv.convert_gguf(tmp_path / "m.gguf", tmp_path / "out", q_bits=3)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        conv.convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="int8")

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(conv.mx, "save_safetensors", disk_full)
    with pytest.raises(OSError, match="disk full"):
        conv.convert_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_convert_cached_reuses_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_SPEC_CACHE", str(tmp_path / "cache"))
    write_model(tmp_path / "m.gguf")
    first = conv.convert_cached(tmp_path / "m.gguf", progress=lambda _: None)
    assert first.parent == tmp_path / "cache" / "converted"
    assert first.name.startswith(f"m-{conv.default_dtype()}-")

    def fail(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(conv, "convert_gguf", fail)
    assert conv.convert_cached(tmp_path / "m.gguf") == first
    mlx_lm.load(str(first))

    # A folder converted before converters recorded their source gets the record from the file's header.
    config_path = first / "config.json"
    recorded = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({k: v for k, v in recorded.items() if k != conv.SOURCE_KEY}))
    assert conv.convert_cached(tmp_path / "m.gguf") == first
    assert json.loads(config_path.read_text()) == recorded


def test_the_folder_records_its_source_and_the_model_is_named_after_it(tmp_path, monkeypatch):
    write_model(tmp_path / "m.gguf", name="Tiny Coder 1B Instruct GGUF", file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M)
    out = conv.convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float16", progress=lambda _: None)
    source = json.loads((out / "config.json").read_text())[conv.SOURCE_KEY]
    assert source == dict(
        gguf_file=str(tmp_path / "m.gguf"), gguf_name="Tiny Coder 1B Instruct GGUF", gguf_type="Q4_K_M"
    )
    model, _ = mlx_spec.load(str(out))
    assert model_name(model) == f"Tiny Coder 1B Instruct (float16, from Q4_K_M m.gguf, {out})"

    # Without a name in the file, the file's; a folder under the home directory is shown from ~.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MLX_SPEC_CACHE", str(tmp_path / "cache"))
    write_model(tmp_path / "plain.gguf")
    model, _ = mlx_spec.load(str(tmp_path / "plain.gguf"), dtype="float32", q_bits=4)
    folder = conv.convert_cached(tmp_path / "plain.gguf", dtype="float32", q_bits=4)
    assert model_name(model) == f"plain (4-bit, from plain.gguf, ~/cache/converted/{folder.name})"


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_SPEC_CACHE", str(tmp_path))
    assert conv.cache_root() == tmp_path
    monkeypatch.delenv("MLX_SPEC_CACHE")
    assert conv.cache_root().parts[-2:] == (".cache", "mlx_spec")
