#!/usr/bin/env bash
# Device-tool command for scripts/gpu/ops_proof.py (same carried .whl/ and .gpu/ as run-proof.sh).
# Prints the checks at the end and leaves ops.json, ops.md and ops.log under $OUT.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p "${OUT:-/tmp/out}"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
python3 scripts/gpu/ops_proof.py --source .gpu/llama-src.tar.gz --out "${OUT:-/tmp/out}" "$@" 2>&1 \
    | grep -v '^\[[0-9]*/[0-9]*\] ' | tee "${OUT:-/tmp/out}/ops.log"
