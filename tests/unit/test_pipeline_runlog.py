"""``factory run``'s terminal shows only progress and the summary; everything else goes to the run's log file.

Each case runs in a fresh interpreter (its stdout is what a terminal would show), as ``factory run`` does:
RunLog points file descriptors 1 and 2 at the log, so child processes (Ray's workers and raylet) and library
warnings land there too.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(tmp_path, body: str) -> tuple[str, str]:
    script = textwrap.dedent("""
        import os, subprocess, sys, warnings
        from aifactory.pipeline.runner import RunLog, RunContext, Stage, StageResult, run_pipeline
        log_path = sys.argv[1]
    """) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run.log")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr, (tmp_path / "run.log").read_text()


def test_only_said_lines_reach_the_terminal_and_the_log_has_everything(tmp_path):
    terminal, log = _run(tmp_path, """
        with RunLog(log_path) as run_log:
            run_log.say("[1/1] stage: ok")
            print("a worker's output forwarded to the driver")
            warnings.warn("a library warning")
            subprocess.run([sys.executable, "-c", "print('a child process writes to fd 1')"], check=True)
            os.write(2, b"raw stderr\\n")
            run_log.say("report: /x/report.html")
        print("after the block: the terminal again")
    """)
    assert terminal.splitlines() == ["[1/1] stage: ok", "report: /x/report.html", "after the block: the terminal again"]
    for line in ("[1/1] stage: ok", "a worker's output", "a library warning", "a child process writes to fd 1",
                 "raw stderr", "report: /x/report.html"):
        assert line in log
    assert log.index("[1/1] stage: ok") < log.index("a worker's output") < log.index("report: /x/report.html")


def test_a_crashing_stage_is_one_line_on_the_terminal_and_its_traceback_in_the_log(tmp_path):
    terminal, log = _run(tmp_path, """
        def boom(ctx):
            raise KeyError("deep inside a stage")
        with RunLog(log_path) as run_log:
            ctx = RunContext(home=None, tenant=None, address=None, embedded=True, log=run_log.say)
            (outcome,) = run_pipeline([Stage("boom", "fails", boom)], ctx)
            assert outcome.status == "failed"
    """)
    lines = terminal.splitlines()
    assert "[1/1] boom: FAILED: KeyError: 'deep inside a stage' (traceback in the log)" in lines
    assert "Traceback" not in terminal
    assert "Traceback (most recent call last)" in log and "in boom" in log


def test_a_run_log_handed_to_another_process_pickles(tmp_path):
    # The bench stage hands ctx.log to Ray Tune, which pickles the trainable with it (issue seen in make run).
    terminal, log = _run(tmp_path, """
        from ray import cloudpickle
        with RunLog(log_path) as run_log:
            say = cloudpickle.loads(cloudpickle.dumps(run_log.say))
            say("a line from a Tune trial")
    """)
    assert "a line from a Tune trial" in log and "a line from a Tune trial" not in terminal
