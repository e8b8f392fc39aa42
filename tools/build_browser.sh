#!/usr/bin/env bash
# Browser half of the ComfyUI test harness (called by `make browser`):
#   1. Debian chromium, apt-installed if no chromium binary is on PATH;
#   2. npm playwright-core (version pinned in tools/browser/package-lock.json) into .cache/browser.
# playwright-core never downloads a browser; the tests drive the system chromium.
# Usage: tools/build_browser.sh [DEST]   (default .cache/browser)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.cache/browser}

# $CHROMIUM may name another Chromium-based binary (e.g. a CI image's preinstalled one); the tests use it too.
if [ -n "${CHROMIUM:-}" ] && [ -x "$CHROMIUM" ]; then
    echo "build_browser: using CHROMIUM=$CHROMIUM"
elif ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "build_browser: installing Debian chromium with apt-get"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
fi
[ -n "${CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || {
    echo "build_browser: no chromium binary after install" >&2; exit 1; }

mkdir -p "$DEST"
cp tools/browser/package.json tools/browser/package-lock.json "$DEST"/
(cd "$DEST" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
ABS=$(cd "$DEST" && pwd)
node -e "const p=require('$ABS/node_modules/playwright-core/package.json'); require('$ABS/node_modules/playwright-core'); console.log('build_browser: playwright-core', p.version)"
