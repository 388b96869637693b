#!/usr/bin/env bash
# Set everything up, then run the supervisor on the built-in demo profile (Ctrl-C stops it).
# Try it from another terminal:
#   curl -s localhost:8080/v1/chat/completions -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/llama-supervisor run --profile configs/demo.yaml --port "${PORT:-8080}" "$@"
