"""Time `find_drafts` over 50 Qwen-sized local models (metadata only), in a fresh process, as a user's first scan.

40 folders share the default draft's tokenizer.json, 10 have vocabularies of their own (two tokens swapped);
weights are safetensors headers over sparse files, so no weight byte exists to read.

Usage: python benchmarks/discover_scan.py   (needs the default pair: scripts/fetch_models.py)
"""

import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

from mlx_spec.fetch import fetch_default_pair


def write_model(folder: Path, source: Path, tokenizer_json: bytes) -> None:
    folder.mkdir(parents=True)
    for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    (folder / "tokenizer.json").write_bytes(tokenizer_json)
    shapes = {"model.embed_tokens.weight": [151936, 896], "model.norm.weight": [896]}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: the data is never written, and must never be read


def main() -> None:
    from mlx_spec.discover import find_drafts

    main_dir, draft_dir = fetch_default_pair(progress=lambda s: print(s, file=sys.stderr))
    shared = (draft_dir / "tokenizer.json").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(50):
            tokenizer = shared
            if i >= 40:  # a vocabulary of its own: two tokens swapped
                data = json.loads(shared)
                vocab = data["model"]["vocab"]
                a, b = sorted(vocab, key=vocab.get)[1000 + i : 1002 + i]
                vocab[a], vocab[b] = vocab[b], vocab[a]
                tokenizer = json.dumps(data).encode()
            write_model(root / f"model-{i:02d}", draft_dir, tokenizer)
        os.environ["HOME"] = str(root / "home")  # no LM Studio or other caches but the search folder
        os.environ["HF_HOME"] = str(root / "hf")
        start = time.perf_counter()
        drafts = find_drafts(str(main_dir), search=[root])
        first = time.perf_counter() - start
        start = time.perf_counter()
        find_drafts(str(main_dir), search=[root])
        again = time.perf_counter() - start
    verdicts = {}
    for d in drafts:
        verdicts[d.status] = verdicts.get(d.status, 0) + 1
    print(f"{len(drafts)} models: {verdicts}; first scan {first:.2f} s, again {again * 1000:.0f} ms")


if __name__ == "__main__":
    main()
