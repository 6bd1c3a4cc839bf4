"""A small stage runner: progress with ETA, a summary table, and a clear failure point.

Stages share a :class:`RunContext` (the cluster, the tenant, and ``artifacts`` that one stage hands the
next, such as a dataset version or a model version). A stage returns a :class:`StageResult` with the
figures it wants in the summary. :class:`RunLog` keeps the terminal to progress lines and the summary and
sends everything else the run prints (Ray's worker output, library warnings, tracebacks) to a log file.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aifactory.cluster.connect import ClusterAddress
from aifactory.exceptions import FactoryError
from aifactory.home import FactoryHome
from aifactory.tenancy import TenantRef


class RunLog:
    """A run's two outputs: the terminal, for what :meth:`say` writes, and a log file for everything.

    Inside the ``with`` block file descriptors 1 and 2 point at the log file, so whatever else the process
    or its children print (Ray forwards its workers' output to the driver's stdout; Ray Train's
    ``TrainingReport`` lines, Ray Data's plan lines, warnings) lands there, not on the terminal. :meth:`say`
    writes to both, so the log reads as the whole story. ``write``/``flush`` make it a file for
    :func:`aifactory.cli._output.table`.
    """

    def __init__(self, path: str | os.PathLike):
        from pathlib import Path

        self.path = Path(path)
        self._file = None
        self._terminal = None
        self._saved: tuple[int, int] | None = None

    def __enter__(self) -> RunLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        self._saved = (os.dup(1), os.dup(2))
        self._terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(self._file.fileno(), 1)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        assert self._saved is not None and self._file is not None and self._terminal is not None
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._terminal.close()
        self._file.close()
        self._saved = None

    def write(self, text: str) -> int:
        if self._terminal is None:  # outside the block: a plain print
            return sys.stdout.write(text)
        self._terminal.write(text)
        sys.stdout.flush()  # keep the file's order: what was printed before this line comes before it
        return self._file.write(text)

    def flush(self) -> None:
        if self._terminal is not None:
            self._terminal.flush()
            self._file.flush()

    def say(self, msg: str = "") -> None:
        self.write(msg + "\n")

    def __reduce__(self):
        # A stage may hand ``ctx.log`` to Ray (the bench stage's sweep: Tune pickles the trainable and its
        # closure). Open files do not pickle; on the far side a line goes to that process's stdout, which
        # Ray forwards to the driver, and so into this log.
        return (_ForwardedLog, ())


class _ForwardedLog:
    """What a :class:`RunLog` becomes in another process: lines to its stdout."""

    def say(self, msg: str = "") -> None:
        print(msg, flush=True)

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


@dataclass
class RunContext:
    home: FactoryHome
    tenant: TenantRef
    address: ClusterAddress
    embedded: bool
    artifacts: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)


@dataclass
class StageResult:
    summary: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    note: str = ""


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    fn: Callable[[RunContext], StageResult]
    expected_s: float = 30.0


@dataclass
class StageOutcome:
    stage: Stage
    status: str
    seconds: float
    result: StageResult | None
    error: str | None = None


def run_pipeline(stages: Sequence[Stage], ctx: RunContext, *, keep_going: bool = False) -> list[StageOutcome]:
    """Run ``stages`` in order, printing ``[i/n] name`` lines with an ETA; stop at the first failure."""
    outcomes: list[StageOutcome] = []
    total = len(stages)
    t_start = time.monotonic()
    failed = False
    for i, stage in enumerate(stages, 1):
        remaining = sum(s.expected_s for s in stages[i - 1 :])
        if failed and not keep_going:
            outcomes.append(StageOutcome(stage, "skipped", 0.0, None))
            continue
        ctx.log(f"[{i}/{total}] {stage.name}: {stage.description} (ETA for the rest ~{_mmss(remaining)})")
        t0 = time.monotonic()
        try:
            result = stage.fn(ctx)
            status = "ok" if result.ok else "failed"
            outcomes.append(StageOutcome(stage, status, time.monotonic() - t0, result))
            failed = failed or not result.ok
            ctx.log(f"[{i}/{total}] {stage.name}: {status} in {time.monotonic() - t0:.1f}s {result.note}".rstrip())
        except FactoryError as err:
            outcomes.append(StageOutcome(stage, "failed", time.monotonic() - t0, None, str(err)))
            ctx.log(f"[{i}/{total}] {stage.name}: FAILED: {err}")
            failed = True
        except Exception as err:  # a bug: show where, keep the summary
            outcomes.append(StageOutcome(stage, "failed", time.monotonic() - t0, None, f"{type(err).__name__}: {err}"))
            # One line on the terminal; the traceback goes to the log (stderr is the log file under RunLog).
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            ctx.log(f"[{i}/{total}] {stage.name}: FAILED: {type(err).__name__}: {_first_line(err)} (traceback in the log)")
            failed = True
    ctx.log(f"all stages done in {_mmss(time.monotonic() - t_start)}")
    return outcomes


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _mmss(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"
