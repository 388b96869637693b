#!/usr/bin/env bash
# Pack the parts of the pinned llama.cpp source that a CUDA build of llama-server needs (~10 MB), for a
# GPU machine that reaches no package registry. Usage: scripts/gpu/bundle_source.sh OUT.tar.gz
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(realpath -m "${1:?usage: bundle_source.sh OUT.tar.gz}")
version=$(.venv/bin/python -c 'import sys; sys.path.insert(0, "scripts"); import build_llama_server as b; print(b.LLAMA_CPP_PYTHON_VERSION)')
sdist=$(.venv/bin/python -c 'import sys; sys.path.insert(0, "scripts"); import build_llama_server as b; print(b.cache_root() / "sdist")')/llama_cpp_python-$version.tar.gz
[ -f "$sdist" ] || { echo "no sdist at $sdist: run scripts/setup.sh first" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
top=llama_cpp_python-$version/vendor/llama.cpp
tar xzf "$sdist" -C "$tmp" "$top"
cd "$tmp/$top"
# Not needed to build llama-server: model vocabularies, docs, tests, examples, other GPU backends.
rm -rf models docs media benches tests examples conversion gguf-py tools/ui/tests
for d in ggml/src/ggml-*/; do
    case "$d" in ggml/src/ggml-cpu/|ggml/src/ggml-cuda/|ggml/src/ggml-blas/) ;; *) [ -d "$d" ] && rm -rf "$d" ;; esac
done
cd "$tmp/llama_cpp_python-$version/vendor"
tar czf "$out" llama.cpp
ls -la "$out" >&2
