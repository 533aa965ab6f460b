#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run the whole suite.
# The tests start their own servers on loopback (sshd, an S3 endpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .ci/install-test-servers.sh ]; then bash .ci/install-test-servers.sh; fi
bash tools/bootstrap.sh --test
.venv/bin/python -m mypy  # the package type-checks (configuration in pyproject.toml)
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
