"""Make OpenBLAS MLX's BLAS on Linux, where the `mlx-cpu` wheel bundles the slow reference BLAS.

`ensure_openblas()` re-executes the process once with Debian's OpenBLAS in `LD_PRELOAD` (~40x faster float32 matmul).
"""

import ctypes
import os
import re
import subprocess
import sys

_GUARD = "MLX_SPEC_OPENBLAS_REEXEC"
_PACKAGE = "libopenblas0-pthread"
_FIX = f"apt-get install {_PACKAGE}"
_KNOWN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
_warned = False


def openblas_config() -> str | None:
    """The build string of the OpenBLAS that serves this process's global BLAS symbols, or None.

    A library bundled with another package (numpy's, with renamed symbols) does not count.
    """
    try:
        get_config = ctypes.CDLL(None).openblas_get_config
    except (AttributeError, OSError):
        return None
    get_config.restype = ctypes.c_char_p
    return get_config().decode()


def mapped_blas_libraries() -> list[str]:
    """Paths of the BLAS libraries mapped into this process (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return []
    return sorted(set(re.findall(r"(/\S*blas\S*\.so\S*)", text)))


def find_openblas() -> str | None:
    """Path of the `libblas.so.3` that Debian's libopenblas0-pthread installs, or None."""
    try:
        listing = subprocess.run(["dpkg", "-L", _PACKAGE], capture_output=True, text=True).stdout
    except OSError:
        listing = ""
    found = [p for p in listing.splitlines() if p.endswith("/openblas-pthread/libblas.so.3")]
    return next((p for p in [*found, *_KNOWN_PATHS] if os.path.isfile(p)), None)


def ensure_openblas() -> None:
    """On Linux, re-exec this process once with OpenBLAS preloaded; warn once if it is not installed.

    Call it at the start of a command-line entry point: the process restarts with the same arguments.
    """
    global _warned
    if not sys.platform.startswith("linux") or openblas_config() is not None:
        return
    library = find_openblas()
    if library is not None and not os.environ.get(_GUARD):
        preload = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
        env = dict(os.environ, LD_PRELOAD=preload, **{_GUARD: "1"})
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    if not _warned:
        _warned = True
        reason = "preloading it did not take effect" if library else f"it is not installed (fix: {_FIX})"
        print(
            f"mlx-spec: warning: MLX runs without OpenBLAS, float32 matmuls are ~40x slower: {reason}", file=sys.stderr
        )


def blas_info() -> str:
    """A one-line description of the BLAS MLX uses in this process, for reports."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    config = openblas_config()
    if config is not None:
        return config
    bundled = [p for p in mapped_blas_libraries() if "openblas" not in os.path.basename(p)]
    where = f" ({bundled[0]})" if bundled else ""
    return f"reference BLAS bundled with mlx{where}: slow; fix: {_FIX}"
