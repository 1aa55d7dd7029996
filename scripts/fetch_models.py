"""Download and convert the default main/draft model pair into the cache, then print both folders.

Usage: python scripts/fetch_models.py   (a second run finds the cached folders and does nothing)
"""

import time

from mlx_spec.fetch import fetch_default_pair


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def main() -> None:
    main_dir, draft_dir = fetch_default_pair(progress=_log)
    print(f"main:  {main_dir}")
    print(f"draft: {draft_dir}")


if __name__ == "__main__":
    main()
