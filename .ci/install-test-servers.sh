#!/usr/bin/env bash
# Install the servers the network backend tests start on loopback, on Debian/Ubuntu:
#   * OpenSSH's sshd (openssh-server), run by tests/servers.py as the current user;
#   * the S3 endpoint is moto's server, installed by pip with the test extras
#     (pip install -e '.[test]'), so nothing to do for it here.
# Idempotent: does nothing when sshd is already installed. Needs root or sudo.
set -euo pipefail

SSHD=/usr/sbin/sshd
PRIVSEP_DIR=/run/sshd   # sshd refuses to start without its privilege separation dir

if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root() { sudo -n "$@"; }
else
    as_root() { return 1; }
fi

fail_or_warn() {
    echo "install-test-servers: $1" >&2
    case "${CI:-}" in
        ""|0|false|no) echo "install-test-servers: the network tests will be skipped" >&2; exit 0 ;;
        *) exit 1 ;;
    esac
}

if [ ! -x "$SSHD" ]; then
    echo "install-test-servers: installing openssh-server" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q \
        || fail_or_warn "cannot run apt-get update (need root or passwordless sudo)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        openssh-server openssh-client \
        || fail_or_warn "cannot install openssh-server"
fi

if [ ! -d "$PRIVSEP_DIR" ]; then
    as_root mkdir -p "$PRIVSEP_DIR" && as_root chmod 0755 "$PRIVSEP_DIR" \
        || fail_or_warn "cannot create $PRIVSEP_DIR"
fi

"$SSHD" -V 2>&1 | head -n 1 >&2 || true
