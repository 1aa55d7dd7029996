"""Find the local models that can draft for a main model, from metadata alone (never weights).

Looks in LM Studio's model folders, the Hugging Face hub cache, mlx_spec's cache and folders the user names;
a draft's verdict is `compat.incompatibility`, the rule `check_draft` applies at load time; special token
strings that differ while the ids agree are a note on a compatible draft, as they are a warning at load time.
"""

import hashlib
import importlib.util
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .compat import SPECIAL_TOKEN_NAMES, incompatibility, metadata_difference, special_tokens
from .gguf import ARCHITECTURES, PRE_TOKENIZER_SPLITS, cache_root, end_token_ids, read_header

# LM Studio's size guide: main model -> largest draft that still pays off, in nominal parameters.
SIZE_GUIDE = ((7e9, 1e9), (14e9, 3e9), (32e9, 7e9))
NOMINAL_SLACK = 1.25  # a count up to 25% above a nominal size is that size (Llama 3.2 "1B" has 1.24B)
MAX_DEPTH = 4  # folder levels searched below a root (LM Studio: publisher/model/files)
STATUSES = ("compatible", "above size guide", "incompatible", "skipped")  # best first
LM_STUDIO, HF_CACHE, OWN_CACHE, SEARCH = "LM Studio", "HF cache", "mlx_spec cache", "search"

_SPLIT_PART = re.compile(r"-(\d{5})-of-\d{5}\.gguf$")
_SIZE_LABEL = re.compile(r"[-_. ]?\d+(?:\.\d+)?[bBmM](?![a-zA-Z])")
_MAX_HEADER = 100 << 20  # bytes: a larger safetensors header is a damaged file


class NoCompatibleDraftError(ValueError):
    """`--draft-model auto` found no local model that can draft for the main model."""


@dataclass(frozen=True, eq=False)
class ModelInfo:
    """What discovery knows of one local model, read from its metadata."""

    path: Path
    format: str  # "mlx" (a folder) or "gguf" (a file)
    architecture: str | None
    num_params: int  # from the tensor shapes in the headers
    size_bytes: int  # on disk
    output_size: int  # ids the model can emit: config.json's vocab_size, the GGUF embedding's rows
    tokens: dict  # id -> token (added tokens included); one dict per distinct vocabulary
    fingerprint: str  # hash of where `tokens` came from (tokenizer.json's bytes, the GGUF token list)
    special: dict  # compat.special_tokens(...)
    basename: str | None  # the model family's name where the metadata gives it (GGUF general.basename)
    unsupported: str | None  # why mlx_spec cannot load it, or None


@dataclass(frozen=True)
class Draft:
    """One local model and its verdict as a draft for the main model."""

    name: str  # as the location names it: "publisher/model" in LM Studio, the repo id in the HF cache
    path: str  # what to pass as --draft-model
    where: str  # LM_STUDIO, HF_CACHE, OWN_CACHE or SEARCH
    format: str  # "mlx" or "gguf"
    architecture: str | None
    num_params: int | None
    size_bytes: int | None
    status: str  # one of STATUSES
    reason: str | None  # why not, the size warning, or a note on special token strings; else None

    @property
    def compatible(self) -> bool:
        return self.status in STATUSES[:2]

    def as_dict(self) -> dict:
        return {**asdict(self), "compatible": self.compatible}


@dataclass(frozen=True)
class _Location:
    path: Path
    name: str
    where: str
    problem: str | None = None  # why the location holds no readable model, known before reading it


# --- where models are ----------------------------------------------------------------------------


def lmstudio_folders() -> list[Path]:
    """LM Studio's model folders: `~/.lmstudio/models`, the older `~/.cache/lm-studio/models`, and the
    `downloadsFolder` of either's settings.json where it names one."""
    folders = []
    for base in (Path.home() / ".lmstudio", Path.home() / ".cache" / "lm-studio"):
        folders.append(base / "models")
        try:
            downloads = json.loads((base / "settings.json").read_text()).get("downloadsFolder")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(downloads, str) and downloads:
            folders.append(Path(downloads).expanduser())
    return folders


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, from `HF_HUB_CACHE` / `HF_HOME` as they are now (huggingface_hub reads
    them once, at import)."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface")
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(hub)).expanduser()


