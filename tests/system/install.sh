#!/bin/sh
# Installs the system programs the tests drive for real, from Debian's own
# packages: `mdb_copy` (lmdb-utils, the backup test) and `redis-server` (the
# cluster tests start their own on a free loopback port). Idempotent: installs only
# what is missing and runs `apt-get update` only when the package lists do not
# know a package yet. The tests never skip when a program is missing: they fail
# and name the package, so run this first (tests/run.sh does).
set -eu
PATH="$PATH:/usr/sbin:/sbin"

# program -> Debian package
wanted="mdb_copy:lmdb-utils redis-server:redis-server chromium:chromium chromedriver:chromium-driver openssl:openssl setpriv:util-linux"

missing=""
for pair in $wanted; do
    program=${pair%%:*}
    package=${pair#*:}
    command -v "$program" >/dev/null 2>&1 || missing="$missing $package"
done
if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=sudo
    else
        echo "tests/system/install.sh: need root to install:$missing" >&2
        exit 1
    fi
else
    SUDO=
fi
export DEBIAN_FRONTEND=noninteractive

need_update=0
for pkg in $missing; do
    candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
        need_update=1
    fi
done
if [ "$need_update" -eq 1 ]; then
    $SUDO apt-get update -q
fi
# shellcheck disable=SC2086  # one word per package
$SUDO apt-get install -y -q --no-install-recommends $missing
