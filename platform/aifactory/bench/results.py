"""Versioned benchmark records under the factory home: one folder per run.

``<home bench store>/runs/<run_id>/run.json`` holds the :class:`RunRecord` (spec, context, pricing basis);
``trials.jsonl`` holds one :class:`TrialRecord` per line. Every record carries ``schema_version`` so that a
later reader can tell old records from new ones. The store may be a local path or a pyarrow URI.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aifactory.exceptions import NotFound
from aifactory.home import FactoryHome, filesystem, is_uri

SCHEMA_VERSION = 1


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


def _read_folder(folder: Path) -> tuple[RunRecord, list[TrialRecord]]:
    if not (folder / "run.json").is_file():
        raise NotFound("benchmark run folder", str(folder), "expected run.json and trials.jsonl in it")
    run = RunRecord.model_validate_json((folder / "run.json").read_text())
    trials = [TrialRecord.model_validate(json.loads(line))
              for line in (folder / "trials.jsonl").read_text().splitlines() if line.strip()]
    return run, trials
