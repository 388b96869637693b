#!/usr/bin/env bash
# The command the device tool runs on the GPU machine (no registry there): wheels and the llama.cpp source
# bundle travel in .whl/ and .gpu/ (both git-ignored). Prepare them here first:
#   scripts/gpu/bundle_source.sh .gpu/llama-src.tar.gz
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl <runtime deps> gguf numpy   (proof.py writes its model with them)
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
python3 scripts/gpu/proof.py --source .gpu/llama-src.tar.gz --out "${OUT:-/tmp/out}" "$@" 2>&1 | tee "${OUT:-/tmp/out}/proof.log"
