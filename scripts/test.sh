#!/usr/bin/env bash
# Install everything, then lint, type-check and run the full test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The UI test drives Debian's chromium: install it here, not inside a test's time.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt_install="apt-get install -y -q --no-install-recommends chromium"
  $apt_install >/dev/null 2>&1 || { apt-get update -q >/dev/null && $apt_install >/dev/null; } \
    || echo "could not install chromium with apt-get; the UI test will fail" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# mypy's minute (no cache on a fresh clone) runs beside the tests' first minute.
mypy_out="$(mktemp)"
.venv/bin/mypy >"$mypy_out" 2>&1 &
mypy_pid=$!
# Two test processes side by side: most of a test is one process importing vLLM or
# waiting on a deadline, so a second keeps the other core busy (tests/conftest.py
# keeps their Ray clusters and engines apart). `loadgroup` deals the tests out one at a
# time as the processes free up (under pytest 9.2 it no longer groups anything,
# pytest-xdist#1386); plain `load` hands out a quarter of the suite up front, which left
# one process with every fault test and the other idle.
status=0
.venv/bin/python -m pytest -n "${PREFECT_VLLM_TEST_WORKERS:-2}" --dist loadgroup "$@" || status=$?
wait "$mypy_pid" || status=1
cat "$mypy_out"
rm -f "$mypy_out"
exit "$status"
