#!/usr/bin/env bash
# Set up and run the test suite on a fresh Debian/Ubuntu machine: redis-server (the cache and
# shared-quota tests start a real one), a virtualenv with the dev extras, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # Wait for another apt/dpkg (a fresh machine's own updates) rather than failing on its lock.
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -q
  $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q redis-server
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
exec .venv/bin/python -m pytest -q "$@"
