"""The README's quick path runs as written: ingest, train the tiny recipe, deploy with defaults, one completion.

The commands are read from the README's ``<!-- quick-path -->`` block, so the test and the README cannot
drift apart. ``factory up`` and ``factory down`` are the session cluster's (tests/integration/conftest.py);
the completion goes to the session's Serve port instead of the README's 8000. Once, the path ended in
DEPLOY_FAILED: the app's fixed limits (192 + 64 tokens) did not fit the tiny model's 128 positions.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess

from tests.conftest import REPO
from tests.integration.conftest import run_factory


def quick_path() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- quick-path -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no <!-- quick-path --> bash block"
    return [argv for line in block.group(1).splitlines() if (argv := shlex.split(line, comments=True))]


def test_the_readme_quick_path_runs_as_written(factory_cluster, serve_http_port):
    steps = quick_path()
    assert steps[0] == ["factory", "up"] and steps[-1] == ["factory", "down"]
    assert [s[:2] for s in steps[1:-1]][:4] == [["factory", "ingest"], ["factory", "train"],
                                               ["factory", "serve"], ["curl", "-s"]]
    answers = []
    try:
        for argv in steps[1:-1]:
            if argv[0] == "factory":
                run_factory(*argv[1:], home=factory_cluster.home, timeout=420)
                continue
            assert argv[0] == "curl"
            argv = [a.replace("127.0.0.1:8000", f"127.0.0.1:{serve_http_port}") for a in argv]
            proc = subprocess.run([*argv, "--fail-with-body", "--max-time", "60"], capture_output=True, text=True,
                                  timeout=90)
            assert proc.returncode == 0, f"{argv}: {proc.returncode} {proc.stdout} {proc.stderr}"
            answers.append(json.loads(proc.stdout))
    finally:
        run_factory("serve", "shutdown", "completions", home=factory_cluster.home, check=False)
    (answer,) = answers
    assert answer["object"] == "text_completion" and answer["model"].startswith("tiny-gpt")
    assert answer["usage"]["completion_tokens"] >= 1 and isinstance(answer["choices"][0]["text"], str)
