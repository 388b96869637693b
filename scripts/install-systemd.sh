#!/usr/bin/env bash
# Install llama-supervisor as a systemd service: code in /opt/llama-supervisor, settings and profiles in
# /etc/llama-supervisor, learned state in /var/lib/llama-supervisor, a dedicated system user.
# Run as root from a checkout. LLAMA_SERVER_BIN may name an existing llama-server to use; PYTHON may name the
# interpreter for the service's virtualenv (default: the system's /usr/bin/python3).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

PREFIX=/opt/llama-supervisor
ETC=/etc/llama-supervisor

# The interpreter. Not whatever python3 is first on PATH: from a root shell with pyenv or conda that lives under
# /root, and the service (ProtectHome=yes) could not even execute it (203/EXEC).
PY=${PYTHON:-/usr/bin/python3}
[ -x "$PY" ] || { echo "no $PY: install Debian's python3 and python3-venv (3.11 or newer), or set PYTHON=" >&2; exit 1; }
# The venv links to the base interpreter by the path Python knows it by (a symlink stays a symlink): check that
# path, where it leads, and the standard library's prefix.
read -r PY_LINK PY_BASE PY_PREFIX PY_OK < <("$PY" -c 'import os, sys
b = os.path.abspath(sys._base_executable)
print(b, os.path.realpath(b), os.path.realpath(sys.base_prefix), int(sys.version_info >= (3, 11)))')
[ "$PY_OK" = 1 ] || { echo "$PY is older than Python 3.11: set PYTHON= to a newer system interpreter" >&2; exit 1; }
for d in /root /home /run/user; do
    case "$PY_LINK/ $PY_BASE/ $PY_PREFIX/" in
        "$d"/*|*" $d"/*) echo "$PY is $PY_LINK -> $PY_BASE (prefix $PY_PREFIX), under $d: the service runs with" \
            "ProtectHome=yes and cannot use it. Use the system interpreter (PYTHON=/usr/bin/python3) or one" \
            "installed outside /root, /home and /run/user." >&2; exit 1 ;;
    esac
done

# A system user; the groups that usually own GPU device nodes (video: NVIDIA and /dev/dri/card*, render:
# /dev/dri/renderD*), where this machine has them.
GROUPS_GPU=$(for g in video render; do getent group "$g" >/dev/null && printf '%s,' "$g"; done)
GROUPS_GPU=${GROUPS_GPU%,}
id llama-supervisor >/dev/null 2>&1 || useradd --system --home-dir /var/lib/llama-supervisor \
    --shell /usr/sbin/nologin llama-supervisor
[ -z "$GROUPS_GPU" ] || usermod -a -G "$GROUPS_GPU" llama-supervisor

mkdir -p "$PREFIX" "$ETC/profiles"
cp -r pyproject.toml constraints.txt README.md docs supervisor scripts configs systemd "$PREFIX/"
# A virtualenv left by an earlier install with another interpreter (e.g. one under /root) is rebuilt.
VENV_BASE=$("$PREFIX/.venv/bin/python" -c 'import os, sys; print(os.path.abspath(sys._base_executable))' \
    2>/dev/null || true)
"$PY" -m venv $([ "$VENV_BASE" = "$PY_LINK" ] || echo --clear) "$PREFIX/.venv"
# The versions the test suite ran with (constraints.txt; scripts/refresh-constraints.sh regenerates it).
"$PREFIX/.venv/bin/pip" install --quiet -c "$PREFIX/constraints.txt" "$PREFIX"

if [ -z "${LLAMA_SERVER_BIN:-}" ]; then
    # Build into a cache the service user can read.
    LLAMA_SUPERVISOR_CACHE=$PREFIX/cache "$PREFIX/.venv/bin/python" "$PREFIX/scripts/build_llama_server.py" \
        ${LLAMA_BACKEND:+--backend "$LLAMA_BACKEND"} >/dev/null
fi

[ -e "$ETC/supervisor.yaml" ] || cp configs/supervisor.yaml "$ETC/supervisor.yaml"
for p in configs/profiles/*.yaml; do
    [ -e "$ETC/profiles/$(basename "$p")" ] || cp "$p" "$ETC/profiles/"
done
install -m 0644 systemd/llama-supervisor.service /etc/systemd/system/llama-supervisor.service
systemctl daemon-reload
echo "Installed. Edit $ETC/supervisor.yaml and $ETC/profiles/*.yaml, then:"
echo "  systemctl enable --now llama-supervisor && journalctl -u llama-supervisor -f"
