"""Entry point: ``python run.py [group=option ...] [key=value ...]`` (``-m`` for sweeps); see speft/cli.py."""

from speft.cli import entry

if __name__ == "__main__":
    entry()
