#!/usr/bin/env bash
# The GPU benchmark in one command, on a CUDA machine with topoclip installed
# (pip install -e ".[test]" and a CUDA build of torch): about 8 minutes, tables in bench-gpu.md.
# Without a GPU it says so and exits 0; `--tiny` runs the plan on the CPU at toy sizes.
set -euo pipefail
exec topoclip bench gpu --output "${OUTPUT:-bench-gpu.md}" "$@"
