#!/usr/bin/env bash
# The system packages `make run` / `make test` need beside Python, installed when missing.
#
#   scripts/system-deps.sh venv   python3-venv (ensurepip), to create .venv        (make venv, make run)
#   scripts/system-deps.sh test   that, plus mosquitto (MQTT tests), postgresql (initdb/pg_ctl for the
#                                 fleet store tests), chromium (web page tests), systemd (systemd-analyze)
#
# Missing packages are installed with apt-get when we are root (CI: root, no stdin) or can use sudo
# (without a password, or with a terminal to ask one on); otherwise one line names them and the tests
# that need them skip and say so. Set EDGE_SYSTEM_DEPS=skip to never install anything.
set -euo pipefail

what="${1:-test}"
PYTHON="${PYTHON:-python3}"
need=()
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if [ "$what" = "test" ]; then
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
fi
[ ${#need[@]} -eq 0 ] && exit 0

hint="install them with: sudo apt-get install -y --no-install-recommends ${need[*]}"
if [ "${EDGE_SYSTEM_DEPS:-}" = "skip" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${need[*]}; $hint (or your system's equivalent); tests that need them skip" >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
  SUDO="sudo"
else
  echo "system-deps: missing ${need[*]}; $hint; tests that need them skip" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
