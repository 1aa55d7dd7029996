"""Setting up from nothing: the package installs into a fresh virtual environment, and scripts/setup.sh says
clearly what is missing, before it installs anything."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NO_PYTHON = "setup: mlx_spec needs Python 3.10 or newer, and none was found on the PATH."


def old_python(path: Path) -> Path:
    """A stand-in for a Python older than 3.10 (macOS's own python3 is 3.9): it fails setup.sh's version check."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(0o755)
    return path


def run_setup(tmp_path, **env) -> subprocess.CompletedProcess:
    """scripts/setup.sh with only `dirname`, `uname` and an old python3 on the PATH (no dpkg: the apt steps are
    skipped), its environment under tmp_path."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        old_python(bin_dir / "python3")
        for tool in ("dirname", "uname"):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    return subprocess.run(
        [shutil.which("bash"), str(REPO / "scripts" / "setup.sh")],
        env={"PATH": str(bin_dir), "VENV": str(tmp_path / "venv"), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_setup_without_a_fitting_python_says_how_to_get_one(tmp_path):
    result = run_setup(tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines()[0] == NO_PYTHON
    assert (
        "brew install python@3.12" in result.stderr
        and "PYTHON=/path/to/python3.12 bash scripts/setup.sh" in result.stderr
    )
    assert not (tmp_path / "venv").exists()


def test_setup_refuses_a_python_it_is_pointed_at_that_does_not_fit(tmp_path):
    for python in ("/nonexistent", str(old_python(tmp_path / "old" / "python3.9"))):
        result = run_setup(tmp_path, PYTHON=python)
        assert result.returncode == 1 and result.stderr == f"setup: PYTHON={python} is not a Python 3.10 or newer.\n"
    assert not (tmp_path / "venv").exists()


def test_setup_refuses_an_environment_with_an_old_python(tmp_path):
    old_python(tmp_path / "venv" / "bin" / "python")
    result = run_setup(tmp_path, PYTHON=sys.executable)
    assert result.returncode == 1
    assert result.stderr == (
        f"setup: {tmp_path / 'venv'} has a Python older than 3.10; remove it (rm -rf {tmp_path / 'venv'}) "
        "and run again.\n"
    )


@pytest.mark.slow  # a minute or more: pip resolves and installs every dependency (from its cache when it can)
def test_the_package_installs_into_a_fresh_environment(tmp_path):
    source = tmp_path / "source"  # a copy: pip builds in the source folder
    shutil.copytree(REPO / "mlx_spec", source / "mlx_spec", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # nothing of this checkout
    venv = tmp_path / "venv"

    def run(*args, timeout=300):
        result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)
        assert result.returncode == 0, result.stderr
        return result.stdout

    run(sys.executable, "-m", "venv", str(venv))  # no --system-site-packages: every dependency comes from pip
    run(
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        str(source),
        timeout=1800,
    )
    assert Path(run(str(venv / "bin" / "python"), "-c", "import mlx_spec; print(mlx_spec.__file__)")).is_relative_to(
        venv
    )

    usage = run(str(venv / "bin" / "mlx-spec"), "--help")
    assert all(command in usage for command in ("generate", "chat", "convert", "bench"))
    usage = run(str(venv / "bin" / "mlx-spec"), "generate", "--help")
    assert all(flag in usage for flag in ("--model", "--draft-model", "--num-draft-tokens", "--prompt"))