def _walk(root: Path, top: Path, where: str, depth: int = MAX_DEPTH) -> Iterator[_Location]:
    """Model folders (with config.json), .gguf files, and folders of weights without a config under `root`."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    names = {e.name for e in entries}
    if "config.json" in names or any(n.endswith(".safetensors") for n in names):
        yield _Location(root, _relative(root, top), where)
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            continue
        if entry.name.endswith(".gguf") and _first_gguf(entry.name) and entry.is_file():
            yield _Location(path, _relative(path, top), where)
        elif depth > 0 and entry.is_dir():
            yield from _walk(path, top, where, depth - 1)


def _relative(path: Path, top: Path) -> str:
    return path.relative_to(top).as_posix() if path != top else path.name


def _first_gguf(name: str) -> bool:
    """Whether GGUF file `name` is a model: not a vision projector, not the second part of a split file."""
    split = _SPLIT_PART.search(name)
    return not name.startswith("mmproj") and (split is None or split.group(1) == "00001")


def _hf_locations() -> Iterator[_Location]:
    """Models in the Hugging Face cache (the revision `main` points to, else the newest), then the repos
    the cache scanner found damaged."""
    from huggingface_hub import scan_cache_dir

    cache = hf_cache_dir()
    if not cache.is_dir():
        return
    info = scan_cache_dir(cache)
    seen = set()
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        seen.add(repo.repo_path.name)
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
        snapshot = revision.snapshot_path
        if (snapshot / "config.json").exists() or any(snapshot.glob("*.safetensors")):
            yield _Location(snapshot, repo.repo_id, HF_CACHE)
        else:
            for gguf_file in sorted(snapshot.rglob("*.gguf")):
                if _first_gguf(gguf_file.name):
                    yield _Location(gguf_file, f"{repo.repo_id}/{gguf_file.relative_to(snapshot)}", HF_CACHE)
    for repo_dir in sorted(cache.glob("models--*")):
        if repo_dir.name not in seen:
            problem = next((str(w) for w in info.warnings if str(repo_dir) in str(w)), "damaged cache entry")
            yield _Location(repo_dir, repo_dir.name.removeprefix("models--").replace("--", "/"), HF_CACHE, problem)


def _own_cache_locations() -> Iterator[_Location]:
    """Converted MLX folders and GGUF files in mlx_spec's cache; a GGUF file already converted is left out."""
    root = cache_root()
    converted = sorted(p for p in (root / "converted").glob("*") if p.is_dir() and not p.name.startswith("."))
    for folder in converted:
        yield _Location(folder, folder.name, OWN_CACHE)
    for gguf_file in sorted((root / "gguf").glob("*.gguf")):
        if not any(folder.name.startswith(gguf_file.stem + "-") for folder in converted):
            yield _Location(gguf_file, gguf_file.name, OWN_CACHE)


def _locations(search: Iterable) -> Iterator[_Location]:
    for folder in lmstudio_folders():
        yield from _walk(folder, folder, LM_STUDIO)
    yield from _hf_locations()
    yield from _own_cache_locations()
    for folder in search:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ValueError(f"search folder not found: {folder}")
        yield from _walk(folder, folder, SEARCH)


# --- what a model is, from its metadata ----------------------------------------------------------

_described = {}  # path -> (stat key, ModelInfo)
_vocabularies = {}  # fingerprint -> tokens: each vocabulary read once, one dict shared by the models using it
_token_ids = {}  # (fingerprint, token) -> the ids of that token
_verdicts = {}  # (main fingerprint, draft fingerprint, limit, special tokens) -> reason or None


def describe(path) -> ModelInfo:
    """Read what discovery needs of the MLX folder or GGUF file at `path`, from its metadata alone.

    Cached per file (path, modification time, size) for the life of the process. Raises ValueError
    (or OSError) saying what is wrong with a broken or half-downloaded model.
    """
    path = Path(path)
    key = _stat_key(path)
    cached = _described.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        info = _describe_gguf(path) if path.is_file() else _describe_folder(path)
    except (KeyError, TypeError, IndexError, AttributeError) as e:  # metadata of the wrong shape
        raise ValueError(f"unexpected metadata ({type(e).__name__}: {e})") from e
    _described[path] = (key, info)
    return info


