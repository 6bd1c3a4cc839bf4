"""A small stage runner: progress with ETA, a summary table, and a clear failure point.

Stages share a :class:`RunContext` (the cluster, the tenant, and ``artifacts`` that one stage hands the
next, such as a dataset version or a model version). A stage returns a :class:`StageResult` with the
figures it wants in the summary.
"""

from __future__ import annotations

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
            ctx.log(f"[{i}/{total}] {stage.name}: FAILED with an unexpected error:\n{traceback.format_exc()}")
            failed = True
    ctx.log(f"all stages done in {_mmss(time.monotonic() - t_start)}")
    return outcomes


def _mmss(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"
