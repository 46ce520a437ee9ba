"""Entry point: `python -m rollout_side serve --help`."""

from rollout_side.cli import main

if __name__ == "__main__":
    main()
