#!/usr/bin/env bash
# Install what the browser and Node interop tests need (Debian 12).
#
# Owns: making Debian's `chromium` present at /usr/bin/chromium (the tests drive it
# headless with playwright-core; no browser is ever downloaded), making `node` and `npm`
# present, and installing the npm packages pinned in tests/browser/package-lock.json
# into tests/browser/node_modules (never committed).
# Never: downloads a browser through npm/playwright, installs npm packages globally, or
# touches anything outside tests/browser besides the two Debian packages.
#
# Idempotent: a second run changes nothing and says so. Needs root only to apt-get.
set -euo pipefail

log() { printf '[install-browser-deps] %s\n' "$*"; }
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
# playwright-core never downloads browsers, but make sure nothing else does either.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        log "must run as root to install $*; try: sudo $0" >&2
        exit 1
    fi
    if ! apt-get install -y -q --no-install-recommends "$@"; then
        log "install failed (stale package lists?): apt-get update and one retry"
        apt-get update -q
        apt-get install -y -q --no-install-recommends "$@"
    fi
}

missing=()
if [ -x /usr/bin/chromium ]; then
    log "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo unknown version)"
else
    missing+=(chromium)
fi
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    log "node $(node --version) and npm $(npm --version) already installed"
else
    missing+=(nodejs npm)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
        log "package lists lack ${missing[*]}: running apt-get update"
        apt-get update -q
    fi
    log "installing ${missing[*]}"
    apt_install "${missing[@]}"
fi

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 18 ]; then
    # Debian 12's own nodejs (18) is enough; playwright-core is pinned to a release that
    # still supports it (1.62 and later need node 20).
    log "node $(node --version) is too old: the pinned npm packages need node >= 18" >&2
    exit 1
fi

cd tests/browser
if [ -d node_modules ] && npm ls --silent >/dev/null 2>&1; then
    log "npm packages already installed in tests/browser/node_modules"
elif [ -f package-lock.json ]; then
    log "npm ci in tests/browser"
    npm ci --no-audit --no-fund
else
    log "no package-lock.json: npm install in tests/browser"
    npm install --no-audit --no-fund
fi
npm ls --depth=0
log "done"
