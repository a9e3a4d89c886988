#!/usr/bin/env bash
# Install or remove edge-agent as a systemd service (Raspberry Pi OS, Debian, Ubuntu).
#
#   sudo systemd/install.sh install              # device: agent service, enabled and started
#   sudo systemd/install.sh install --role fleet # fleet host: daily retraining timer
#   sudo systemd/install.sh uninstall [--purge]  # --purge also drops config, state and user
#   systemd/install.sh install --destdir /tmp/root --dry-run   # rehearsal, no root needed
#
# Safe to run again: the user, venv and unit are brought up to date, and an
# existing configuration file is never overwritten.
#
# --dry-run, or a --destdir (DESTDIR) other than /, changes nothing on the live
# system: commands that would (useradd, pip, chown, systemctl) are printed
# instead of run.  Files (unit, configuration) are written under DESTDIR; with
# --dry-run and no DESTDIR nothing at all is written.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="${SRC:-$(dirname "$HERE")}"
PREFIX="${PREFIX:-/opt/edge-agent}"
DESTDIR="${DESTDIR:-}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
PURGE=0
ROLE=agent
ACTION=""

usage() {
    cat <<EOF
usage: $(basename "$0") install|uninstall [options]

  --role agent|fleet   agent: the device daemon (default); fleet: the retraining timer
  --prefix DIR         where the virtual environment goes (default /opt/edge-agent; env PREFIX)
  --destdir DIR        install files under DIR instead of / and run no system command (env DESTDIR)
  --dry-run            print what would be done; write only under --destdir (env DRY_RUN=1)
  --purge              uninstall: also remove configuration, state and the system user
  --python PATH        interpreter for the venv, Python >= 3.11 (default python3; env PYTHON)
  --source DIR         project source tree to pip-install (default: this script's repository)
EOF
}

die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "==> $*"; }
note() { echo "    $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        install|uninstall) [ -z "$ACTION" ] || die "only one action, got '$ACTION' and '$1'"; ACTION="$1" ;;
        --role) [ $# -ge 2 ] || die "--role needs a value"; ROLE="$2"; shift ;;
        --role=*) ROLE="${1#*=}" ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a value"; PREFIX="$2"; shift ;;
        --prefix=*) PREFIX="${1#*=}" ;;
        --destdir) [ $# -ge 2 ] || die "--destdir needs a value"; DESTDIR="$2"; shift ;;
        --destdir=*) DESTDIR="${1#*=}" ;;
        --python) [ $# -ge 2 ] || die "--python needs a value"; PYTHON="$2"; shift ;;
        --python=*) PYTHON="${1#*=}" ;;
        --source) [ $# -ge 2 ] || die "--source needs a value"; SRC="$2"; shift ;;
        --source=*) SRC="${1#*=}" ;;
        --dry-run) DRY_RUN=1 ;;
        --purge) PURGE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
    shift
done

