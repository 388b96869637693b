#!/usr/bin/env bash
# Set up everything the supervisor, its demo and its tests need, idempotently:
# a virtualenv with the package, a llama-server built from pinned source (cached), the tiny demo model.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
export LLAMA_SUPERVISOR_CACHE=${LLAMA_SUPERVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-supervisor}

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c 'import supervisor, pytest, respx, hypothesis, selenium' 2>/dev/null \
        || [ pyproject.toml -nt .venv/.installed ] || [ constraints.txt -nt .venv/.installed ]; then
    echo "[setup] installing llama-supervisor and its test dependencies" >&2
    # constraints.txt pins every package to what was tested (scripts/refresh-constraints.sh regenerates it).
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
    touch .venv/.installed
fi
# The tests verify the systemd unit with systemd-analyze, and boot Debian's systemd in private namespaces to run
# the installed unit for real (scripts/sdbox.py: unshare, nsenter, setpriv, pivot_root from util-linux; pgrep).
if { ! command -v systemd-analyze || ! [ -x /lib/systemd/systemd ] || ! command -v pgrep || ! command -v setpriv \
        || ! command -v nsenter; } >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing systemd, util-linux, procps (for the systemd tests)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd util-linux procps) >/dev/null
fi
# The fleet tests: three supervisors behind a real HAProxy (Debian's haproxy package), and the Prometheus
# files checked with promtool (Debian's prometheus package; its service is not started here).
fleet_pkgs=""
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then fleet_pkgs="haproxy"; fi
if ! command -v promtool >/dev/null; then fleet_pkgs="$fleet_pkgs prometheus"; fi
if [ -n "$fleet_pkgs" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing$fleet_pkgs (for the fleet tests)" >&2
    # shellcheck disable=SC2086
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $fleet_pkgs) >/dev/null
fi
# The ops page's browser test drives Debian's Chromium through chromedriver (selenium is in the test extra).
if { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; } \
        && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing chromium and chromium-driver (for the ops page's browser test)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null
fi
echo "[setup] llama-server: $(.venv/bin/python scripts/build_llama_server.py ${LLAMA_BACKEND:+--backend "$LLAMA_BACKEND"})" >&2
echo "[setup] demo models:  $(.venv/bin/python scripts/tiny_gguf.py --vision)" >&2
