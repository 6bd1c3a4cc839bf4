#!/usr/bin/env bash
# Install Debian's `prometheus` for the cost exporter/dashboard tests when it is missing (~8 s).
# It does not auto-start; the tests run it as a plain process on 127.0.0.1 with their own config.
set -euo pipefail
command -v prometheus >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q prometheus >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q prometheus >/dev/null; }
command -v prometheus >/dev/null 2>&1 || { echo "warning: could not install prometheus; its tests will be skipped" >&2; exit 0; }
