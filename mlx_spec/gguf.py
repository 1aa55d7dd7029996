"""Convert GGUF model files (llama.cpp) into MLX model folders that `mlx_lm.load` reads.

Supports the `qwen2` and `llama` architectures with a byte-level BPE (`gpt2`) vocabulary.
"""

import hashlib
import importlib
import json
import math
import mmap
import os
import shutil
import struct
from pathlib import Path
from typing import NamedTuple

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

ARCHITECTURES = ("qwen2", "llama")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
Q_BITS = (4, 8)
SOURCE_KEY = "mlx_spec_source"  # config.json entry naming the GGUF file a folder was converted from

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
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

# Pre-tokenizer split regexes, as in the models' Hugging Face tokenizer.json files.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "qwen2": _QWEN2_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "default": None,
    "gpt-2": None,
}
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>")


def cache_root() -> Path:
    """The mlx_spec cache folder: `$MLX_SPEC_CACHE`, else `~/.cache/mlx_spec`."""
    env = os.environ.get("MLX_SPEC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mlx_spec"


def default_dtype() -> str:
    """float16 on Apple GPUs; float32 on CPUs (float32 matmuls use BLAS there, float16 ones do not)."""
    return "float16" if mx.metal.is_available() else "float32"


def default_q_bits() -> int | None:
    """4-bit re-quantization on Apple GPUs (the fast path there), none on CPUs."""
    return 4 if mx.metal.is_available() else None


def converted_dir(name: str, dtype: str, q_bits: int | None, key: str) -> Path:
    """The cache folder of GGUF model `name` converted to `dtype` / `q_bits`; `key` identifies the file."""
    suffix = f"-q{q_bits}" if q_bits else ""
    return cache_root() / "converted" / f"{name}-{dtype}{suffix}-{key}"


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def convert_cached(gguf_path, dtype=None, q_bits=None, *, name=None, key=None, progress=print) -> Path:
    """Convert `gguf_path` once into the cache and return the folder (reused on later calls).

    `dtype` / `q_bits` default to this platform's fast path (`q_bits=0`: no re-quantization); `name`
    defaults to the file's stem, `key` (identifying the file's content) to a hash of its size and mtime.
    """
    gguf_path = Path(gguf_path)
    dtype = dtype or default_dtype()
    q_bits = default_q_bits() if q_bits is None else q_bits or None
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file not found: {gguf_path}")
    out_dir = converted_dir(name or gguf_path.stem, dtype, q_bits, key or _file_key(gguf_path))
    if not out_dir.is_dir():
        convert_gguf(gguf_path, out_dir, dtype=dtype, q_bits=q_bits, progress=progress)
    else:
        record_source(out_dir, gguf_path)
    return out_dir


def record_source(folder: Path, gguf_path: Path) -> None:
    """Add the source record to a folder converted before converters wrote one (read from the GGUF header)."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {SOURCE_KEY: None}
    if SOURCE_KEY in config:
        return
    fields = read_header(gguf_path).fields
    config[SOURCE_KEY] = _source(fields.get("general.name"), fields.get("general.file_type"), gguf_path)
    tmp = folder / f".config.json.tmp-{os.getpid()}"
    _write_json(tmp, config)
    os.replace(tmp, config_path)


def convert_gguf(gguf_path, out_dir, dtype="float32", q_bits=None, q_group_size=64, progress=print) -> Path:
    """Convert GGUF file `gguf_path` into the MLX model folder `out_dir` (which must not exist yet).

    Weights are dequantized and stored as `dtype`, then optionally re-quantized by MLX to `q_bits`.
    The folder is written next to `out_dir` under a temporary name and renamed when complete.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_options(dtype, q_bits, q_group_size)
    if out_dir.exists():
        raise ValueError(f"output folder already exists: {out_dir}")
    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {gguf_path} (supported: {', '.join(ARCHITECTURES)})"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        _write_folder(reader, arch, gguf_path, tmp_dir, dtype, q_bits, q_group_size, progress)
        os.rename(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    progress(f"converted {gguf_path.name} -> {out_dir}")
    return out_dir


def _check_options(dtype, q_bits, q_group_size) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if q_bits not in (None, 0, *Q_BITS):
        raise ValueError(f"unsupported q_bits {q_bits!r} (choose from {Q_BITS}, or None/0 for none)")
    if q_group_size not in (32, 64, 128):
        raise ValueError(f"unsupported q_group_size {q_group_size!r} (choose from 32, 64, 128)")


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _write_folder(reader, arch, gguf_path, folder, dtype, q_bits, q_group_size, progress) -> None:
    folder.mkdir(parents=True)
    config = _model_config(reader, arch, gguf_path)
    weights = _load_weights(reader, arch, config, DTYPES[dtype], gguf_path, progress)
    tokenizer, eos_ids = _tokenizer(reader, gguf_path, config["max_position_embeddings"])
    config["eos_token_id"] = eos_ids[0]
    config["bos_token_id"] = tokenizer.bos_token_id
    config[SOURCE_KEY] = _source(_field(reader, "general.name"), _field(reader, "general.file_type"), gguf_path)
    if q_bits:
        config["quantization"] = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}
        config["quantization_config"] = config["quantization"]
    weights = _checked_weights(config, weights, q_bits, q_group_size)
    progress(f"writing {len(weights)} {dtype} tensors" + (f" ({q_bits}-bit)" if q_bits else ""))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    _write_json(folder / "config.json", config)
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos_ids, "pad_token_id": tokenizer.pad_token_id},
    )
    _save_tokenizer(tokenizer, folder)


