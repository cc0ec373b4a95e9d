"""``python -m topoclip`` = the ``topoclip`` command."""

import sys

from topoclip.cli import main

if __name__ == "__main__":
    sys.exit(main())
