"""The ``factory`` command. One module per verb group; each renders what the library returns."""

from aifactory.cli.main import main

__all__ = ["main"]
