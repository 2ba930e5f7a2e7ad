"""``python -m benchmarks NAME [options]``; ``python -m benchmarks`` lists them."""

from __future__ import annotations

import sys

from . import actors, hotpath, instructions, profile, proxy, scaling, sharedlimits, soak, validate
from . import jwt as jwt_bench
from .cluster import main as cluster_main
from .history_storage import main as history_main

BENCHMARKS = {
    "validate": validate.main,
    "proxy": proxy.main,
    "actors": actors.main,
    "soak": soak.main,
    "scaling": scaling.main,
    "profile": profile.main,
    "instructions": instructions.main,
    "hotpath": hotpath.main,
    "sharedlimits": sharedlimits.main,
    "history": history_main,
    "cluster": cluster_main,
    "jwt": jwt_bench.main,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in BENCHMARKS:
        print("usage: python -m benchmarks {" + ",".join(BENCHMARKS) + "} [options]")
        print("       (or: triogate bench ...)")
        return 0 if not args or args[0] in ("-h", "--help") else 2
    return BENCHMARKS[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
