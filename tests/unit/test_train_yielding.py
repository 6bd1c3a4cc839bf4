"""The yield request a dispatcher writes for a training run, and what a yielded run looks like to its callers
(no Ray: the worker loop's side is tests/integration/test_train.py)."""

from __future__ import annotations

import json
import pickle

import pytest

from aifactory.exceptions import ConfigError, Preempted
from aifactory.home import FactoryHome
from aifactory.train import yielding
from aifactory.train.yielding import (
    PREEMPTED_EXIT_CODE, clear_yield, read_request, request_path, request_yield, yield_requested,
)

RUN = "train-20261202-101500-a1b2c3"


@pytest.fixture
def home(tmp_path):
    return FactoryHome.from_env(tmp_path / "factory").ensure()


def test_request_is_durable_beside_the_run_and_says_why(home):
    assert yield_requested(home, RUN) is None
    request_yield(home, RUN, reason="factory-lane train-x needs 4 CPU")
    path = home.runs_dir / RUN / "yield-request.json"
    assert request_path(home, RUN) == path and path.is_file()
    assert yield_requested(home, RUN) == "factory-lane train-x needs 4 CPU"
    # a fresh process (the worker, a restarted dispatcher) reads the same request from the file alone
    assert json.loads(path.read_text())["reason"] == "factory-lane train-x needs 4 CPU"


def test_a_request_without_reason_is_still_a_request(home):
    request_yield(home, RUN)
    assert yield_requested(home, RUN) == ""  # "" is a request; None is none


def test_write_is_atomic_and_a_second_request_replaces_the_first(home):
    request_yield(home, RUN, reason="a")
    first = read_request(home, RUN)
    request_yield(home, RUN, reason="b")
    second = read_request(home, RUN)
    assert second.reason == "b" and second.request_id != first.request_id
    assert [p.name for p in (home.runs_dir / RUN).iterdir()] == ["yield-request.json"]  # no temp file left


def test_clear_drops_the_request_and_is_idempotent(home):
    request_yield(home, RUN, reason="a")
    clear_yield(home, RUN)
    assert yield_requested(home, RUN) is None
    clear_yield(home, RUN)  # nothing to clear: no error


def test_clear_by_id_keeps_a_request_written_after_the_one_honoured(home):
    request_yield(home, RUN, reason="honoured")
    honoured = read_request(home, RUN).request_id
    request_yield(home, RUN, reason="new, after the run yielded")
    clear_yield(home, RUN, request_id=honoured)
    assert yield_requested(home, RUN) == "new, after the run yielded"
    clear_yield(home, RUN, request_id=read_request(home, RUN).request_id)
    assert yield_requested(home, RUN) is None


def test_an_unreadable_request_file_still_asks_for_room(home):
    path = request_path(home, RUN)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    reason = yield_requested(home, RUN)
    assert reason is not None and "unreadable yield request" in reason


@pytest.mark.parametrize("bad", ["", "../other-run", "a/b", ".hidden", "x" * 129, "run id"])
def test_a_run_id_that_is_not_one_directory_name_is_refused(home, bad):
    with pytest.raises(ConfigError, match="run_id"):
        request_yield(home, bad)
    assert not any(home.root.rglob("yield-request.json"))


def test_preempted_is_exit_75_and_pickles_with_its_fields():
    assert PREEMPTED_EXIT_CODE == 75 == Preempted.exit_code
    err = pickle.loads(pickle.dumps(Preempted(RUN, 7, "factory lane")))
    assert (err.run_id, err.step, err.reason) == (RUN, 7, "factory lane")
    assert f"AIFACTORY_RUN_ID={RUN}" in str(err) and "step 7" in str(err)


def _workload():
    from aifactory.tenancy import TenantRef, WorkloadKind
    from aifactory.workloads import Resources, Workload

    return Workload(kind=WorkloadKind.TRAIN, tenant=TenantRef(tenant="itest"), name="tiny-gpt", resources=Resources(cpu=2))


def test_the_front_door_records_a_yield_as_preempted_not_failed(home):
    from aifactory.cost.ledger import Ledger
    from aifactory.workloads import launch, read_record

    def run(handle):
        raise Preempted(handle.id, 6, "factory lane")

    with pytest.raises(Preempted):
        launch(_workload(), home=home, run=run, record_id=RUN)
    record = read_record(home, RUN)
    assert record.status == "preempted" and record.error is None and record.finished_at is not None
    assert record.refs["preempted_at_step"] == "6"
    assert [e["kind"] for e in Ledger.of(home).events(tenant="itest")] == ["run"]  # no run_failed

    launch(_workload(), home=home, run=lambda handle: None, record_id=RUN)  # resumed under the same id
    assert read_record(home, RUN).status == "succeeded"
    assert [e["kind"] for e in Ledger.of(home).events(tenant="itest")] == ["run"]  # one run, not two


def test_resuming_after_a_preemption_is_not_a_retry():
    from aifactory.train.runner import record_outcome_events

    class Handle:
        def __init__(self):
            self.events = []

        def event(self, kind, key):
            self.events.append((kind, key))

    handle = Handle()
    restarts = [{"from_step": 6, "cause": "preemption"}, {"from_step": 8, "cause": "failure"}, {"from_step": 8}]
    record_outcome_events(handle, {"metrics": {"restarts": restarts, "registered": []}})
    assert handle.events == [("retry", "retry:0"), ("retry", "retry:1")]  # the fault and the pre-cause one


def test_job_entrypoint_exits_75_when_the_run_yields(monkeypatch, home, capsys):
    import ray

    import aifactory.cluster.connect
    import aifactory.train.runner
    from jobs import train as train_job

    seen = {}

    def fake_run_training(job, *, home, run_id, log):
        seen["run_id"] = run_id
        raise Preempted(run_id, 6, "factory lane")

    monkeypatch.setenv("AIFACTORY_HOME", str(home.root))
    monkeypatch.setenv("AIFACTORY_RUN_ID", RUN)  # what the dispatcher sets on every dispatch
    monkeypatch.setattr(aifactory.cluster.connect, "apply_ray_env", lambda home: None)
    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(aifactory.train.runner, "run_training", fake_run_training)
    assert train_job.main(["--recipe", "tiny"]) == PREEMPTED_EXIT_CODE
    assert seen["run_id"] == RUN
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == {"run_id": RUN, "status": "preempted", "step": 6, "reason": "factory lane"}


def test_module_stays_light():
    import subprocess
    import sys

    code = "import sys, aifactory.train.yielding; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], "the dispatcher imports yielding: it must not pull in torch or Ray"
    assert yielding.REQUEST_FILE == "yield-request.json"
