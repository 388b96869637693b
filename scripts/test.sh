#!/usr/bin/env bash
# Set everything up, then run the whole test suite against the real llama-server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# CI must never skip the real-server tests: a missing llama-server fails them (tests/conftest.py, llama_server).
exec .venv/bin/python -m pytest -n "${TEST_JOBS:-2}" -q "$@"
