"""Thin wrapper kept for old commands: the loss benchmark lives in ``topoclip.bench.loss``.

    python bench/loss.py [--batch 1024 ... 32768] [--dim 512] [--tiled] [--repeats 3]
    # same as: topoclip bench loss ...
"""

import sys

from topoclip.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "loss", *sys.argv[1:]]))
