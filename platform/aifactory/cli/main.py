"""``factory``: the command-line front of the aifactory library."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from aifactory.cli._output import results_only_on_stdout
from aifactory.exceptions import FactoryError

# Verb groups, each a module with ``register(subparsers)``; order is the order of `factory --help`.
COMMAND_MODULES = [
    "aifactory.cli.cluster",
    "aifactory.cli.jobs",
    "aifactory.cli.queue",
    "aifactory.cli.run",
    "aifactory.cli.data",
    "aifactory.cli.train",
    "aifactory.cli.optimize",
    "aifactory.cli.security",
    "aifactory.cli.bench",
    "aifactory.cli.serve",
    "aifactory.cli.costs",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="factory",
        description="aifactory: data, training, serving and benchmarks on one Ray cluster, "
        "with per-tenant cost accounting.",
    )
    parser.add_argument("--home", help="factory home (default: $AIFACTORY_HOME or ~/.aifactory)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before anything imports Ray: it reads this once, and without it a local node binds the machine's network
    # address instead of 127.0.0.1. The factory keeps local clusters on loopback (a user may still override it).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with results_only_on_stdout(getattr(args, "format", None) in ("json", "csv")):
            rc = args.func(args)
    except FactoryError as err:
        print(f"error: {_one_line_logged(err, args)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def _one_line_logged(err: FactoryError, args) -> str:
    """The error as one line naming its cause; a longer message (a Ray-side traceback) goes whole to
    ``<home>/logs/errors.log``, whose path the line names."""
    import time

    from aifactory.exceptions import ConfigError, one_line
    from aifactory.home import FactoryHome

    text = str(err)
    if isinstance(err, ConfigError) or "\n" not in text.strip():
        return text  # a config's problems are listed in full: the user fixes them all in one go
    line = one_line(text)
    try:
        path = FactoryHome.from_env(getattr(args, "home", None)).root / "logs" / "errors.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} factory {' '.join(sys.argv[1:])}\n{text}\n")
    except OSError as log_err:  # the line still names the cause; say why the rest is not kept
        return f"{line} (full message not logged: {log_err})"
    return f"{line} (full message in {path})"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
