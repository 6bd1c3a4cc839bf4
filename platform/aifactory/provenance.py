"""Where a piece of work came from: code version, submitter. Used in job metadata and manifests."""

from __future__ import annotations

import functools
import getpass
import os
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class CodeVersion(BaseModel):
    model_config = ConfigDict(frozen=True)

    sha: str
    dirty: bool

    def __str__(self) -> str:
        return self.sha + ("-dirty" if self.dirty else "")


def _git(args: list[str], cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


@functools.lru_cache(maxsize=8)
def code_version(path: str | None = None) -> CodeVersion:
    """The git commit of ``path`` (default: this source tree) and whether it has uncommitted changes.

    ``AIFACTORY_CODE_VERSION`` overrides it (e.g. in an image built without .git). Outside a git checkout
    the sha is ``"unknown"``: provenance is recorded as unknown, never invented.
    """
    forced = os.environ.get("AIFACTORY_CODE_VERSION")
    if forced:
        return CodeVersion(sha=forced.removesuffix("-dirty"), dirty=forced.endswith("-dirty"))
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = _git(["rev-parse", "--short=12", "HEAD"], cwd)
        dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], cwd))
        return CodeVersion(sha=sha, dirty=dirty)
    except (OSError, subprocess.SubprocessError):
        return CodeVersion(sha="unknown", dirty=False)


def whoami() -> str:
    try:
        return os.environ.get("AIFACTORY_USER") or getpass.getuser()
    except Exception:  # getpass raises a bare Exception-ish error when no user is known
        return "unknown"
