"""Versioned benchmark records: one folder per run, the one result format of sweeps and ``benchmarks/``.

``run.json`` holds the :class:`RunRecord` (spec, context, pricing basis, derived headline figures);
``trials.jsonl`` holds one :class:`TrialRecord` per line (a sweep's trial, or one repeat of one variant of a
``benchmarks/`` script). Every record carries ``schema_version`` so that a later reader can tell old records
from new ones (version 1 had no ``summary``; it still reads). Sweeps write under the factory home
(``<home bench store>/runs/<run_id>/``, a local path or a pyarrow URI, :class:`ResultStore`); the scripts in
``benchmarks/`` write a folder of their own (:func:`record_benchmark`, e.g. ``benchmarks/results/<name>/``).
Either kind of folder is what ``factory bench report`` and ``factory bench compare`` read.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aifactory.exceptions import NotFound
from aifactory.home import FactoryHome, filesystem, is_uri

SCHEMA_VERSION = 2


class TrialRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    run_id: str
    spec_name: str
    kind: str
    tenant: str
    project: str = "default"
    config_id: str
    knobs: dict[str, Any]
    repeat: int
    seed: int
    status: str = Field(description="'ok' or 'error'.")
    error: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, description="Measured and priced figures; None = unavailable.")


class RunRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    run_id: str
    spec_name: str
    kind: str
    tenant: str
    project: str = "default"
    spec: dict[str, Any]
    context: dict[str, Any]
    pricing: dict[str, Any] = Field(description="Price book version and region, or why costs are unavailable.")
    started_at: float
    finished_at: float
    num_trials: int
    num_failed: int
    summary: dict[str, Any] = Field(default_factory=dict, description=(
        "Figures derived from the trials: ratios between variants with their CIs, targets and whether they were met."))

    @property
    def wall_s(self) -> float:
        return self.finished_at - self.started_at


def new_run_id(spec_name: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{spec_name}-{stamp}-{secrets.token_hex(2)}"


class ResultStore:
    """Reads and writes benchmark runs under ``home.bench``."""

    def __init__(self, home: FactoryHome):
        self.home = home
        self.location = home.bench.rstrip("/") + "/runs"
        self.fs, self.root = filesystem(self.location)

    def _path(self, run_id: str, name: str) -> str:
        return f"{self.root}/{run_id}/{name}"

    def write(self, run: RunRecord, trials: list[TrialRecord]) -> str:
        """Write a run; returns its folder. The run record is written last: a run is listed once complete."""
        self.fs.create_dir(f"{self.root}/{run.run_id}", recursive=True)
        lines = "".join(t.model_dump_json() + "\n" for t in trials)
        with self.fs.open_output_stream(self._path(run.run_id, "trials.jsonl")) as f:
            f.write(lines.encode())
        with self.fs.open_output_stream(self._path(run.run_id, "run.json")) as f:
            f.write(run.model_dump_json(indent=2).encode())
        return f"{self.location}/{run.run_id}"

    def list(self) -> list[RunRecord]:
        """Every complete run, oldest first."""
        import pyarrow.fs

        info = self.fs.get_file_info(self.root)
        if info.type == pyarrow.fs.FileType.NotFound:
            return []
        runs = []
        for entry in self.fs.get_file_info(pyarrow.fs.FileSelector(self.root)):
            if entry.type != pyarrow.fs.FileType.Directory:
                continue
            try:
                runs.append(self._read_run(entry.base_name))
            except NotFound:
                continue  # a run still being written (no run.json yet)
        return sorted(runs, key=lambda r: r.started_at)

    def _read_run(self, run_id: str) -> RunRecord:
        try:
            with self.fs.open_input_stream(self._path(run_id, "run.json")) as f:
                return RunRecord.model_validate_json(f.read())
        except FileNotFoundError:
            raise NotFound("benchmark run", run_id, "`factory bench list` shows the runs") from None

    def get(self, run_id: str | None = None) -> tuple[RunRecord, list[TrialRecord]]:
        """A run and its trials; ``None`` = the newest run. ``run_id`` may also be a path to a run folder."""
        if run_id is None:
            runs = self.list()
            if not runs:
                raise NotFound("benchmark run", "(latest)", "run one with `factory bench run smoke`")
            run_id = runs[-1].run_id
        elif "/" in run_id and not is_uri(run_id) and Path(run_id).is_dir():
            return _read_folder(Path(run_id))
        run = self._read_run(run_id)
        with self.fs.open_input_stream(self._path(run_id, "trials.jsonl")) as f:
            text = f.read().decode()
        return run, [TrialRecord.model_validate_json(line) for line in text.splitlines() if line.strip()]

    def report_dir(self, run_id: str) -> Path:
        """Where a run's report goes: beside its records when the store is local, else under the home."""
        if is_uri(self.location):
            return self.home.root / "bench-reports" / run_id
        return Path(self.root) / run_id / "report"