def _stat_key(path: Path) -> tuple:
    if path.is_file():
        stat = path.stat()
        return stat.st_mtime_ns, stat.st_size
    return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(path) if e.is_file()))


def _describe_folder(folder: Path) -> ModelInfo:
    config = _read_json(folder / "config.json")
    text_config = config.get("text_config") or {}
    model_type = config.get("model_type") or text_config.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError("config.json has no model_type")
    num_params = _num_params(_weight_files(folder), config.get("quantization"))
    tokens, fingerprint = _folder_vocabulary(folder / "tokenizer.json")
    output_size = config.get("vocab_size") or text_config.get("vocab_size") or max(tokens) + 1
    supported = _mlx_lm_supports(model_type)
    return ModelInfo(
        path=folder,
        format="mlx",
        architecture=model_type,
        num_params=num_params,
        size_bytes=sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        output_size=int(output_size),
        tokens=tokens,
        fingerprint=fingerprint,
        special=_folder_special(folder, config, tokens, fingerprint),
        basename=None,
        unsupported=None if supported else f"unsupported architecture {model_type!r} (not in mlx-lm)",
    )


def _read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise ValueError(f"no {path.name} (half-downloaded?)")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path.name} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def _mlx_lm_supports(model_type: str) -> bool:
    from mlx_lm.utils import MODEL_REMAPPING

    return importlib.util.find_spec(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}") is not None


def _weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files (those its index names, if it has one); ValueError if there are none or
    some are missing."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(names)} weight files missing, e.g. {missing[0]} (half-downloaded?)"
            )
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError("no weights (*.safetensors) (half-downloaded?)")
    return files


def _safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file: its first 8 + N bytes, never the data."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if size is None or size > _MAX_HEADER:
            raise ValueError(f"{path.name} is not a safetensors file")
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path.name} has a damaged header") from e
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if path.stat().st_size < 8 + size + end:
        raise ValueError(f"{path.name} is shorter than its header says (half-downloaded?)")
    return header


def _num_params(files: list[Path], quantization) -> int:
    """Parameters from the tensor shapes; a quantized weight (packed in uint32, with scales) counts unpacked."""
    tensors = {}
    for path in files:
        tensors.update(_safetensors_header(path))
    quantization = quantization if isinstance(quantization, dict) else {}
    total = 0
    for name, tensor in tensors.items():
        module, _, kind = name.rpartition(".")
        quantized = f"{module}.scales" in tensors
        if quantized and kind in ("scales", "biases"):
            continue
        count = math.prod(tensor["shape"])
        if quantized and kind == "weight":
            layer = quantization.get(module)
            bits = (layer if isinstance(layer, dict) else quantization).get("bits") or 4
            count = count * 32 // bits
        total += count
    return total


def _without_merges(raw: bytes) -> dict:
    """tokenizer.json's content, without decoding the BPE merges (half the file) where they come last.

    The `tokenizers` library writes `"model": {..., "vocab": {...}, "merges": [...]}` last: the text is cut
    at the merges and closed. Any other layout (the cut text lacks the vocabulary or the added tokens) is
    decoded whole.
    """
    try:
        text = raw.decode("utf-8")
        cut = text.rfind('"merges":')
        if cut > 0:
            try:
                data = json.loads(text[:cut] + '"merges": []}}')
                if isinstance(data, dict) and "added_tokens" in data and "vocab" in (data.get("model") or {}):
                    return data
            except ValueError:
                pass
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"tokenizer.json is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError("tokenizer.json is not a JSON object")
    return data


