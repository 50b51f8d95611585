#!/usr/bin/env bash
# CI: install Debian's Chromium for tests/test_report_browser.py when it is missing (about 65 s on
# a fresh machine, apt-get update included). The Python driver (playwright, which downloads no
# browser of its own here) comes with the `test` extra in the README's install command.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "browser.sh: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium present')"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "browser.sh: /usr/bin/chromium is missing and apt-get cannot install it here (root with apt needed)" >&2
    exit 1
fi
start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
echo "browser.sh: installed $(/usr/bin/chromium --version 2>/dev/null) in $((SECONDS - start)) s"
