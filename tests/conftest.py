"""Test-wide environment: a private HOME and factory home, Ray on loopback, no usage stats.

Set at import time, before any test module imports Ray, so nothing touches the user's ~/.ray or
~/.aifactory and every local Ray node binds to 127.0.0.1 (../shared/RAY-2.60-NOTES.md).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_ROOT = Path(tempfile.mkdtemp(prefix="aif-test-"))
os.environ["HOME"] = str(_ROOT / "home")
os.environ["AIFACTORY_HOME"] = str(_ROOT / "factory")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("RAY_ADDRESS", None)
for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
    os.environ.pop(var, None)
(_ROOT / "home").mkdir(parents=True, exist_ok=True)

REPO = Path(__file__).resolve().parents[1]
TEST_ROOT = _ROOT
