#!/usr/bin/env bash
# Install the system packages the interop tests need (Debian 12, as root): RabbitMQ here,
# then chromium, node and the npm packages through install-browser-deps.sh.
#
# Owns: making `rabbitmq-server` (with its STOMP and Web-STOMP plugins, which
# Debian ships inside the package) present on the machine, and making sure the
# package's own system-wide broker is NOT left running: the tests start their
# own private node on free loopback ports (tests/_rabbitmq.py).
# Never: touches any process except the package's own system service (and the
# idle epmd that service leaves behind), nor edits /etc/rabbitmq.
#
# Idempotent: a second run changes nothing and says so. Works without systemd.
set -euo pipefail

log() { printf '[install-system-deps] %s\n' "$*"; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        log "must run as root to $1; try: sudo $0" >&2
        exit 1
    fi
}
export DEBIAN_FRONTEND=noninteractive

POLICY=/usr/sbin/policy-rc.d
ours_policy=0
cleanup() {
    if [ "$ours_policy" -eq 1 ]; then
        rm -f "$POLICY"
        log "removed the temporary $POLICY"
    fi
}
trap cleanup EXIT

# PIDs of processes of user rabbitmq whose name matches the glob $1. Reads
# /proc directly: a fresh container may not have procps (pgrep).
rabbitmq_pids() {
    local uid d comm
    uid=$(id -u rabbitmq 2>/dev/null) || return 0
    for d in /proc/[0-9]*; do
        [ "$(stat -c %u "$d" 2>/dev/null)" = "$uid" ] || continue
        comm=$(cat "$d/comm" 2>/dev/null) || continue
        # shellcheck disable=SC2254
        case "$comm" in $1) echo "${d#/proc/}" ;; esac
    done
}

if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    log "rabbitmq-server already installed: $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo unknown version)"
else
    need_root "install rabbitmq-server"
    if ! apt-cache show rabbitmq-server >/dev/null 2>&1; then
        log "package lists lack rabbitmq-server: running apt-get update"
        apt-get update -q
    else
        log "package lists already know rabbitmq-server: skipping apt-get update"
    fi
    # Stop the postinst from starting the system service: with no policy the
    # SysV script would start a broker on 5672/61613 and an epmd on 4369.
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\n# temporary, from .ci/install-system-deps.sh\nexit 101\n' >"$POLICY"
        chmod 0755 "$POLICY"
        ours_policy=1
        log "installed a temporary $POLICY so the package does not start its service"
    else
        log "$POLICY exists already; leaving it alone"
    fi
    log "installing rabbitmq-server"
    if ! apt-get install -y -q --no-install-recommends rabbitmq-server; then
        log "install failed (stale package lists?): apt-get update and one retry"
        apt-get update -q
        apt-get install -y -q --no-install-recommends rabbitmq-server
    fi
    cleanup
    ours_policy=0
fi

# If the system service runs anyway (an existing policy allowed the start, or
# it was started earlier), stop it and keep it from starting at boot.
if [ -n "$(rabbitmq_pids "beam*")" ]; then
    log "the system-wide rabbitmq-server service is running: stopping it"
    need_root "stop the system-wide rabbitmq-server"
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl stop rabbitmq-server || true
    else
        /etc/init.d/rabbitmq-server stop || true
    fi
    if [ -n "$(rabbitmq_pids "beam*")" ]; then
        log "WARNING: a broker of user rabbitmq is still running; tests use their own ports anyway"
    else
        log "system service stopped"
    fi
else
    log "no system-wide rabbitmq-server is running"
fi
if [ "$(id -u)" -ne 0 ]; then
    log "not root: leaving the service's boot-time setting alone"
elif command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable rabbitmq-server >/dev/null 2>&1 && log "disabled the systemd unit" || true
elif command -v update-rc.d >/dev/null 2>&1 && [ -e /etc/init.d/rabbitmq-server ]; then
    update-rc.d rabbitmq-server disable >/dev/null 2>&1 && log "disabled the SysV service" || true
fi

# The service also leaves an epmd of user rabbitmq on the shared port 4369.
# Stop it only when no Erlang node is registered with it any more.
if [ -n "$(rabbitmq_pids epmd)" ]; then
    if epmd -names 2>/dev/null | grep -q '^name '; then
        log "epmd on 4369 still has registered nodes; leaving it"
    else
        epmd -kill >/dev/null 2>&1 && log "stopped the epmd the service had started" || true
    fi
fi

log "rabbitmq-server: $(command -v /usr/lib/rabbitmq/bin/rabbitmq-server)"
log "plugins shipped: $(ls /usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins | grep -E '^rabbitmq_(web_)?stomp-' | tr '\n' ' ' || true)"
log "rabbitmq done"

# The browser and Node interop tests (WebSocket): Debian's chromium, node/npm and the
# pinned npm packages under tests/browser.
bash "$(dirname "$0")/install-browser-deps.sh"
