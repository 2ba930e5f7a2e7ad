"""Instructions per request: the steady measure of a hot-path change.

``python -m benchmarks instructions [--target limited|key|nokey|bare ...]``

CPU time per request drifts with whatever else the machine does; the number
of instructions the server executes per request does not (within a fraction
of a percent), so a change of a few percent can be measured on a busy
machine, before and after, minutes apart. This runs the server under
valgrind's callgrind (``apt-get install valgrind``), the nginx upstream and
wrk outside it, and for each target:

1. starts the server (the proxy benchmark's config, keys and routes) under
   callgrind and lets it warm up;
2. zeroes callgrind's counters, runs wrk for ``--seconds`` with
   ``--connections`` connections, and dumps the counters;
3. prints instructions per request (the dump's total / the requests wrk
   counted), and, for triogate targets, the ratio to the bare trio floor
   measured the same way.

Under callgrind the server runs ~50x slower, so a few thousand requests are
measured; kernel time (system calls) is not counted, only user-space
instructions: the figure is the Python work, which is what triogate's own
structure costs. ``--keep DIR`` keeps the callgrind output files for
``callgrind_annotate``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import bench_load as load
from . import bench_servers as servers
from . import proxy

TARGETS = ("bare", "nokey", "key", "limited")
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Count:
    target: str
    requests: int
    instructions: int

    @property
    def per_request(self) -> float:
        return self.instructions / max(self.requests, 1)


def _control(*argv: str) -> None:
    done = subprocess.run(
        ["callgrind_control", *argv], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        servers._fail(f"callgrind_control {' '.join(argv)} failed:\n{done.stdout}{done.stderr}")


def _total(out_dir: Path, before: set[Path]) -> int:
    dumps = sorted(set(out_dir.glob("callgrind.out*")) - before)
    if not dumps:
        servers._fail("callgrind wrote no dump")
    found = _TOTALS.search(dumps[-1].read_text(errors="replace"))
    if found is None:
        servers._fail(f"no totals in {dumps[-1]}")
    return int(found.group(1))


def _measure(args: argparse.Namespace, name: str, wrk: str, nginx: str, out_dir: Path) -> Count:
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triogate-ir-")))
        upstream_port = servers._free_port()
        upstream = servers._start_nginx(
            stack, nginx, tmp, "upstream", servers._write_upstream_conf(tmp, upstream_port), None
        )
        servers._wait_port(upstream, upstream_port)
        grind = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out_dir}/callgrind.out.{name}.%p",
        ]
        if name == "bare":
            port = servers._free_port()
            argv = [*grind, sys.executable, "-m", f"{__package__}.bare_proxy"]
            argv += ["--listen", f"{servers.HOST}:{port}"]
            argv += ["--upstream", f"{servers.HOST}:{upstream_port}"]
            root = Path(__file__).resolve().parent.parent
            server = servers._start(
                stack,
                name,
                argv,
                core=None,
                stdout=tmp / "out",
                stderr=tmp / "err",
                cwd=root if __package__ == "benchmarks" else None,
            )
            deadline = time.monotonic() + args.start_timeout
            while time.monotonic() < deadline and not _listening(port):
                server.check_alive()
                time.sleep(0.2)
            url = f"http://{servers.HOST}:{port}/nokey/{servers.REQUEST_PATH}"
            target = load.Target(name, url)
        else:
            data_dir = tmp / "data"
            data_dir.mkdir()
            keys = servers.create_bench_keys(data_dir)
            conf = servers._triogate_conf(tmp, data_dir, upstream_port)
            stdout = tmp / "out"
            argv = [*grind, sys.executable, "-m", "triogate", "serve", "-c", str(conf)]
            server = servers._start(stack, name, argv, core=None, stdout=stdout, stderr=tmp / "err")
            deadline = time.monotonic() + args.start_timeout
            found = None
            while time.monotonic() < deadline:
                server.check_alive()
                found = servers._LISTENING.search(stdout.read_text(errors="replace"))
                if found:
                    break
                time.sleep(0.2)
            if found is None:
                servers._fail(f"{name}: triogate under callgrind did not start")
            headers = keys.headers(name)
            target = load.Target(name, f"{found.group(1)}/{name}/{servers.REQUEST_PATH}", headers)
        load._verify(target)
        # Warm-up: caches filled, upstream connections open, code paths hot.
        load._wrk(
            wrk, target, seconds=args.warmup, connections=args.connections, core=None, latency=False
        )
        before = set(out_dir.glob("callgrind.out*"))
        _control("--zero", str(server.proc.pid))
        output = load._wrk(
            wrk,
            target,
            seconds=args.seconds,
            connections=args.connections,
            core=None,
            latency=False,
        )
        _control("--dump", str(server.proc.pid))
        result = load.parse_wrk(output, latency=False)
        if result.errors:
            servers._fail(f"{name}: wrk saw errors:\n{output}")
        return Count(name, result.requests, _total(out_dir, before))


def _listening(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection((servers.HOST, port), 0.5):
        return True
    return False


def run(args: argparse.Namespace) -> int:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        servers._fail("valgrind is not installed: apt-get install valgrind")
    wrk, nginx = proxy._find("wrk"), proxy._find("nginx")
    with contextlib.ExitStack() as stack:
        out_dir = (
            Path(args.keep)
            if args.keep
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triogate-cg-")))
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        counts = []
        for name in args.target or TARGETS:
            count = _measure(args, name, wrk, nginx, out_dir)
            counts.append(count)
            print(
                f"{name:8} {count.requests:7,} requests  {count.per_request:12,.0f} "
                "instructions/request",
                flush=True,
            )
    floor = next((c for c in counts if c.target == "bare"), None)
    if floor is not None:
        for c in counts:
            if c.target != "bare":
                print(f"{c.target:8} {c.per_request / floor.per_request:5.2f}x the floor")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks instructions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", action="append", choices=TARGETS)
    parser.add_argument("--seconds", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--keep", help="keep callgrind's files in this directory")
    try:
        return run(parser.parse_args(argv))
    except servers.BenchError as exc:
        print(f"instructions: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
