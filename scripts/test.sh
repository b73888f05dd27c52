#!/usr/bin/env bash
# The test command: installs what the browser test needs when it is missing, then runs
# the whole suite. Arguments go to `cargo test` (e.g. `bash scripts/test.sh --test browser`).
#
#   - Chromium (Debian's `chromium` package) for tests/browser.rs, with apt-get (sudo
#     when not root). CHROMIUM_PATH names another Chromium and skips this.
#   - Node.js and npm, from apt-get when absent (the test wants Node.js 20 or later).
#   - playwright-core, with `npm ci` in tests/browser (from its package-lock.json),
#     again whenever the lock file is newer than the installed packages.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
apt_updated=""
apt_install() {
    if [ -z "$apt_updated" ]; then
        $sudo apt-get update -q
        apt_updated=1
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

if [ -z "${CHROMIUM_PATH:-}" ] && [ ! -x /usr/bin/chromium ]; then
    echo "== installing chromium (for tests/browser.rs)"
    apt_install chromium
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "== installing nodejs and npm (for tests/browser.rs)"
    apt_install nodejs npm
fi
browser=tests/browser
if [ ! -f "$browser/node_modules/.package-lock.json" ] \
    || [ "$browser/package-lock.json" -nt "$browser/node_modules/.package-lock.json" ]; then
    echo "== npm ci in $browser"
    (cd "$browser" && npm ci --no-audit --no-fund)
fi

echo "== cargo test --locked $*"
exec cargo test --locked "$@"
