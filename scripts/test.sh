#!/usr/bin/env bash
# Set everything up, check lint and types, then run the whole test suite against the real llama-server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Quality gates first (seconds): lint (rules in pyproject.toml; no `ruff format`, see there) and types.
.venv/bin/ruff check supervisor tests scripts
.venv/bin/mypy
# CI must never skip the real-server tests: a missing llama-server fails them (tests/conftest.py, llama_server).
# pytest-timeout (pyproject.toml) fails a hung test by name.
exec .venv/bin/python -m pytest -n "${TEST_JOBS:-2}" -q "$@"
