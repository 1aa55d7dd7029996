"""Step 1 of a round, third source: the main model drafts for itself with its multi-token-prediction (MTP) layer.

Qwen3.5 / Qwen3.6 / Qwen3-Next checkpoints carry `mtp.*` tensors (`fc`, `pre_fc_norm_embedding`,
`pre_fc_norm_hidden`, one full-attention decoder layer `mtp.layers.0`, `mtp.norm`) that mlx-lm's `sanitize`
drops. They are read here from the model's folder and built into an `MTPHead` from the model's own decoder-layer
class; the embedding and the output layer are the main model's. Entry j of the MTP layer's KV cache reads the
main model's last hidden state at position j and the embedding of token j + 1, and predicts token j + 2:

    x_j = fc(concat(pre_fc_norm_embedding(embed(t_{j+1})), pre_fc_norm_hidden(h_j)))
    g_j = norm(layer(x_j)),   logits of t_{j+2} = lm_head(g_j)

Drafting chains it: draft i + 1 reads g (the MTP's own output) at the previous draft's position and the
embedding of draft i. DeepSeek-V3 stores its MTP layer as the decoder layer after the last, with other names.
The main model's hidden states come from every pass over it (prefill, verify): they wait in
`CachePair.mtp_hidden` until the next MTP round reads them with its first draft step; the chained entries
leave the cache when the round's drafts are made, and rollback cuts it as every other cache.
"""

import json
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from . import facts
from .cache import CachePair
from .draft import first_rows, propose
from .sampling import SamplingParams, fit_vocab
from .verify import body_and_head

MTP = "mtp"  # the draft_model value, and the name of the source
MTP_FILE = "mtp.safetensors"  # where `mlx-spec convert` keeps the MTP tensors of a converted folder
NORMS_KEY = "mlx_spec_mtp_norms"  # its metadata: "shifted" (as mlx-lm's RMSNorm reads them, for other readers)
QWEN_KINDS = ("qwen3_5", "qwen3_next")
# DeepSeek-V3's names of the MTPHead's own parts (its `shared_head.head` is the main model's output layer)
DEEPSEEK_NAMES = {
    "enorm": "pre_fc_norm_embedding",
    "hnorm": "pre_fc_norm_hidden",
    "eh_proj": "fc",
    "shared_head.norm": "norm",
}
# Hidden states kept after the MTP cache read them: a conversation cut back (a stop inside a round, a chat turn
# rendered otherwise) by up to this many tokens below the MTP cache reads them again. Cut back further, the MTP
# layer cannot draft for the rest of the conversation (its cache would need the main model's states again).
RETAIN = 256
WHERE_TO_GET = (
    "use a checkpoint that carries them, e.g. an original Hugging Face Qwen3.5 / Qwen3.6 / Qwen3-Next folder, "
    "as it is or converted with `mlx-spec convert` (which keeps them)"
)


