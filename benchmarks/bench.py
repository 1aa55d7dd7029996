#!/usr/bin/env python3
"""The benchmark, same as `mlx-spec bench`: python3 benchmarks/bench.py [--quick] [--preset lmstudio-m3pro] ..."""

import sys

from mlx_spec.cli import main

if __name__ == "__main__":
    sys.argv.insert(1, "bench")
    sys.exit(main())
