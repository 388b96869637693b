#!/usr/bin/env bash
# Install llama-supervisor as a systemd service: code in /opt/llama-supervisor, settings and profiles in
# /etc/llama-supervisor, learned state in /var/lib/llama-supervisor, a dedicated system user.
# Run as root from a checkout. LLAMA_SERVER_BIN may name an existing llama-server to use.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

PREFIX=/opt/llama-supervisor
ETC=/etc/llama-supervisor

id llama-supervisor >/dev/null 2>&1 || useradd --system --home-dir /var/lib/llama-supervisor \
    --shell /usr/sbin/nologin --groups "$(getent group video >/dev/null && echo video || echo users)" llama-supervisor

mkdir -p "$PREFIX" "$ETC/profiles"
cp -r pyproject.toml constraints.txt README.md supervisor scripts configs systemd "$PREFIX/"
python3 -m venv "$PREFIX/.venv"
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
