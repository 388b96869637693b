#!/usr/bin/env bash
# The command the device tool runs on the GPU machine for one proof: `bash scripts/gpu/run.sh NAME [ARGS]` runs
# scripts/gpu/NAME_proof.py (NAME=proof: proof.py; also climb, gpus, multimodel, ops, warmup) and leaves its results
# and NAME.log under $OUT. There is no package registry there: wheels and the llama.cpp source bundle travel in
# .whl/ and .gpu/ (both git-ignored; name them in the tool's `carry`). Prepare them here first:
#   scripts/gpu/bundle_source.sh .gpu/llama-src.tar.gz
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl <runtime deps> gguf numpy   (the proofs write their models with them)
set -euo pipefail
name="${1:?usage: run.sh proof|climb|gpus|multimodel|ops|warmup [ARGS]}"
shift
script="scripts/gpu/${name}_proof.py"
[ "$name" = proof ] && script=scripts/gpu/proof.py
out="${OUT:-/tmp/out}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
# The build's "[12/345]" progress lines would bury the results in the log.
python3 "$script" --source .gpu/llama-src.tar.gz --out "$out" "$@" 2>&1 | grep -v '^\[[0-9]*/[0-9]*\] ' | tee "$out/$name.log"