[ -n "$ACTION" ] || { usage >&2; die "say install or uninstall"; }
case "$ROLE" in agent|fleet) ;; *) die "--role must be agent or fleet, got '$ROLE'" ;; esac
case "$PREFIX" in
    /*) ;;
    *) die "--prefix must be an absolute path, got '$PREFIX'" ;;
esac
case "$PREFIX" in *[[:space:]\#\&\\]*) die "--prefix must not contain spaces, '#', '&' or '\\'" ;; esac
PREFIX="${PREFIX%/}"
DESTDIR="${DESTDIR%/}"
if [ -n "$DESTDIR" ]; then
    case "$DESTDIR" in /*) ;; *) DESTDIR="$(pwd)/$DESTDIR" ;; esac
fi

# Live system changes happen only for a real install into /.
LIVE=1
if [ "$DRY_RUN" = 1 ] || [ -n "$DESTDIR" ]; then LIVE=0; fi
# Files are written for a real install and for any DESTDIR rehearsal.
WRITE=1
if [ "$DRY_RUN" = 1 ] && [ -z "$DESTDIR" ]; then WRITE=0; fi

if [ "$ROLE" = agent ]; then
    USER_NAME=edge-agent
    EXTRAS=edge
    UNITS=(edge-agent.service)
    ENABLE=edge-agent.service
    CONF_DIR=/etc/edge-agent
    STATE_DIR=/var/lib/edge-agent
    OTHER_UNIT=edge-fleet-retrain.service
else
    USER_NAME=edge-fleet
    EXTRAS=train,fleet
    UNITS=(edge-fleet-retrain.service edge-fleet-retrain.timer)
    ENABLE=edge-fleet-retrain.timer
    CONF_DIR=/etc/edge-fleet
    STATE_DIR=/var/lib/edge-fleet
    OTHER_UNIT=edge-agent.service
fi
UNIT_DIR=/etc/systemd/system
VENV="$PREFIX/venv"

quoted() { local out; out="$(printf '%q ' "$@")"; echo "${out% }"; }

# system CMD...: a command that changes the live system; printed unless LIVE.
system() {
    if [ "$LIVE" = 1 ]; then
        note "+ $(quoted "$@")"
        "$@"
    else
        note "would run: $(quoted "$@")"
    fi
}

# files CMD...: a file operation on paths already prefixed with DESTDIR.
files() {
    if [ "$WRITE" = 1 ]; then
        "$@"
    else
        note "would run: $(quoted "$@")"
    fi
}

preflight() {
    if [ "$LIVE" = 1 ]; then
        [ "$(id -u)" = 0 ] || die "run as root (sudo $0 $ACTION ...), or rehearse with --dry-run"
        command -v systemctl >/dev/null || die "systemctl not found: this installer needs systemd"
        [ -d /run/systemd/system ] || die "systemd is not running on this machine (no /run/systemd/system)"
    fi
}

# ---------------------------------------------------------------------------------------------------
ensure_user() {
    say "system user $USER_NAME"
    if [ "$LIVE" = 1 ] && getent passwd "$USER_NAME" >/dev/null; then
        note "exists, kept"
        return
    fi
    local nologin=/usr/sbin/nologin
    [ -x "$nologin" ] || nologin=/sbin/nologin
    system useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell "$nologin" --comment "$USER_NAME service" "$USER_NAME"
}

ensure_venv() {
    say "virtual environment $VENV (extra: $EXTRAS)"
    [ -f "$SRC/setup.py" ] || die "no setup.py in source tree $SRC (use --source)"
    if [ "$LIVE" = 1 ]; then
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
            || die "$PYTHON is missing or older than 3.11 (tomllib); pass --python"
        "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
            || die "$PYTHON cannot create virtual environments: apt install python3-venv"
    fi
    if [ "$LIVE" = 1 ] && [ -x "$VENV/bin/python" ]; then
        note "exists, upgrading the project in place"
    else
        system "$PYTHON" -m venv "$VENV"
    fi
    system "$VENV/bin/python" -m pip install --quiet --upgrade pip
    system "$VENV/bin/python" -m pip install --quiet --upgrade "$SRC[$EXTRAS]"
    if [ -f "$SRC/README.md" ]; then
        files mkdir -p "$DESTDIR$PREFIX"
        files install -m 0644 "$SRC/README.md" "$DESTDIR$PREFIX/README.md"
    fi
}

ensure_config() {
    local dir="$DESTDIR$CONF_DIR" example name hint
    say "configuration $CONF_DIR"
    files mkdir -p "$dir"
    files chmod 0755 "$dir"
    if [ "$ROLE" = agent ]; then
        example="$SRC/agent/agent.example.toml" name=agent.toml hint="set device_id and [mqtt] there"
    else
        example="$SRC/fleet/fleet.example.toml" name=fleet.toml hint="set the store, broker and signing key there"
    fi
    if [ -e "$dir/$name" ]; then
        note "$CONF_DIR/$name exists, kept (compare with $example after upgrades)"
        return
    fi
    [ -f "$example" ] || die "example configuration $example not found"
    # 0640 root:<service user>: the file may hold broker and database passwords.
    files install -m 0640 "$example" "$dir/$name"
    system chown "root:$USER_NAME" "$CONF_DIR/$name"
    note "created $CONF_DIR/$name from the example: $hint"
}

install_units() {
    local unit target tmp changed=0
    say "systemd units in $UNIT_DIR"
    files mkdir -p "$DESTDIR$UNIT_DIR"
    for unit in "${UNITS[@]}"; do
        target="$DESTDIR$UNIT_DIR/$unit"
        [ -f "$HERE/$unit" ] || die "unit $HERE/$unit not found"
        tmp="$(mktemp)"
        # The units name the default prefix; point them at this one (comments stay as written).
        sed "/^[[:space:]]*#/!s#/opt/edge-agent#$PREFIX#g" "$HERE/$unit" >"$tmp"
        if [ -f "$target" ] && cmp -s "$tmp" "$target"; then
            note "$unit unchanged"
        else
            files install -m 0644 "$tmp" "$target"
            note "$unit installed"
            changed=1
        fi
        rm -f "$tmp"
    done
    if [ "$changed" = 1 ] || [ "$LIVE" = 0 ]; then
        system systemctl daemon-reload
    fi
    local was_active=0
    if [ "$LIVE" = 1 ] && systemctl is-active --quiet "$ENABLE"; then was_active=1; fi
    system systemctl enable --now "$ENABLE"
    if [ "$was_active" = 1 ] && [ "$ROLE" = agent ]; then
        # enable --now leaves a running service alone: restart it onto the new code and unit.
        system systemctl restart "$ENABLE"
    fi
}

do_install() {
    say "installing edge-agent ($ROLE) prefix=$PREFIX${DESTDIR:+ destdir=$DESTDIR}$([ "$DRY_RUN" = 1 ] && echo ' (dry run)')"
    preflight
    ensure_user
    ensure_venv
    ensure_config
    install_units
    say "done"
    if [ "$ROLE" = agent ]; then
        note "status: systemctl status edge-agent; sudo $VENV/bin/edge-agent status"
        note "logs:   journalctl -u edge-agent -f"
    else
        note "schedule: systemctl list-timers edge-fleet-retrain.timer"
    fi
}

# ---------------------------------------------------------------------------------------------------
do_uninstall() {
    say "removing edge-agent ($ROLE) prefix=$PREFIX${DESTDIR:+ destdir=$DESTDIR}$([ "$DRY_RUN" = 1 ] && echo ' (dry run)')"
    preflight
    local unit removed=0
    say "systemd units"
    if [ "$LIVE" = 0 ] || systemctl cat "$ENABLE" >/dev/null 2>&1; then
        system systemctl disable --now "$ENABLE"
        if [ "$ROLE" = fleet ]; then system systemctl stop edge-fleet-retrain.service; fi
    fi
    for unit in "${UNITS[@]}"; do
        if [ -e "$DESTDIR$UNIT_DIR/$unit" ]; then
            files rm -f "$DESTDIR$UNIT_DIR/$unit"
            note "$unit removed"
            removed=1
        elif [ "$WRITE" = 0 ]; then
            files rm -f "$DESTDIR$UNIT_DIR/$unit"
        else
            note "$unit not installed"
        fi
    done
    if [ "$removed" = 1 ] || [ "$LIVE" = 0 ]; then
        system systemctl daemon-reload
        if [ "$LIVE" = 1 ]; then systemctl reset-failed "${UNITS[@]}" 2>/dev/null || true; fi
    fi

    say "virtual environment $VENV"
    if [ -e "$DESTDIR$UNIT_DIR/$OTHER_UNIT" ]; then
        note "kept: $OTHER_UNIT still uses it"
    elif [ "$LIVE" = 0 ]; then
        system rm -rf "$VENV"
        files rm -f "$DESTDIR$PREFIX/README.md"
    elif [ -d "$VENV" ]; then
        system rm -rf "$VENV"
        rm -f "$PREFIX/README.md"
        rmdir "$PREFIX" 2>/dev/null || note "$PREFIX not empty, kept"
    else
        note "not present"
    fi

    if [ "$PURGE" = 1 ]; then
        say "purging configuration $CONF_DIR, state $STATE_DIR and user $USER_NAME"
        files rm -rf "$DESTDIR$CONF_DIR"
        files rm -rf "$DESTDIR$STATE_DIR"
        if [ "$LIVE" = 0 ] || getent passwd "$USER_NAME" >/dev/null; then
            system userdel "$USER_NAME"
        fi
    else
        say "kept configuration $CONF_DIR, state $STATE_DIR and user $USER_NAME (use --purge to remove)"
    fi
    say "done"
}

case "$ACTION" in
    install) do_install ;;
    uninstall) do_uninstall ;;
esac
