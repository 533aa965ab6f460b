#!/usr/bin/env bash
# Make ./.venv with kyrorepo installed (editable). Usage: tools/bootstrap.sh [--test]
# On a fresh Debian machine it installs python3-venv first (apt-get update, then install).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then need_apt+=(python3-venv); fi
if [ "${#need_apt[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "kyrorepo needs Python >= 3.11")'

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
    .venv/bin/python -m pip install -q -e '.[test]'
else
    .venv/bin/python -m pip install -q -e .
fi
