"""Finding drafts: LM Studio, Hugging Face cache, mlx_spec cache and --search folders in a temporary HOME,
the verdicts, the ranking, `--draft-model auto`, and that only metadata is read."""

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import struct

import gguf
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from gguf import TokenType
from mlx.utils import tree_flatten
from tiny import VOCAB, make_model, toy_tokenizer
from tiny_folders import save_model_folder

import mlx_spec
import mlx_spec.gguf
from mlx_spec import check_draft, discover
from mlx_spec.cli import main
from mlx_spec.compat import incompatibility, metadata_difference, special_tokens
from mlx_spec.fetch import default_pair_paths
from mlx_spec.gguf import read_header
from mlx_spec.load import DraftMetadataWarning

FFN = 128  # tiny.make_model's intermediate size


def toy_gguf(path, hidden=32, layers=1, prefix="w", seed=0):
    """A tiny llama GGUF with toy_tokenizer's vocabulary (`prefix` names its words) and special tokens."""
    rng = np.random.default_rng(seed)
    tokens = ["<s>", "</s>", "<unk>"] + [f"{prefix}{i}" for i in range(3, VOCAB)]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL] * 3 + [TokenType.NORMAL] * (VOCAB - 3))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    kv = hidden // 2
    shapes = {"token_embd.weight": (VOCAB, hidden), "output.weight": (VOCAB, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes.update(
            {
                f"blk.{i}.attn_q.weight": (hidden, hidden),
                f"blk.{i}.attn_k.weight": (kv, hidden),
                f"blk.{i}.attn_v.weight": (kv, hidden),
                f"blk.{i}.attn_output.weight": (hidden, hidden),
                f"blk.{i}.ffn_gate.weight": (FFN, hidden),
                f"blk.{i}.ffn_up.weight": (FFN, hidden),
                f"blk.{i}.ffn_down.weight": (hidden, FFN),
                f"blk.{i}.attn_norm.weight": (hidden,),
                f"blk.{i}.ffn_norm.weight": (hidden,),
            }
        )
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, sum(math.prod(s) for s in shapes.values())


def fake_folder(folder, shapes: dict, tokenizer_from, model_type="llama"):
    """A model folder whose safetensors file has a valid header over `shapes` and no data (a sparse file)."""
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    config = json.loads((tokenizer_from / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return folder


def hf_repo(hub, repo_id, folder, commit, ref="main"):
    """Put `folder` into a Hugging Face cache as revision `commit` of `repo_id` (blobs, symlinks, refs)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def tiny(folder, hidden=32, layers=1, seed=1, **tokenizer):
    return save_model_folder(
        make_model("llama", layers=layers, hidden=hidden, seed=seed), toy_tokenizer(**tokenizer), folder
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A HOME with models in every place discovery looks, and what each should be judged."""
    root = tmp_path_factory.mktemp("world")
    home, hub, spare = root / "home", root / "hf" / "hub", root / "spare"
    lms = home / ".lmstudio" / "models"
    main_dir = tiny(lms / "acme" / "Tiny-Chat-7M-Instruct", hidden=64, layers=2, seed=0)
    small = tiny(lms / "acme" / "Tiny-Chat-1M-Instruct-MLX")
    (lms / "acme" / "Tiny-Chat-1M-GGUF").mkdir()
    gguf_file, gguf_params = toy_gguf(lms / "acme" / "Tiny-Chat-1M-GGUF" / "tiny-chat-1m-f32.gguf")
    tiny(lms / "acme" / "Other-Vocab-1M", prefix="v")
    tiny(lms / "acme" / "Other-Eos-1M", eos="w3")
    (lms / "acme" / "Tiny-Chat-1M-GGUF" / "mmproj-tiny-chat-f16.gguf").write_bytes(b"not a model")
    # broken: bad config, weights missing, a GGUF that is not one, weights without config
    broken = tiny(lms / "acme" / "Broken-Config")
    (broken / "config.json").write_text("{not json")
    half = tiny(lms / "acme" / "Half-Download")
    (half / "model.safetensors").unlink()
    (lms / "acme" / "Bad-GGUF").mkdir()
    (lms / "acme" / "Bad-GGUF" / "bad.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 60)
    # LM Studio's settings name another downloads folder; the older settings file is not JSON
    elsewhere = root / "elsewhere"
    (home / ".lmstudio" / "settings.json").write_text(json.dumps({"downloadsFolder": str(elsewhere)}))
    (home / ".cache" / "lm-studio").mkdir(parents=True)
    (home / ".cache" / "lm-studio" / "settings.json").write_text("{oops")
    tiny(elsewhere / "acme" / "Tiny-Chat-3M", hidden=64)  # 1 layer of the main's size: above the size guide
    # Hugging Face cache: the revision `main` points to has the toy vocabulary, an older one another
    newest = hf_repo(hub, "acme/Tiny-Chat-0.5M-Instruct", tiny(spare / "hf-new", hidden=16), "b" * 40)
    hf_repo(hub, "acme/Tiny-Chat-0.5M-Instruct", tiny(spare / "hf-old", hidden=16, prefix="x"), "a" * 40, ref=None)
    damaged = hf_repo(hub, "acme/Damaged", tiny(spare / "damaged", hidden=16), "c" * 40)
    os.unlink(os.path.realpath(damaged / "model.safetensors"))
    # --search: an unsupported architecture, and a "7B" whose safetensors holds a header and no data
    search = root / "search"
    fake_folder(search / "weird-1M", {"w": (VOCAB, 16)}, small, model_type="no_such_arch")
    big = fake_folder(
        search / "Tiny-Chat-7B",
        {"model.embed_tokens.weight": (VOCAB, 64), "model.layers.0.mlp.up_proj.weight": (100_000, 70_000)},
        small,
    )
    return dict(
        root=root,
        home=home,
        hf_home=root / "hf",
        cache=root / "cache",
        main=main_dir,
        small=small,
        gguf=gguf_file,
        gguf_params=gguf_params,
        hf=newest,
        search=search,
        big=big,
    )


@pytest.fixture
def env(world, monkeypatch):
    monkeypatch.setenv("HOME", str(world["home"]))
    monkeypatch.setenv("HF_HOME", str(world["hf_home"]))
    monkeypatch.setenv("MLX_SPEC_CACHE", str(world["cache"]))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return world


EXPECTED = [  # name, where, format, status, reason (a regular expression)
    ("acme/Tiny-Chat-0.5M-Instruct", "HF cache", "mlx", "compatible", None),
    ("acme/Tiny-Chat-1M-Instruct-MLX", "LM Studio", "mlx", "compatible", None),
    ("acme/Tiny-Chat-1M-GGUF/tiny-chat-1m-f32.gguf", "LM Studio", "gguf", "compatible", None),
    ("acme/Tiny-Chat-3M", "LM Studio", "mlx", "above size guide", r"^49.5K > 43.2K for a 86.5K main model"),
    ("weird-1M", "search", "mlx", "incompatible", "unsupported architecture 'no_such_arch'"),
    ("acme/Other-Eos-1M", "LM Studio", "mlx", "incompatible", r"different end tokens: \{1: '</s>'\} vs \{3: 'w3'\}"),
    (
        "acme/Other-Vocab-1M",
        "LM Studio",
        "mlx",
        "incompatible",
        r"different vocabularies \(94 of 97 ids differ; id 3: 'w3' vs 'v3'",
    ),
    ("Tiny-Chat-7B", "search", "mlx", "incompatible", r"not smaller than the main model \(7B vs 86.5K"),
    ("acme/Broken-Config", "LM Studio", "mlx", "skipped", "config.json is not valid JSON"),
    ("acme/Damaged", "HF cache", "mlx", "skipped", "Blob missing"),
    ("acme/Half-Download", "LM Studio", "mlx", "skipped", r"no weights \(\*.safetensors\) \(half-downloaded\?\)"),
    ("acme/Bad-GGUF/bad.gguf", "LM Studio", "gguf", "skipped", "damaged GGUF header"),
]


def check_expected(drafts):
    assert [d.name for d in drafts] == [e[0] for e in EXPECTED]
    for d, (_, where, fmt, status, reason) in zip(drafts, EXPECTED):
        assert (d.where, d.format, d.status) == (where, fmt, status), d
        assert d.reason is None if reason is None else re.search(reason, d.reason), d


def test_every_place_every_verdict_best_first(env):
    drafts = mlx_spec.find_drafts(str(env["main"]), search=[env["search"]])
    check_expected(drafts)
    by_name = {d.name: d for d in drafts}
    assert by_name["acme/Tiny-Chat-0.5M-Instruct"].path == str(env["hf"])  # the revision refs/main names
    assert by_name["acme/Tiny-Chat-1M-GGUF/tiny-chat-1m-f32.gguf"].num_params == env["gguf_params"]
    assert by_name["Tiny-Chat-7B"].num_params == 100_000 * 70_000 + VOCAB * 64
    assert by_name["acme/Tiny-Chat-1M-Instruct-MLX"].num_params == env["gguf_params"]  # same shapes: MLX first
    assert [d.compatible for d in drafts] == [True] * 4 + [False] * 8
    assert "mmproj" not in " ".join(by_name)


def test_verdicts_agree_with_check_draft_at_load_time(env, tmp_path, monkeypatch):
    """One rule: what discovery calls compatible loads and passes check_draft; what it refuses for the
    vocabulary or special tokens, check_draft refuses with the same reason."""
    monkeypatch.setenv("MLX_SPEC_CACHE", str(tmp_path / "cache"))  # the GGUF's conversion goes there
    model, _ = mlx_spec.load(str(env["main"]))
    drafts = mlx_spec.find_drafts(model, search=[env["search"]])
    check_expected(drafts)
    for d in drafts:
        if d.status in ("compatible", "above size guide"):
            draft, _ = mlx_spec.load(d.path)
            check_draft(model, draft)
        elif d.reason.startswith("different"):
            draft, _ = mlx_spec.load(d.path)
            with pytest.raises(mlx_spec.IncompatibleDraftError) as refused:
                check_draft(model, draft)
            assert str(refused.value).endswith(d.reason)


def test_table(env, capsys):
    assert main(["drafts", "--model", str(env["main"]), "--search", str(env["search"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "Draft models for Tiny-Chat-7M-Instruct (llama, 86.5K parameters; LM Studio's size guide: drafts up to 43.2K):"
    )
    header, rows = out[2], out[3 : 3 + len(EXPECTED)]
    assert header.split() == ["name", "where", "format", "params", "size", "verdict"]
    for column in ("where", "format", "params", "size", "verdict"):  # aligned
        start = header.index(column)
        assert all(row[start - 2 : start] == "  " and row[start] != " " for row in rows), column
    assert [row.split()[0] for row in rows] == [e[0] for e in EXPECTED]
    best = mlx_spec.find_drafts(env["main"])[0]
    size = f"{best.size_bytes / 1e3:.3g} KB"
    assert rows[0].split() == [
        "acme/Tiny-Chat-0.5M-Instruct",
        "HF",
        "cache",
        "MLX",
        "10.1K",
        *size.split(),
        "compatible",
    ]
    assert rows[3].endswith("above size guide: 49.5K > 43.2K for a 86.5K main model, may make generation slower")
    assert rows[-1].endswith(
        "skipped: damaged GGUF header (a string of 18446744073709551615 bytes past the end of the file)"
    )
    assert out[-1] == f"--draft-model auto picks acme/Tiny-Chat-0.5M-Instruct: {env['hf']}"


def test_json(env, capsys):
    assert main(["drafts", "--model", str(env["main"]), "--search", str(env["search"]), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in listed] == [e[0] for e in EXPECTED]
    assert listed[0] == {
        "name": "acme/Tiny-Chat-0.5M-Instruct",
        "path": str(env["hf"]),
        "where": "HF cache",
        "format": "mlx",
        "architecture": "llama",
        "num_params": listed[0]["num_params"],
        "size_bytes": sum(p.stat().st_size for p in env["hf"].iterdir()),
        "status": "compatible",
        "reason": None,
        "compatible": True,
    }
    assert listed[2]["format"] == "gguf" and listed[2]["size_bytes"] == env["gguf"].stat().st_size


def test_auto_picks_the_best_draft_and_says_which(env, capsys):
    argv = ["generate", "--model", str(env["main"]), "-p", "w10 w11", "-m", "12", "--json"]
    assert main(argv + ["--draft-model", "auto"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["draft_model"] == str(env["hf"])
    assert "draft model: acme/Tiny-Chat-0.5M-Instruct (HF cache, 10.1K parameters)" in err
    assert main(argv + ["--no-draft"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == result["tokens"]
    assert discover.resolve_draft(str(env["main"]), "some/other", progress=print) == "some/other"


def test_nothing_fits(env, tmp_path, capsys):
    lone = tiny(tmp_path / "Lonely-Coder-7M-Instruct", hidden=64, layers=2, prefix="z")
    num_found = len(mlx_spec.find_drafts(lone))
    assert main(["drafts", "--model", str(lone)]) == 0
    sentence = (
        f"No compatible draft model for Lonely-Coder-7M-Instruct among the {num_found} local models found: look for a "
        "smaller Lonely-Coder model of at most 43.2K parameters with the same tokenizer (97-token vocabulary, "
        "eos_token '</s>')."
    )
    assert capsys.readouterr().out.splitlines()[-1] == sentence
    assert main(["chat", "--model", str(lone), "--draft-model", "auto"]) == 1
    assert capsys.readouterr().err == f"mlx-spec: error: {sentence}\n"
    with pytest.raises(discover.NoCompatibleDraftError):
        discover.resolve_draft(lone, "auto")


def test_only_metadata_is_read(env, tmp_path, monkeypatch):
    """Weights are never read: safetensors files up to their header's end, GGUF files without GGUFReader, and a
    folder whose tensor data is garbage scans like the real one."""
    garbage = shutil.copytree(env["small"], tmp_path / "garbage" / "Tiny-Chat-1M-Garbage")
    weights = garbage / "model.safetensors"
    header_end = 8 + struct.unpack("<Q", weights.read_bytes()[:8])[0]
    with open(weights, "r+b") as f:
        f.seek(header_end)
        f.write(os.urandom(weights.stat().st_size - header_end))
    read = {}
    real_open = open

    class Spy:
        def __init__(self, path, mode="r", *args, **kwargs):
            self.path, self.file = str(path), real_open(path, mode, *args, **kwargs)

        def read(self, size=-1):
            data = self.file.read(size)
            read[self.path] = read.get(self.path, 0) + len(data)
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def no_weights(*args, **kwargs):
        raise AssertionError("a scan must not read tensors")

    monkeypatch.setattr(discover, "open", Spy, raising=False)
    for reader in (gguf, "GGUFReader"), (mlx_lm, "load"), (mx, "load"):
        monkeypatch.setattr(*reader, no_weights)
    for cache in ("_described", "_vocabularies", "_token_ids", "_verdicts"):  # read everything afresh
        monkeypatch.setattr(discover, cache, {})
    drafts = {d.name: d for d in mlx_spec.find_drafts(env["main"], search=[env["search"], tmp_path / "garbage"])}
    assert drafts["Tiny-Chat-1M-Garbage"].status == "compatible"
    assert drafts["Tiny-Chat-1M-Garbage"].num_params == drafts["acme/Tiny-Chat-1M-Instruct-MLX"].num_params
    assert drafts["Tiny-Chat-7B"].size_bytes > 14e9  # its 14 GB of data, never read
    assert str(env["big"] / "model.safetensors") in read and str(weights) in read
    for path, num_bytes in read.items():
        with real_open(path, "rb") as f:
            assert num_bytes == 8 + struct.unpack("<Q", f.read(8))[0], path


def test_truncated_or_odd_files_are_skipped_with_a_reason(env, tmp_path):
    cut = shutil.copytree(env["small"], tmp_path / "cut" / "Cut-1M")
    os.truncate(cut / "model.safetensors", (cut / "model.safetensors").stat().st_size - 4)
    (tmp_path / "cut" / "cut.gguf").write_bytes(env["gguf"].read_bytes()[:-4])
    odd = fake_folder(tmp_path / "cut" / "Odd-1M", {"w": (VOCAB, 16)}, env["small"])
    header = json.dumps({"w": {"dtype": "F32", "shape": "oops", "data_offsets": [0, 4]}}).encode()
    (odd / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    drafts = {d.name: d for d in mlx_spec.find_drafts(env["main"], search=[tmp_path / "cut"])}
    assert drafts["Cut-1M"].reason == "model.safetensors is shorter than its header says (half-downloaded?)"
    assert drafts["cut.gguf"].reason == "cut.gguf is shorter than its header says (half-downloaded?)"
    assert drafts["Odd-1M"].reason.startswith("unexpected metadata (TypeError: ")
    assert {drafts[name].status for name in ("Cut-1M", "cut.gguf", "Odd-1M")} == {"skipped"}


def test_hf_hub_cache_variable_and_hub_id_main(env, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snapshot = hf_repo(hub, "acme/Tiny-Chat-7M-Instruct", env["main"], "d" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    drafts = mlx_spec.find_drafts("acme/Tiny-Chat-7M-Instruct")  # found through the cache, and not its own draft
    assert "acme/Tiny-Chat-0.5M-Instruct" not in [d.name for d in drafts]  # HF_HUB_CACHE wins over HF_HOME
    assert "acme/Tiny-Chat-7M-Instruct" in [d.name for d in drafts]  # the LM Studio copy: same size
    assert discover.main_model("acme/Tiny-Chat-7M-Instruct") == (snapshot, "acme/Tiny-Chat-7M-Instruct")
    with pytest.raises(ValueError, match="main model not found on disk: acme/nothing"):
        mlx_spec.find_drafts("acme/nothing")


def test_default_pair_and_its_cache(env, tmp_path, monkeypatch, capsys):
    """Without --model the default pair's main; auto picks its draft from mlx_spec's cache, where a GGUF
    file already converted is not listed twice."""
    monkeypatch.setenv("MLX_SPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    main_dir, draft_dir = default_pair_paths()
    shutil.copytree(env["main"], main_dir)
    shutil.copytree(env["small"], draft_dir)
    (tmp_path / "cache" / "gguf").mkdir()
    toy_gguf(tmp_path / "cache" / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf")
    toy_gguf(tmp_path / "cache" / "gguf" / "other-0.5m.gguf", hidden=16)
    assert main(["drafts", "--json"]) == 0
    listed = [(d["name"], d["where"], d["status"]) for d in json.loads(capsys.readouterr().out)]
    assert listed == [
        ("other-0.5m.gguf", "mlx_spec cache", "compatible"),
        (draft_dir.name, "mlx_spec cache", "compatible"),
    ]
    (tmp_path / "cache" / "gguf" / "other-0.5m.gguf").unlink()
    assert main(["generate", "--draft-model", "auto", "-p", "w10", "-m", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["draft_model"] == str(draft_dir)
    shutil.rmtree(main_dir)
    assert main(["drafts"]) == 1
    assert "the default pair is not fetched yet" in capsys.readouterr().err


def test_rescan_sees_a_changed_model(env, tmp_path):
    folder = shutil.copytree(env["small"], tmp_path / "mine" / "Mine-1M")
    first = mlx_spec.find_drafts(env["main"], search=[tmp_path / "mine"])
    assert next(d for d in first if d.name == "Mine-1M").status == "compatible"
    assert discover.describe(folder) is discover.describe(folder)  # cached
    toy_tokenizer(prefix="q").save_pretrained(str(folder))
    again = next(d for d in mlx_spec.find_drafts(env["main"], search=[tmp_path / "mine"]) if d.name == "Mine-1M")
    assert again.status == "incompatible" and "'w3' vs 'q3'" in again.reason


def test_special_token_strings_that_differ_are_a_note_not_a_refusal(env, tmp_path, capsys):
    """A draft whose bos / pad strings differ from the main model's while its ids and end tokens agree (an MLX Qwen
    draft for a GGUF-converted Qwen) is compatible, with a note; check_draft agrees: a warning, not an error."""
    tokenizer = toy_tokenizer()
    tokenizer.bos_token, tokenizer.pad_token = None, "<unk>"
    folder = save_model_folder(make_model("llama", layers=1, hidden=32, seed=1), tokenizer, tmp_path / "s" / "No-Bos")
    note = "special token strings differ, metadata only (bos_token: '<s>' vs None; pad_token: None vs '<unk>')"
    drafts = {d.name: d for d in mlx_spec.find_drafts(str(env["main"]), search=[tmp_path / "s"])}
    assert (drafts["No-Bos"].status, drafts["No-Bos"].compatible, drafts["No-Bos"].reason) == ("compatible", True, note)
    assert main(["drafts", "--model", str(env["main"]), "--search", str(tmp_path / "s")]) == 0
    assert any(
        row.startswith("No-Bos ") and row.endswith(f"  compatible: {note}")
        for row in capsys.readouterr().out.splitlines()
    )
    main_info, info = discover.describe(env["main"]), discover.describe(folder)
    above = dataclasses.replace(info, num_params=int(main_info.num_params * 0.6))  # above the guide, below the main
    status, reason = discover.verdict(main_info, above)
    assert status == "above size guide" and reason.endswith(f"may make generation slower; {note}")
    model, _ = mlx_spec.load(str(env["main"]))
    draft, _ = mlx_spec.load(str(folder))
    with pytest.warns(DraftMetadataWarning, match=re.escape("(bos_token: '<s>' vs None; pad_token: None vs '<unk>')")):
        check_draft(model, draft)


def test_bad_search_folder_is_one_line(env, capsys):
    assert main(["drafts", "--model", str(env["main"]), "--search", "/no/such/dir"]) == 1
    assert capsys.readouterr().err == "mlx-spec: error: search folder not found: /no/such/dir\n"
    assert main(["drafts", "--model", "/no/such/model"]) == 1
    assert "main model not found on disk: /no/such/model" in capsys.readouterr().err


# --- pure parts ----------------------------------------------------------------------------------


def test_incompatibility_rule():
    tokens = {0: "<s>", 1: "</s>", 2: "a", 3: "b"}
    special = special_tokens("<s>", "</s>", None, {1})
    assert incompatibility(tokens, dict(tokens), 4, special, dict(special)) is None
    padded = {**tokens, 4: "<pad1>", 5: "<pad2>"}
    assert incompatibility(tokens, padded, 4, special, special) is None  # beyond what the main model emits
    assert incompatibility(tokens, {**tokens, 2: "x", 3: None}, 4, special, special) == (
        "different vocabularies (2 of 4 ids differ; id 2: 'a' vs 'x', id 3: 'b' vs None)"
    )
    assert incompatibility({0: "a"}, {0: "a", 1: "b"}, 2, special, special) == (
        "different vocabularies (1 of 2 ids differ; id 1: None vs 'b')"
    )
    other = special_tokens("<s>", "</s>", None, {1, 3})
    assert (
        incompatibility(tokens, tokens, 4, special, other) == "different end tokens: {1: '</s>'} vs {1: '</s>', 3: 'b'}"
    )
    assert metadata_difference(special, dict(special)) is None
    # the token strings alone are metadata: not a refusal, a difference to report
    for metadata in (special_tokens(None, "</s>", "<s>", {1}), special_tokens("<s>", "b", None, {1})):
        assert incompatibility(tokens, tokens, 4, special, metadata) is None
    assert metadata_difference(special, special_tokens(None, "</s>", "<s>", {1})) == (
        "bos_token: '<s>' vs None; pad_token: None vs '<s>'"
    )
    assert metadata_difference(special, special_tokens("<s>", "b", None, {1})) == "eos_token: '</s>' vs 'b'"


@pytest.mark.parametrize(
    "main_params, limit",
    [(7.6e9, 1.25e9), (8.0e9, 1.25e9), (14.8e9, 3.75e9), (32.8e9, 8.75e9), (70e9, 70e9 * 7 / 32), (1.54e9, 0.77e9)],
)
def test_size_guide(main_params, limit):
    assert discover.size_guide(main_params) == pytest.approx(limit)


def test_gguf_header_matches_gguf_reader(tmp_path):
    from test_gguf import write_model

    write_model(tmp_path / "m.gguf", "llama", rope_freqs=True)
    fields, shapes, num_bytes = read_header(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert fields == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert shapes == {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert num_bytes == (tmp_path / "m.gguf").stat().st_size
    data = (tmp_path / "m.gguf").read_bytes()
    for name, content, message in [
        ("short.gguf", data[:3000], "damaged GGUF header"),
        ("magic.gguf", b"GGML" + data[4:], "not a GGUF file"),
        ("empty.gguf", b"", "not a GGUF file"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}: {message}"):
            read_header(tmp_path / name)


def test_quantized_weights_count_unpacked(tmp_path):
    model = make_model("llama", layers=2, hidden=64)
    expected = sum(w.size for _, w in tree_flatten(model.parameters()))

    def bits(path, module):  # lm_head in 8 bits, the other layers in 4
        return hasattr(module, "to_quantized") and {"group_size": 32, "bits": 8 if path == "lm_head" else 4}

    nn.quantize(model, class_predicate=bits)
    folder = save_model_folder(model, toy_tokenizer(), tmp_path / "q4")
    config = json.loads((folder / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4, "lm_head": {"group_size": 32, "bits": 8}}
    (folder / "config.json").write_text(json.dumps(config))
    assert mlx_spec.load(str(folder))[0].lm_head.bits == 8
    assert discover.describe(folder).num_params == expected


def test_bpe_vocabulary_read_without_merges(tmp_path):
    """A byte-level BPE tokenizer.json (merges last) gives the vocabulary its loaded tokenizer has, added
    tokens included; the same file with another key order is read whole, to the same result."""
    from test_gguf import write_model

    write_model(tmp_path / "m.gguf", "qwen2")
    folder = mlx_spec.gguf.convert_gguf(tmp_path / "m.gguf", tmp_path / "bpe", progress=lambda _: None)
    _, tokenizer = mlx_spec.load(str(folder))
    loaded = {i: t for t, i in tokenizer.get_vocab().items()}
    info = discover.describe(folder)
    assert info.tokens == loaded and info.special == special_tokens(
        tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.eos_token_ids
    )
    data = json.loads((folder / "tokenizer.json").read_text())
    assert data["model"]["merges"] and list(data)[-1] == "model"
    reordered = shutil.copytree(folder, tmp_path / "reordered")
    (reordered / "tokenizer.json").write_text(
        json.dumps({"model": data["model"], **{k: v for k, v in data.items() if k != "model"}})
    )
    assert discover.describe(reordered).tokens == loaded


def test_bench_auto(env, tmp_path):
    from test_bench import args_for

    from mlx_spec import bench

    said = []
    a = args_for(
        tmp_path, model=str(env["main"]), draft_model="auto", prompt=["w5 w6"], max_tokens=4, draft_lengths="2"
    )
    a.no_peer = True
    assert bench.run(a, progress=said.append) == 0
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["models"]["draft"] == str(env["hf"])
    assert said[0] == "draft model: acme/Tiny-Chat-0.5M-Instruct (HF cache, 10.1K parameters)"
