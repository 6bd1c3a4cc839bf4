#!/usr/bin/env bash
# Install Debian's `chromium` for the HTML report test (tests/unit/test_pipeline_report.py) when it is missing.
# The test runs it headless as a plain process with a fresh profile and no network; without it the test skips.
set -euo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null; }
command -v chromium >/dev/null 2>&1 || { echo "warning: could not install chromium; the report's browser test will be skipped" >&2; exit 0; }