def _folder_vocabulary(tokenizer_json: Path) -> tuple[dict, str]:
    """{id: token} of tokenizer.json (its model's vocabulary and the added tokens) and its fingerprint.

    Parsed once per distinct file content: models converted from one base share their tokenizer.json.
    """
    if not tokenizer_json.is_file():
        raise ValueError("no tokenizer.json (its vocabulary cannot be read without loading the model)")
    raw = tokenizer_json.read_bytes()
    digest = hashlib.sha1(raw).hexdigest()
    if digest not in _vocabularies:
        data = _without_merges(raw)
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
            tokens = {i: t for t, i in vocab.items()}
        elif isinstance(vocab, list):  # Unigram: [token, score] in id order
            tokens = {i: entry[0] for i, entry in enumerate(vocab)}
        else:
            raise ValueError("tokenizer.json has no vocabulary")
        tokens.update((added["id"], added["content"]) for added in data.get("added_tokens") or [])
        _vocabularies[digest] = tokens
    return _vocabularies[digest], digest


def _folder_special(folder: Path, config: dict, tokens: dict, fingerprint: str) -> dict:
    """The special tokens mlx-lm's tokenizer will have: transformers' bos/eos/pad (tokenizer_config.json,
    special_tokens_map.json where the config lists no added tokens) and mlx-lm's end ids (the eos token,
    config.json's eos_token_id, replaced by generation_config.json's)."""
    values = _read_json(folder / "tokenizer_config.json", required=False)
    if "added_tokens_decoder" not in values:
        values = {**values, **_read_json(folder / "special_tokens_map.json", required=False)}
    bos, eos, pad = (_token_text(values.get(name)) for name in SPECIAL_TOKEN_NAMES)
    generation = _read_json(folder / "generation_config.json", required=False)
    end = generation.get("eos_token_id") or config.get("eos_token_id")
    end = set() if end is None else set(end if isinstance(end, list) else [end])
    if eos is not None:
        end.update(_ids_of(eos, tokens, fingerprint))
    return special_tokens(bos, eos, pad, end)


def _ids_of(token: str, tokens: dict, fingerprint: str) -> list[int]:
    key = (fingerprint, token)
    if key not in _token_ids:
        _token_ids[key] = [i for i, t in tokens.items() if t == token]
    return _token_ids[key]


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _describe_gguf(path: Path) -> ModelInfo:
    fields, shapes, num_bytes = read_header(path)
    if path.stat().st_size < num_bytes:
        raise ValueError(f"{path.name} is shorter than its header says (half-downloaded?)")
    token_list = fields.get("tokenizer.ggml.tokens")
    if not token_list:
        raise ValueError("no vocabulary in the GGUF metadata")
    lengths = ",".join(map(str, map(len, token_list)))  # so that tokens holding "\0" cannot collide
    text = lengths + "\0" + "\0".join(token_list)
    fingerprint = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()
    if fingerprint not in _vocabularies:  # as the converted tokenizer's get_vocab(): a repeated token keeps its last id
        _vocabularies[fingerprint] = {i: t for t, i in {t: i for i, t in enumerate(token_list)}.items()}
    tokens = _vocabularies[fingerprint]
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(token_list)
    bos_id, pad_id = fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.padding_token_id")
    try:
        end = end_token_ids(
            token_list, types, fields.get("tokenizer.chat_template"), fields.get("tokenizer.ggml.eos_token_id"), path
        )
        bos = token_list[bos_id] if bos_id is not None else None
        pad = token_list[pad_id] if pad_id is not None else None
    except IndexError as e:
        raise ValueError("special token id out of the vocabulary") from e
    embedding = shapes.get("token_embd.weight")
    return ModelInfo(
        path=path,
        format="gguf",
        architecture=fields.get("general.architecture"),
        num_params=sum(math.prod(shape) for shape in shapes.values()),
        size_bytes=path.stat().st_size,
        output_size=int(embedding[1]) if embedding and len(embedding) == 2 else len(token_list),
        tokens=tokens,
        fingerprint=fingerprint,
        special=special_tokens(bos, token_list[end[0]], pad, end),
        basename=fields.get("general.basename"),
        unsupported=_gguf_unsupported(fields),
    )


