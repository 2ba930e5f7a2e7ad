#!/bin/sh
# The whole test suite on a fresh machine: system programs the tests use
# (tests/system/install.sh), a virtualenv with the test extras, then pytest.
# Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."
sh tests/system/install.sh
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/pytest "$@"
