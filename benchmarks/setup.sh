#!/bin/sh
# Installs what `python -m benchmarks proxy` needs:
# - from Debian's own packages: nginx (the fast upstream, and the proxy we
#   compare against) and wrk (the load generator). Does nothing when they are
#   already there; runs `apt-get update` only when the package lists do not
#   know them yet. Needs root (or sudo) on Debian or a derivative.
# - from PyPI, into their OWN virtual environment benchmarks/.peers-venv
#   (never the product's): the peer proxies' packages (aiohttp, uvloop,
#   Starlette, httpx, uvicorn) and matplotlib for the report's chart, listed in
#   benchmarks/peers/requirements.txt. PEERS_PYTHON picks the interpreter
#   (default: python3).
# Idempotent: run it again and it only checks.
set -eu
PATH="$PATH:/usr/sbin:/sbin"  # nginx lives in /usr/sbin
here=$(cd "$(dirname "$0")" && pwd)

peers_venv() {
    venv="$here/.peers-venv"
    reqs="$here/peers/requirements.txt"
    stamp="$venv/.requirements"
    if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && cmp -s "$reqs" "$stamp"; then
        echo "setup: peers venv $venv is up to date"
        return 0
    fi
    echo "setup: peers venv $venv (pip install -r $reqs)"
    "${PEERS_PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r "$reqs"
    cp "$reqs" "$stamp"
}

missing=""
command -v nginx >/dev/null 2>&1 || missing="$missing nginx"
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v taskset >/dev/null 2>&1 || missing="$missing util-linux"
if [ -z "$missing" ]; then
    echo "setup: nginx, wrk and taskset are installed"
    peers_venv
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=sudo
    else
        echo "setup: need root to install:$missing" >&2
        exit 1
    fi
else
    SUDO=
fi

export DEBIAN_FRONTEND=noninteractive

# `apt-cache policy` prints "Candidate: (none)" (or nothing) for a package the
# lists do not know; only then is `apt-get update` worth its time.
need_update=0
for pkg in $missing; do
    candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
        need_update=1
    fi
done
if [ "$need_update" -eq 1 ]; then
    echo "setup: apt-get update"
    $SUDO apt-get update
fi

# Installing nginx normally starts the system service on port 80. The
# benchmark runs its own instances, so keep the packaged one from starting:
# a temporary policy-rc.d (only if the machine has none, removed afterwards).
policy=/usr/sbin/policy-rc.d
made_policy=0
cleanup() {
    if [ "$made_policy" -eq 1 ]; then
        $SUDO rm -f "$policy"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    made_policy=1
fi

echo "setup: apt-get install -y$missing"
# shellcheck disable=SC2086  # word splitting intended
if ! $SUDO apt-get install -y --no-install-recommends $missing; then
    if [ "$need_update" -eq 1 ]; then
        exit 1
    fi
    # Stale package lists (a 404 on a superseded .deb): refresh once, retry.
    echo "setup: install failed; apt-get update and one retry"
    $SUDO apt-get update
    # shellcheck disable=SC2086
    $SUDO apt-get install -y --no-install-recommends $missing
fi

command -v nginx >/dev/null && command -v wrk >/dev/null && command -v taskset >/dev/null
peers_venv
echo "setup: done ($(nginx -v 2>&1), $(wrk -v 2>&1 | head -n 1 | awk '{print $1, $2}'))"