def _gguf_unsupported(fields: dict) -> str | None:
    """Why mlx_spec's GGUF converter cannot take this file, or None."""
    arch, tokenizer = fields.get("general.architecture"), fields.get("tokenizer.ggml.model")
    pre, parts = fields.get("tokenizer.ggml.pre", "default"), fields.get("split.count", 1)
    if arch not in ARCHITECTURES:
        return f"unsupported architecture {arch!r} (mlx_spec converts GGUF {', '.join(ARCHITECTURES)})"
    if tokenizer != "gpt2":
        return f"unsupported GGUF tokenizer {tokenizer!r} (mlx_spec converts byte-level BPE 'gpt2')"
    if pre not in PRE_TOKENIZER_SPLITS:
        return f"unsupported GGUF pre-tokenizer {pre!r}"
    if parts > 1:
        return f"split GGUF ({parts} files): mlx_spec converts single files"
    return None


# --- the verdict ---------------------------------------------------------------------------------


def size_guide(main_params: int) -> float:
    """The largest draft, in parameters, that LM Studio's size guide allows for a main model of `main_params`
    (7B -> 1B, 14B -> 3B, 32B -> 7B, larger in proportion), and never more than half the main model."""
    for main_nominal, draft_nominal in SIZE_GUIDE:
        if main_params <= main_nominal * NOMINAL_SLACK:
            limit = draft_nominal * NOMINAL_SLACK
            break
    else:
        limit = main_params * SIZE_GUIDE[-1][1] / SIZE_GUIDE[-1][0]
    return min(limit, main_params / 2)


def verdict(main: ModelInfo, draft: ModelInfo) -> tuple[str, str | None]:
    """(status, reason) of `draft` for `main`: status is one of STATUSES but "skipped"."""
    if draft.unsupported:
        return "incompatible", draft.unsupported
    limit = min(main.output_size, draft.output_size)
    key = (main.fingerprint, draft.fingerprint, limit, repr(main.special), repr(draft.special))
    if key not in _verdicts:
        _verdicts[key] = incompatibility(main.tokens, draft.tokens, limit, main.special, draft.special)
    if _verdicts[key]:
        return "incompatible", _verdicts[key]
    difference = metadata_difference(main.special, draft.special)
    note = f"special token strings differ, metadata only ({difference})" if difference else None
    if main.num_params and draft.num_params:
        if draft.num_params >= main.num_params:
            return "incompatible", (
                f"not smaller than the main model ({_count(draft.num_params)} vs {_count(main.num_params)} parameters)"
            )
        guide = size_guide(main.num_params)
        if draft.num_params > guide:
            slower = (
                f"{_count(draft.num_params)} > {_count(guide)} for a {_count(main.num_params)} main model, "
                "may make generation slower"
            )
            return "above size guide", f"{slower}; {note}" if note else slower
    return "compatible", note


def _rank(draft: Draft) -> tuple:
    """Compatible first; then smaller (faster) first, an MLX folder before a GGUF file (no conversion)."""
    params = draft.num_params
    return (STATUSES.index(draft.status), params is None, params or 0, draft.format != "mlx", draft.name)


def main_model(main) -> tuple[Path, str]:
    """(path, name) of the main model: an MLX folder, a .gguf file, a hub id in the Hugging Face cache, or a
    model loaded with `mlx_spec.load`."""
    if not isinstance(main, (str, os.PathLike)):
        from .load import model_source

        if model_source(main) is None:
            raise ValueError("find_drafts needs a path, a hub id, or a model loaded with mlx_spec.load")
        main = model_source(main)
    source = str(main)
    path = Path(source).expanduser()
    if path.exists():
        return path, path.stem if path.is_file() else path.name
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(source, "config.json", cache_dir=hf_cache_dir())
        if isinstance(config, str):
            return Path(config).parent, source
    raise ValueError(
        f"main model not found on disk: {source} (a folder, a .gguf file, or a hub id in {hf_cache_dir()})"
    )