class MTPHead(nn.Module):
    """The MTP layer: two input norms, the projection `fc`, one decoder layer of the model's own class, `norm`.

    `__call__(embedded (1, L, D), hidden (1, L, D), cache)` gives g (1, L, D), the normed output whose last row
    the main model's output layer turns into logits, and what the next chained step reads as its hidden state:
    g (Qwen), or the output before `norm` (DeepSeek-V3, whose layer is `enorm`, `hnorm`, `eh_proj`, a decoder
    layer and `shared_head.norm`, stored as the decoder layer after the last).
    """

    def __init__(self, layer: nn.Module, hidden_size: int, eps: float, chain_normed: bool = True):
        super().__init__()
        self.chain_normed = chain_normed  # Qwen: a chained step reads g; DeepSeek-V3: the output before `norm`
        self.pre_fc_norm_embedding = nn.RMSNorm(hidden_size, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(hidden_size, eps=eps)
        self.fc = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.layers = [layer]
        self.norm = nn.RMSNorm(hidden_size, eps=eps)

    def __call__(self, embedded: mx.array, hidden: mx.array, cache: list) -> tuple[mx.array, mx.array]:
        """(what a chained step reads, g): both (1, L, D)."""
        x = self.fc(mx.concatenate([self.pre_fc_norm_embedding(embedded), self.pre_fc_norm_hidden(hidden)], -1))
        x = self.layers[0](x, create_attention_mask(x, cache[0], return_array=True), cache[0])
        normed = self.norm(x)
        return (normed if self.chain_normed else x), normed


class MissingMTPError(ValueError):
    """The model's folder holds no MTP tensors."""


def head_for(model) -> MTPHead:
    """The model's MTP layer, loaded from the folder `mlx_spec.load` read it from (once per model)."""
    if body_and_head(model) is None:  # the output layer split over machines: its logits need a gather
        raise ValueError("draft_model='mtp' needs the model's output layer whole: a sharded model cannot draft with it")
    known = facts.of(model)
    if known.mtp is None:
        source = known.source
        if source is None or not Path(source).expanduser().is_dir():
            raise MissingMTPError(
                f"draft_model='mtp' needs the MTP tensors of the model's folder, and this model was not loaded "
                f"from a folder by mlx_spec.load ({source or 'built in code'}): {WHERE_TO_GET}"
            )
        known.mtp = load_head(model, Path(source).expanduser())
    return known.mtp


def load_head(model, folder: Path) -> MTPHead:
    """Read the MTP tensors of `folder` and build the layer for `model` (ValueError naming the folder if none)."""
    text = getattr(model, "language_model", model)
    kind = type(text).__module__.rsplit(".", 1)[-1]
    if kind not in (*QWEN_KINDS, "deepseek_v3"):
        raise MissingMTPError(
            f"draft_model='mtp' drafts with the MTP layers of Qwen3.5 / Qwen3.6 / Qwen3-Next and DeepSeek-V3 "
            f"checkpoints; {folder} holds a {kind} model"
        )
    if (folder / MTP_FILE).is_file():  # as `mlx-spec convert` wrote it: MTPHead's own names, ready
        weights, metadata = mx.load(str(folder / MTP_FILE), return_metadata=True)
        return _loaded(_empty_head(text, kind), {k[4:]: v for k, v in weights.items()}, metadata, folder, kind)
    if kind == "deepseek_v3":
        return _deepseek_head(text, folder)
    raw, metadata, hf_layout = _read_mtp(folder, _qwen_name)
    if not raw:
        raise MissingMTPError(f"{folder} holds no MTP tensors (mtp.*): {WHERE_TO_GET}")
    head = _empty_head(text, kind)
    weights = _stack_experts(raw)
    if _zero_centred(weights, text, hf_layout, folder):
        weights = {k: v + 1.0 if _is_norm(k, v) else v for k, v in weights.items()}
    return _loaded(head, weights, metadata, folder, kind)


def _empty_head(text, kind: str) -> MTPHead:
    """The MTP layer of `text`'s kind, its weights still mlx-lm's initial ones. Qwen: a full-attention layer
    with the model's MLP kind; DeepSeek-V3: the decoder layer after the last."""
    args = text.args
    if kind == "deepseek_v3":
        layer = type(text.model.layers[-1])(args, args.num_hidden_layers)
        return MTPHead(layer, args.hidden_size, args.rms_norm_eps, chain_normed=False)
    layer = type(text.model.layers[0])(args, args.full_attention_interval - 1)
    return MTPHead(layer, args.hidden_size, args.rms_norm_eps)


def _loaded(head: MTPHead, weights: dict, metadata: dict, folder: Path, kind: str) -> MTPHead:
    """`head` with `weights` (quantized first where the file says so), evaluated."""
    if "quantization" in metadata:  # as `mlx-spec convert --mtp-bits` wrote it
        quantized = {k.rsplit(".", 1)[0] for k in weights if k.endswith(".scales")}
        nn.quantize(head, class_predicate=lambda path, _: path in quantized, **json.loads(metadata["quantization"]))
    try:
        head.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise ValueError(f"the MTP tensors of {folder} do not fit a {kind} MTP layer: {error}") from error
    mx.eval(head.parameters())
    return head


def _has_mtp(folder: Path) -> bool:
    """Whether `folder`'s safetensors name MTP tensors (Qwen's `mtp.*`, or a decoder layer after the last), from
    their headers only."""
    config = json.loads((folder / "config.json").read_text())
    layers = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
    after_last = f"model.layers.{layers}."
    return any(
        key.startswith(_MTP_PREFIXES) or key.startswith(after_last)
        for file in folder.glob("*.safetensors")
        for key in _header(file)
    )


def _qwen_name(key: str) -> str | None:
    return key[key.index("mtp.") + 4 :] if key.startswith(_MTP_PREFIXES) else None


def _deepseek_head(text, folder: Path) -> MTPHead:
    """DeepSeek-V3's MTP layer: the decoder layer after the last (`model.layers.{num_hidden_layers}`), its
    weights through mlx-lm's own sanitize (as layer 0: MLA's kv_b_proj split, experts stacked, fp8 read)."""
    args = text.args
    prefix = f"model.layers.{args.num_hidden_layers}."
    raw, metadata, _ = _read_mtp(folder, lambda k: k[len(prefix) :] if k.startswith(prefix) else None)
    if not raw:
        raise MissingMTPError(f"{folder} holds no MTP tensors ({prefix}*): {WHERE_TO_GET}")
    own = {k: v for k, v in raw.items() if k.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head")}
    layer = {f"model.layers.0.{k}": v for k, v in raw.items() if k not in own and not k.startswith("embed_tokens")}
    weights = {k.replace("model.layers.0.", "layers.0.", 1): v for k, v in text.sanitize(layer).items()}
    for name, value in own.items():
        module = name.rsplit(".", 1)[0]
        if module in DEEPSEEK_NAMES:  # shared_head.head is the main model's output layer
            weights[f"{DEEPSEEK_NAMES[module]}.{name.rsplit('.', 1)[1]}"] = value
    return _loaded(_empty_head(text, "deepseek_v3"), weights, metadata, folder, "deepseek_v3")


def _read_mtp(folder: Path, rename) -> tuple[dict, dict, bool]:
    """(the MTP tensors, as `rename(key)` names them (None: not one); the metadata of the file that held them;
    whether the folder is in the Hugging Face layout (mlx-lm's sanitize has not run on it: conv1d weights
    (C, 1, K)))."""
    weights, metadata, hf_layout = {}, {}, False
    for file in sorted(folder.glob("*.safetensors")):
        header = _header(file)
        hf_layout |= any(k.endswith("conv1d.weight") and v["shape"][-1] != 1 for k, v in header.items() if k[0] != "_")
        names = {k: rename(k) for k in header if k != "__metadata__" and rename(k) is not None}
        if names:
            loaded, file_metadata = mx.load(str(file), return_metadata=True)
            weights.update({new: loaded[old] for old, new in names.items()})
            metadata.update(file_metadata or {})
    return weights, metadata, hf_layout


_MTP_PREFIXES = ("mtp.", "model.mtp.", "language_model.mtp.", "model.language_model.mtp.")


def _header(file: Path) -> dict:
    """A safetensors file's header: tensor name -> {"dtype", "shape", ...}, without reading the tensors."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def _stack_experts(weights: dict) -> dict:
    """Hugging Face's per-expert MoE tensors as mlx-lm's SwitchGLU holds them (Qwen3-Next: one tensor per
    expert; Qwen3.5-MoE: gate and up fused)."""
    out = dict(weights)
    prefix = "layers.0.mlp"
    experts = sorted(
        {int(k.split(".")[4]) for k in weights if k.startswith(f"{prefix}.experts.") and k.split(".")[4].isdigit()}
    )
    for name in ("gate_proj", "up_proj", "down_proj"):
        keys = [f"{prefix}.experts.{e}.{name}.weight" for e in experts]
        if experts and all(k in out for k in keys):
            out[f"{prefix}.switch_mlp.{name}.weight"] = mx.stack([out.pop(k) for k in keys])
    if f"{prefix}.experts.gate_up_proj" in out:
        gate_up = out.pop(f"{prefix}.experts.gate_up_proj")
        middle = gate_up.shape[-2] // 2
        out[f"{prefix}.switch_mlp.gate_proj.weight"] = gate_up[..., :middle, :]
        out[f"{prefix}.switch_mlp.up_proj.weight"] = gate_up[..., middle:, :]
        out[f"{prefix}.switch_mlp.down_proj.weight"] = out.pop(f"{prefix}.experts.down_proj")
    return out


def _is_norm(key: str, value: mx.array) -> bool:
    """An RMSNorm weight of the MTP layer (Qwen's zero-centred convention applies to all of them)."""
    module, _, leaf = key.rpartition(".")
    return value.ndim == 1 and leaf == "weight" and "norm" in module.rpartition(".")[2]


def _zero_centred(weights: dict, text, hf_layout: bool, folder: Path) -> bool:
    """Whether the MTP norms hold w for a (1 + w) RMSNorm, as Qwen's Hugging Face checkpoints do (mlx-lm adds 1 to
    the body's norms when it reads them). A Hugging Face folder: yes. Other folders (an export that kept them):
    decided by their values against the body's norms as loaded; too close to call is an error, never a guess."""
    if hf_layout:
        return True
    norms = [v for k, v in weights.items() if _is_norm(k, v)]
    body = [layer.input_layernorm.weight for layer in text.model.layers] + [text.model.norm.weight]
    mtp_mean = mx.mean(mx.concatenate([n.astype(mx.float32) for n in norms])).item()
    body_mean = mx.mean(mx.concatenate([n.astype(mx.float32) for n in body])).item()
    shifted, unshifted = abs(mtp_mean + 1.0 - body_mean), abs(mtp_mean - body_mean)
    if abs(shifted - unshifted) < 0.25:
        raise ValueError(
            f"cannot tell whether the MTP norm weights of {folder} are zero-centred (mean {mtp_mean:.3f}, the "
            f"body's {body_mean:.3f} as loaded): convert the Hugging Face checkpoint with `mlx-spec convert`"
        )
    return shifted < unshifted


class MTPSource:
    """The MTP layer as a round's source of draft tokens (draft.DraftSource and lookup.LookupSource are the
    others): `propose(num_draft, key, history, noise) -> (draft_tokens (k,), q (k, V) or None)`.

    `keep(position, hidden)` takes the main model's last hidden states of each verify pass, `keep_and_feed` those
    of the prompt's prefill (they go into the MTP cache at once, evaluated with the prefill's chunk).
    """

    def __init__(
        self,
        model,
        head: MTPHead,
        caches: CachePair,
        params: SamplingParams,
        vocab_size: int,
        logits_processors=None,
        shortlist: int | None = None,
    ):
        body, self.output = body_and_head(model)
        self.embed = body.embed_tokens
        layer = body_and_head(model, layer_only=True)[1]
        if shortlist and layer.weight.shape[0] > shortlist and getattr(layer, "bias", None) is None:
            # draft_vocab_size: the output layer cut to the first ids, as the draft model's (draft.DraftModel)
            self.output = lambda hidden: first_rows(layer, hidden, shortlist)
        self.head, self.caches, self.params = head, caches, params
        self.vocab_size, self.logits_processors = vocab_size, logits_processors
        if caches.mtp is None:
            caches.mtp = [KVCache()]

    @property
    def offset(self) -> int:
        """The tokens' positions whose entries the MTP cache holds: 0 .. offset - 1."""
        return self.caches.mtp[0].offset

    def covers(self) -> bool:
        """Whether the hidden states kept reach from the MTP cache to the main cache (else a pair made without
        MTP, or a cache handed over from mlx-lm's list, left a gap the MTP layer cannot fill)."""
        main_offset, chunks = self.caches.main_offset, self.caches.mtp_hidden
        if self.offset >= main_offset:
            return True
        return bool(chunks) and chunks[0][0] <= self.offset and chunks[-1][0] + chunks[-1][1].shape[0] >= main_offset

    def ready(self) -> bool:
        """Whether the conversation has a position before its last token, whose hidden state drafts."""
        return len(self.caches.tokens) >= 2

    def keep(self, position: int, hidden: mx.array):
        """Keep `hidden` (L, D), the main model's last hidden states at positions `position`.. (newer than any
        kept at those positions: a rejected round's are overwritten by the next pass)."""
        chunks = []
        for start, rows in self.caches.mtp_hidden:
            if start < position:
                chunks.append((start, rows[: position - start]))
        chunks.append((position, hidden))
        self.caches.mtp_hidden = chunks

    def keep_and_feed(self, position: int, hidden: mx.array) -> list:
        """`keep`, then feed the MTP cache every entry whose next token is known; returns its arrays."""
        self.keep(position, hidden)
        end = min(position + hidden.shape[0], len(self.caches.tokens) - 2)  # the last one: the first draft step's
        if end > self.offset:
            start = self.offset
            self.head(self._embedded(start, end), self._take(start, end)[None], self.caches.mtp)
        return [self.caches.mtp[0].keys, self.caches.mtp[0].values]

    def _embedded(self, start: int, end: int) -> mx.array:
        """Embeddings of the tokens after positions start .. end - 1: (1, end - start, D)."""
        return self.embed(mx.array(self.caches.tokens[start + 1 : end + 1], mx.int32)[None])

    def _take(self, start: int, end: int) -> mx.array:
        """The kept hidden states of positions start .. end - 1, (end - start, D); of those before `end`, the last
        RETAIN stay (a conversation cut back by up to RETAIN tokens reads them again)."""
        pieces, kept, keep_from = [], [], end - RETAIN
        for first, rows in self.caches.mtp_hidden:
            last = first + rows.shape[0]
            lo, hi = max(first, start), min(last, end)
            if lo < hi:
                pieces.append(rows[lo - first : hi - first])
            if last > keep_from:
                kept.append((max(first, keep_from), rows[max(first, keep_from) - first :]))
        self.caches.mtp_hidden = kept
        assert sum(p.shape[0] for p in pieces) == end - start, "the MTP layer's hidden states have a gap"
        return mx.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def propose(self, num_draft: int, key: mx.array | None, history: mx.array | None, noise: mx.array | None = None):
        """(draft_tokens (k,), q (k, V) or None when greedy or coupled): see draft.propose, whose loop this shares.

        The first step reads every position the MTP cache has not (the last verify's accepted positions, or more
        after other sources' rounds) and drafts from the last; each further step reads its own output and draft.
        """
        end = len(self.caches.tokens) - 1  # the positions 0 .. end - 1 have their next token: their entries
        start = self.offset
        chain = _Chain(self, self._take(start, end)[None])
        pending = self.caches.tokens[start + 1 : end + 1]
        drafted = propose(
            chain, self.caches.mtp, pending, num_draft, self.params, key, history, self.logits_processors, noise
        )
        cache = self.caches.mtp[0]
        cache.trim(cache.offset - end)  # the chained entries read the MTP's own outputs, not the main model's
        return drafted


class _Chain:
    """One chained MTP step as draft.propose calls a draft model: `(inputs, cache) -> logits (1, V)`; the first
    call reads the main model's hidden states, each later one the previous call's output."""

    def __init__(self, source: MTPSource, hidden: mx.array):
        self.source, self.hidden, self.vocab_size = source, hidden, source.vocab_size

    def __call__(self, inputs: mx.array, cache: list) -> mx.array:
        source = self.source
        chained, normed = source.head(source.embed(inputs[None]), self.hidden, cache)
        self.hidden = chained[:, -1:]
        return fit_vocab(source.output(normed[0, -1:]), self.vocab_size)


def nbytes(head: MTPHead) -> int:
    return sum(w.nbytes for _, w in tree_flatten(head.parameters()))


def convert(hf_folder, out_dir, dtype: str | None = None, q_bits: int | None = None, mtp_bits: int | None = None):
    """Convert a Hugging Face checkpoint folder with mlx-lm (quantized to `q_bits` if given) and keep its MTP
    tensors beside, in `out_dir`/mtp.safetensors: as MTPHead holds them (norms shifted, experts stacked), in
    `dtype`, quantized to `mtp_bits` if given (the MTP layer may keep more bits than the body). A checkpoint
    without MTP tensors converts as mlx-lm converts it."""
    import mlx_lm
    from mlx_lm import convert as mlx_lm_convert

    hf_folder, out_dir = Path(hf_folder), Path(out_dir)
    mlx_lm_convert(str(hf_folder), str(out_dir), quantize=q_bits is not None, q_bits=q_bits, dtype=dtype)
    if not _has_mtp(hf_folder):
        return out_dir
    model, _ = mlx_lm.load(str(out_dir), lazy=True)
    try:
        head = load_head(model, hf_folder)
    except MissingMTPError:  # no MTP layer, or a model kind without one: converted as mlx-lm converts it
        return out_dir
    if dtype is not None:
        head.set_dtype(getattr(mx, dtype))
    metadata = {NORMS_KEY: "shifted"}
    if mtp_bits is not None:
        quantization = {"group_size": 64, "bits": mtp_bits}
        nn.quantize(
            head,
            **quantization,
            class_predicate=lambda _, m: (
                hasattr(m, "to_quantized") and not isinstance(m, nn.Embedding) and m.weight.shape[-1] % 64 == 0
            ),
        )
        metadata["quantization"] = json.dumps(quantization)
    weights = {f"mtp.{k}": v for k, v in tree_flatten(head.parameters())}
    mx.save_safetensors(str(out_dir / MTP_FILE), weights, metadata=metadata)
    return out_dir
