#!/usr/bin/env bash
# Device-tool command for scripts/gpu/warmup_proof.py (same carried .whl/ and .gpu/ as run-proof.sh).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 scripts/gpu/warmup_proof.py --source .gpu/llama-src.tar.gz --out "${OUT:-/tmp/out}" "$@" 2>&1 \
    | grep -v '^\[[0-9]*/[0-9]*\] ' | tee "${OUT:-/tmp/out}/warmup.log"