def interleaved(variants: dict[str, Callable[[], dict[str, Any]]], *, repeats: int,
                log: Callable[[str], None] = print) -> dict[str, list[dict[str, Any]]]:
    """Run every variant once per round, ``repeats`` rounds (A B A B ...), so drift of a shared host hits
    every variant alike; returns each variant's repeats in order (what :func:`record_benchmark` takes)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            runs[name].append(fn())
            log(f"  round {r + 1}/{repeats} {name}: " + _short(runs[name][-1]))
    return runs


def _short(s: dict[str, Any]) -> str:
    parts = []
    for k in ("throughput_rps", "tokens_per_s", "p50_ms", "p99_ms", "num_rejected", "num_errors"):
        if s.get(k) is not None:
            parts.append(f"{k}={s[k]:.1f}" if isinstance(s[k], float) else f"{k}={s[k]}")
    return " ".join(parts)


def write_run_folder(folder: str | Path, run: RunRecord, trials: list[TrialRecord]) -> Path:
    """Write a run into ``folder`` (replacing a previous run there); the run record last, as in the store."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trials.jsonl").write_text("".join(t.model_dump_json() + "\n" for t in trials))
    (out / "run.json").write_text(run.model_dump_json(indent=2) + "\n")
    return out


def record_benchmark(name: str, variants: dict[str, list[dict[str, Any]]], *, out_dir: str | Path, kind: str,
                     params: dict[str, Any], summary: dict[str, Any] | None = None,
                     knobs: dict[str, dict[str, Any]] | None = None, context: Any = None, started_at: float,
                     tenant: str = "bench", price_book: Any = None, notes: str = "") -> tuple[RunRecord, list[TrialRecord], Path]:
    """Store a ``benchmarks/`` script's measurements as a run in ``<out_dir>/<name>/``.

    ``variants`` maps each variant (a configuration) to its repeats, one dict of figures per repeat (a load's
    :func:`~aifactory.bench.loadgen.summarize`, a training run's metrics, ...). Each repeat becomes a trial,
    priced like a sweep's trial by :func:`~aifactory.bench.outcomes.price_outcomes` from the resource-seconds
    it records (``replica_cpu_s`` for serving, ``train_cpu_s`` for training). ``kind`` decides the family
    (``serve-*``: serving figures; anything else: training figures) and which runs compare with which.
    """
    from aifactory.bench.context import collect_context
    from aifactory.bench.outcomes import price_outcomes

    if not variants or any(not runs for runs in variants.values()):
        raise ValueError(f"benchmark {name!r}: every variant needs at least one repeat, got "
                         f"{ {k: len(v) for k, v in variants.items()} }")
    family = "serving" if kind.startswith("serve") else "training"
    ctx = context if context is not None else collect_context()
    region = getattr(ctx, "region", "local")
    book, reason = price_book, ""
    if book is None:
        try:
            from aifactory.cost.pricebook import load_price_book

            book = load_price_book()
        except (ImportError, OSError, ValueError) as err:  # costs become "unavailable", never invented
            book, reason = None, f"no price book ({err})"
    run_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started_at))}"
    trials = []
    for config_id, runs in variants.items():
        for repeat, metrics in enumerate(runs):
            m = dict(metrics)
            m.update(price_outcomes(m, family=family, book=book, region=region, tenant=tenant,
                                    unavailable_reason=reason,
                                    metered_reason="a benchmarks/ script's own measurement: priced from the "
                                                   "resources it declares it held x its measured wall time"))
            trials.append(TrialRecord(run_id=run_id, spec_name=name, kind=kind, tenant=tenant, config_id=config_id,
                                      knobs=(knobs or {}).get(config_id, {}), repeat=repeat, seed=repeat,
                                      status="ok", metrics=m))
    run = RunRecord(
        run_id=run_id, spec_name=name, kind=kind, tenant=tenant,
        spec={"name": name, "kind": kind, "params": params, "repeats": max(len(r) for r in variants.values()),
              "ci_method": "t", "variants": list(variants), "notes": notes},
        context=ctx.model_dump(mode="json") if hasattr(ctx, "model_dump") else dict(ctx),
        pricing={"price_book_version": book.version if book else None, "region": region,
                 "basis": "CPU-seconds the measured service / training run held (declared CPUs x measured wall "
                          "time), priced on demand", "unavailable": reason or None},
        started_at=started_at, finished_at=time.time(), num_trials=len(trials), num_failed=0,
        summary=summary or {},
    )
    return run, trials, write_run_folder(Path(out_dir) / name, run, trials)


def _read_folder(folder: Path) -> tuple[RunRecord, list[TrialRecord]]:
    if not (folder / "run.json").is_file():
        raise NotFound("benchmark run folder", str(folder), "expected run.json and trials.jsonl in it")
    run = RunRecord.model_validate_json((folder / "run.json").read_text())
    trials = [TrialRecord.model_validate(json.loads(line))
              for line in (folder / "trials.jsonl").read_text().splitlines() if line.strip()]
    return run, trials
