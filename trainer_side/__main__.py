"""Entry point: `python -m trainer_side --help`."""

import sys

from trainer_side.cli import main

if __name__ == "__main__":
    sys.exit(main())