def _source(general_name, file_type, gguf_path: Path) -> dict:
    """The GGUF file, its `general.name` and its weight type (e.g. Q4_K_M), for `mlx_spec.load.model_name`."""
    try:
        kind = gguf.LlamaFileType(file_type).name.split("_", 1)[-1]  # MOSTLY_Q4_K_M, ALL_F32, GUESSED
    except ValueError:  # absent or unknown
        kind = None
    return {"gguf_file": str(gguf_path.absolute()), "gguf_name": general_name, "gguf_type": kind}


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """Save the tokenizer so transformers 4.x and 5.x both load it (class name and template in the config)."""
    tokenizer.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    _write_json(config_path, config)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _model_config(reader, arch, gguf_path) -> dict:
    def meta(key, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{gguf_path}: missing GGUF metadata {arch}.{key}")
        return value

    shapes = {t.name: t.shape for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{gguf_path}: no token_embd.weight tensor")
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(meta("block_count")),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "rms_norm_eps": _float32(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(meta("rope.freq_base", 10000.0)),
        "vocab_size": int(shapes["token_embd.weight"][1]),
        "max_position_embeddings": int(meta("context_length")),
        "tie_word_embeddings": "output.weight" not in shapes,
        "rope_traditional": False,
    }
    head_dim = int(meta("attention.key_length", hidden // heads))
    if arch == "llama":
        config["head_dim"] = head_dim
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
        config["mlp_bias"] = "blk.0.ffn_up.bias" in shapes
    elif head_dim != hidden // heads:
        raise ValueError(f"{gguf_path}: qwen2 head size {head_dim} != hidden size / heads")
    scaling = _rope_scaling(reader, arch, gguf_path, head_dim, config["rope_theta"])
    if scaling:
        config["rope_scaling"] = scaling
    return config


def _float32(value) -> float:
    """A GGUF float32 as the shortest decimal that reads back as it (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def _rope_scaling(reader, arch, gguf_path, head_dim, base) -> dict | None:
    """RoPE scaling from the metadata, or llama 3's `rope_freqs` tensor."""
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        return _llama3_scaling(np.asarray(freqs.data, dtype=np.float32), head_dim, base, gguf_path)
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        return {"type": "yarn", "factor": factor, "original_max_position_embeddings": int(original)}
    raise ValueError(f"{gguf_path}: unsupported RoPE scaling type {kind!r}")


def llama3_rope_factors(scaling: dict, head_dim: int, base: float) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as `rope_freqs` for llama 3 RoPE scaling."""
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    old = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))


def _llama3_scaling(rope_freqs: np.ndarray, head_dim: int, base: float, gguf_path) -> dict:
    """Recover llama 3 RoPE scaling parameters (as released for Llama 3.1-3.3) from `rope_freqs`."""
    scaling = {
        "rope_type": "llama3",
        "factor": float(rope_freqs.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    expected = llama3_rope_factors(scaling, head_dim, base)
    if expected.shape != rope_freqs.shape or not np.allclose(expected, rope_freqs, rtol=1e-3):
        raise ValueError(f"{gguf_path}: rope_freqs tensor does not match llama 3 RoPE scaling")
    return scaling


def _mlx_name(gguf_name: str, gguf_path) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    raise ValueError(f"{gguf_path}: unexpected GGUF tensor {gguf_name!r}")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs back to rotated halves)."""
    return w.reshape(n_head, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_weights(reader, arch, config, dtype, gguf_path, progress) -> dict:
    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights = {}
    for i, tensor in enumerate(tensors, 1):
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values = values.reshape([int(d) for d in reversed(tensor.shape)])
        kind = tensor.name.split(".")[-2]
        if arch == "llama" and kind in heads:
            values = _unpermute(values, heads[kind])
        array = mx.array(np.asarray(values, dtype=np.float32)).astype(dtype)
        mx.eval(array)
        weights[_mlx_name(tensor.name, gguf_path)] = array
        if i % 50 == 0 or i == len(tensors):
            progress(f"dequantized {i}/{len(tensors)} tensors")
    return weights


def _checked_weights(config, weights, q_bits, q_group_size) -> dict:
    """Load `weights` into the mlx-lm model class (strict), re-quantize if asked, return them flat."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    if q_bits:
        nn.quantize(
            model,
            group_size=q_group_size,
            bits=q_bits,
            class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % q_group_size == 0,
        )
    return dict(tree_flatten(model.parameters()))


def _tokenizer(reader, gguf_path, max_length: int):
    """Build the Hugging Face fast tokenizer from GGUF vocabulary metadata; also return the eos ids."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{gguf_path}: unsupported tokenizer model {kind!r} (only byte-level BPE 'gpt2')")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(
            f"{gguf_path}: unsupported pre-tokenizer {pre!r} (supported: {', '.join(PRE_TOKENIZER_SPLITS)})"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
    tok = _byte_level_bpe(tokens, types, _field(reader, "tokenizer.ggml.merges", []), pre)

    template = _field(reader, "tokenizer.chat_template")
    eos_ids = end_token_ids(tokens, types, template, _field(reader, "tokenizer.ggml.eos_token_id"), gguf_path)
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    pad_id = _field(reader, "tokenizer.ggml.padding_token_id")
    bos = tokens[bos_id] if bos_id is not None else None
    if _field(reader, "tokenizer.ggml.add_bos_token", PRE_TOKENIZER_SPLITS[pre] is _LLAMA3_SPLIT) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=tokens[eos_ids[0]],
        pad_token=tokens[pad_id] if pad_id is not None else None,
        chat_template=template,
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
    )
    return wrapped, eos_ids


def _byte_level_bpe(tokens, types, merges, pre: str):
    """A `tokenizers` byte-level BPE like the model's Hugging Face tokenizer.json (control tokens special)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    split = PRE_TOKENIZER_SPLITS[pre]
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=[tuple(m.split(" ", 1)) for m in merges],
            ignore_merges=split is _LLAMA3_SPLIT,
        )
    )
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == gguf.TokenType.USER_DEFINED
        ]
    )
    return tok


def end_token_ids(tokens, types, template, meta_eos, gguf_path) -> list[int]:
    """The end-of-sequence ids. The metadata's eos id is replaced when it is not a control token
    (a known GGUF fault) and the chat template ends turns with a control token, which is added anyway."""
    control = gguf.TokenType.CONTROL
    turn_end = next(
        (
            tokens.index(t)
            for t in _TURN_END_TOKENS
            if template and t in template and t in tokens and types[tokens.index(t)] == control
        ),
        None,
    )
    meta_ok = meta_eos is not None and 0 <= meta_eos < len(tokens)
    if not meta_ok and turn_end is None:
        raise ValueError(f"{gguf_path}: invalid tokenizer.ggml.eos_token_id {meta_eos!r}")
    eos = meta_eos if meta_ok and (types[meta_eos] == control or turn_end is None) else turn_end
    return [eos] if turn_end in (None, eos) else [eos, turn_end]


class GGUFHeader(NamedTuple):
    """What a GGUF file says before its tensor data: metadata and tensor shapes."""

    fields: dict  # metadata key -> str, int, float, bool or list of them
    tensor_shapes: dict  # tensor name -> shape in GGUF order (ne0 first: (hidden, vocab) for token_embd)
    num_bytes: int  # the file's length as the header describes it (header, padding, every tensor's data)


_SCALARS = {
    gguf.GGUFValueType.UINT8: "B",
    gguf.GGUFValueType.INT8: "b",
    gguf.GGUFValueType.UINT16: "H",
    gguf.GGUFValueType.INT16: "h",
    gguf.GGUFValueType.UINT32: "I",
    gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.FLOAT32: "f",
    gguf.GGUFValueType.BOOL: "?",
    gguf.GGUFValueType.UINT64: "Q",
    gguf.GGUFValueType.INT64: "q",
    gguf.GGUFValueType.FLOAT64: "d",
}


def read_header(gguf_path) -> GGUFHeader:
    """Read the metadata and tensor shapes of a GGUF file, never its tensor data.

    The same values as `gguf.GGUFReader`'s fields and tensors, in a tenth of a second for a 150k-token
    vocabulary where the reader, which builds a numpy view per array element, takes about ten seconds.
    Raises ValueError naming the file when it is not a (little-endian, version 2 or 3) GGUF file.
    """
    gguf_path = Path(gguf_path)
    with open(gguf_path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise ValueError(f"{gguf_path}: not a GGUF file (too short)")
        magic, version = struct.unpack("<II", f.read(8))
        if magic != gguf.GGUF_MAGIC:
            raise ValueError(f"{gguf_path}: not a GGUF file (no GGUF magic)")
        if version not in (2, 3):
            raise ValueError(f"{gguf_path}: unsupported GGUF version {version} (or a big-endian file)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return _Cursor(data).header()
            except (struct.error, UnicodeDecodeError, KeyError, ValueError) as e:  # lengths past the end
                raise ValueError(f"{gguf_path}: damaged GGUF header ({e})") from e


class _Cursor:
    """Reads GGUF values from `data` (little-endian) at a moving offset."""

    def __init__(self, data, pos: int = 8):
        self.data, self.pos = data, pos  # after the magic and the version

    def take(self, fmt: str):
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        return self.strings(1)[0]

    def value(self, kind: int):
        if kind == gguf.GGUFValueType.STRING:
            return self.string()
        if kind != gguf.GGUFValueType.ARRAY:
            return self.take("<" + _SCALARS[kind])[0]
        item, count = self.take("<IQ")
        if count > len(self.data) - self.pos:
            raise struct.error(f"an array of {count} items at offset {self.pos}")
        if item in _SCALARS:
            dtype = np.dtype("<" + _SCALARS[item])
            end = self.pos + count * dtype.itemsize
            values = np.frombuffer(self.data[self.pos : end], dtype=dtype).tolist()
            self.pos = end
            return values
        if item == gguf.GGUFValueType.STRING:  # vocabularies: 150k strings, so a tight loop
            return self.strings(count)
        return [self.value(item) for _ in range(count)]

    def strings(self, count: int) -> list[str]:
        data, pos, size_at, out = self.data, self.pos, struct.Struct("<Q").unpack_from, []
        for _ in range(count):
            (size,) = size_at(data, pos)
            pos += 8 + size
            if pos > len(data):
                raise struct.error(f"a string of {size} bytes past the end of the file")
            out.append(data[pos - size : pos].decode("utf-8"))
        self.pos = pos
        return out

    def header(self) -> GGUFHeader:
        num_tensors, num_fields = self.take("<QQ")
        fields = {}
        for _ in range(num_fields):
            key = self.string()
            fields[key] = self.value(self.take("<I")[0])
        shapes, data_end = {}, 0
        for _ in range(num_tensors):
            name = self.string()
            (num_dims,) = self.take("<I")
            shapes[name] = self.take(f"<{num_dims}Q")
            kind, offset = self.take("<IQ")
            block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            data_end = max(data_end, offset + math.prod(shapes[name]) * type_size // block_size)
        alignment = fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        return GGUFHeader(fields, shapes, -(-self.pos // alignment) * alignment + data_end)