def find_drafts(main, search: Iterable = ()) -> list[Draft]:
    """Every local model that could draft for `main`, best first: compatible ones (smallest first), those
    above LM Studio's size guide, the incompatible ones with the reason, and broken ones skipped.

    Reads config.json, tokenizer files and safetensors / GGUF headers only, never weights.

    Args:
        main: the main model: an MLX folder, a .gguf file, a hub id in the Hugging Face cache, or a model
            loaded with `mlx_spec.load`.
        search: more folders to look in, besides LM Studio's, the Hugging Face cache and mlx_spec's cache.
    """
    main_path, _ = main_model(main)
    main_info = describe(main_path)
    seen, drafts = {os.path.realpath(main_path)}, []
    for location in _locations(search):
        real = os.path.realpath(location.path)
        if real in seen:
            continue
        seen.add(real)
        drafts.append(_judge(main_info, location))
    return sorted(drafts, key=_rank)


def _judge(main: ModelInfo, location: _Location) -> Draft:
    fmt = "gguf" if location.path.suffix == ".gguf" else "mlx"
    try:
        if location.problem:
            raise ValueError(location.problem)
        info = describe(location.path)
    except (ValueError, OSError) as e:
        reason = " ".join(str(e).replace(f"{location.path}: ", "").split())
        return Draft(location.name, str(location.path), location.where, fmt, None, None, None, "skipped", reason)
    status, reason = verdict(main, info)
    return Draft(
        location.name,
        str(location.path),
        location.where,
        info.format,
        info.architecture,
        info.num_params,
        info.size_bytes,
        status,
        reason,
    )


def resolve_draft(main, value, search: Iterable = (), progress: Callable[[str], None] = print):
    """The draft model to load: `value` itself, or for "auto" the path of the best compatible local draft.

    `progress` is told which draft "auto" chose. Raises NoCompatibleDraftError when none is compatible.

    Args:
        main: the main model, as `find_drafts` takes it.
        value: a --draft-model value: a path or hub id, "auto", or None.
        search: more folders to look in.
    """
    if value != "auto":
        return value
    drafts = find_drafts(main, search)
    best = next((d for d in drafts if d.compatible), None)
    if best is None:
        raise NoCompatibleDraftError(no_draft_message(main, drafts))
    note = f"; {best.status}: {best.reason}" if best.reason else ""
    progress(f"draft model: {best.name} ({best.where}, {_count(best.num_params)} parameters){note}")
    return best.path


# --- reports -------------------------------------------------------------------------------------


def family(main) -> str:
    """The main model's family as its metadata names it: GGUF general.basename, else its name up to the
    size label ("Qwen2.5-Coder-32B-Instruct-4bit" -> "Qwen2.5-Coder"), else its architecture."""
    path, name = main_model(main)
    info = describe(path)
    match = _SIZE_LABEL.search(name)
    return info.basename or (name[: match.start()] if match and match.start() > 0 else None) or info.architecture


def no_draft_message(main, drafts: list[Draft]) -> str:
    """One sentence: nothing local can draft for `main`, and what to look for."""
    path, name = main_model(main)
    info = describe(path)
    size = f" of at most {_count(size_guide(info.num_params))} parameters" if info.num_params else ""
    return (
        f"No compatible draft model for {name} among the {len(drafts)} local models found: look for a smaller "
        f"{family(main)} model{size} with the same tokenizer ({info.output_size:,}-token vocabulary, "
        f"eos_token {info.special['eos_token']!r})."
    )


def report(main, drafts: list[Draft]) -> str:
    """The `mlx-spec drafts` table: a heading on the main model, one aligned row per model, and the choice."""
    path, name = main_model(main)
    info = describe(path)
    heading = f"Draft models for {name} ({info.architecture}, {_count(info.num_params)} parameters"
    if info.num_params:
        heading += f"; LM Studio's size guide: drafts up to {_count(size_guide(info.num_params))}"
    rows = [("name", "where", "format", "params", "size", "verdict")]
    for d in drafts:
        verdict_text = d.status if d.reason is None else f"{d.status}: {d.reason}"
        rows.append((d.name, d.where, d.format.upper(), _count(d.num_params), _bytes(d.size_bytes), verdict_text))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [heading + "):", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    best = next((d for d in drafts if d.compatible), None)
    lines.append("")
    if best is None:
        lines.append(no_draft_message(main, drafts))
    else:
        lines.append(f"--draft-model auto picks {best.name}: {best.path}")
    return "\n".join(lines)


def _count(n) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"
