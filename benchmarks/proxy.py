"""End-to-end proxy throughput: wrk against nginx, nginx as a proxy, a bare
trio proxy, the Python gateways a team could write instead, and triogate.

Ten targets in one run, each loaded the same way (wrk, one thread, N
keep-alive connections, after a short warm-up):

  direct          wrk -> nginx serving a fixed 20-byte body (the upstream)
  nginx-proxy     wrk -> nginx as a reverse proxy (upstream keep-alive) -> upstream
  bare trio       wrk -> ``benchmarks/bare_proxy.py`` -> upstream: the smallest
                  honest reverse proxy on trio + httptools (no routing, no
                  plugins), the floor of what any gateway written on trio +
                  httptools can do on this machine; triogate's ratio to it
                  shows how much of its cost is the language and runtime and
                  how much is triogate's own
  aiohttp         wrk -> ``benchmarks/peers/aiohttp_proxy.py``: a hand-written
                  aiohttp + uvloop reverse proxy, ~40 lines (the peers run
                  from their own venv, benchmarks/.peers-venv)
  aiohttp+key     the same as a minimal DIY gateway: X-API-Key looked up in a
                  dict (401 without it) and a request counter per key
  starlette       ``benchmarks/peers/starlette_proxy.py``: Starlette + httpx on
                  uvicorn (uvloop, httptools), the usual FastAPI-style gateway
  triogate        wrk -> ``triogate serve``, a route without plugins -> upstream
  triogate TLS    the same over HTTPS: a second ``triogate serve`` with
                  ``[server.tls]`` (a self-signed P-256 certificate made for
                  the run), wrk speaking TLS 1.3 on its keep-alive
                  connections, so the handshakes are paid once per
                  connection and the figure is what TLS termination costs
                  per request (encrypting and decrypting each exchange);
                  its CPU per request next to the plain one's is printed
  triogate+key    the same with ``key-auth`` on the route (X-API-Key header)
  triogate+limit  ``key-auth`` and ``rate-limit`` (by key) on the route, and a
                  key with its own rate limit and credits: every request is
                  admitted against three limits and the credits, and counted
                  in the key's usage, which the actors flush to storage. The
                  limits are so high that nothing is refused: the figure is
                  the cost of the checks, not of refusals. After the run the
                  key's usage (admin API) must have grown by at least the
                  requests wrk counted.

Targets are loaded in interleaved rounds (``--rounds N``: every target
once, then every target again, ...) so drift over the run hits all alike; the
figures are the median per target over its rounds. Progress goes to stderr.
``--report DIR`` writes results.json, results.md and a PNG bar chart (with
matplotlib from the peers' venv or ``triogate[bench]``).

Every server under test (both nginx instances, the bare proxy, the peers and
triogate) is pinned to one core and wrk to another, so the servers share one core the
way they would share a small machine, and the load generator does not steal
from them. Before loading a target the benchmark checks that it answers 200
with the expected body (and, for the rate-limited route, the RateLimit
headers); wrk's socket errors and non-2xx/3xx answers are reported, and a run
with any of them is flagged (exit status 1).

Needs nginx and wrk, and the peers' venv: ``bash benchmarks/setup.sh``
installs nginx and wrk from Debian's packages and the peers from PyPI into
benchmarks/.peers-venv (``--no-peers`` runs without them). Only loopback
traffic; every process started here is stopped on the way out, on errors and
Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import proxy_report
from .bench_load import (
    Target,
    UsageCheck,
    WrkResult,
    _await_usage,
    _get,
    _usage,
    _verify,
    _wrk,
    parse_wrk,
)
from .bench_servers import (
    CREDITS,
    HOST,
    NEVER,
    REQUEST_PATH,
    BenchError,
    Managed,
    _children,
    _cpu_seconds,
    _cpus_allowed,
    _create_admin,
    _fail,
    _free_port,
    _start_bare,
    _start_nginx,
    _start_peer,
    _start_triogate,
    _triogate_conf,
    _wait_port,
    _write_proxy_conf,
    _write_upstream_conf,
    bench_certificate,
    create_bench_keys,
)
from .bench_summary import (
    AIOHTTP,
    AIOHTTP_KEY,
    BARE,
    DIRECT,
    FLOOR_PURPOSE,
    KEY,
    LIMITED,
    NGINX_PROXY,
    NOKEY,
    PEER_KEY,
    STARLETTE,
    _median_result,
    _merged,
    _problems,
    _report,
    _stderr_text,
    _version,
)
from .machine import describe

NOKEY_TLS = "triogate, no plugins, TLS"

# --- the run -------------------------------------------------------------------


def _find(program: str) -> str:
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if found is None:
        _fail(f"{program} not found: run 'bash benchmarks/setup.sh' first (as root)")
    return found


def _core(value: int, role: str) -> int | None:
    if value < 0:
        return None
    allowed = os.sched_getaffinity(0)
    if value not in allowed:
        _fail(f"--{role}-core {value}: this process may only use cores {sorted(allowed)}")
    return value


def _pinning(server_core: int | None, load_core: int | None) -> str:
    servers = "not pinned" if server_core is None else f"pinned to core {server_core}"
    load = "not pinned" if load_core is None else f"pinned to core {load_core}"
    shared = " (SAME core as the servers)" if server_core == load_core is not None else ""
    return (
        f"servers (nginx upstream, nginx proxy, bare trio proxy, peers, triogate) {servers}; "
        f"wrk {load}{shared}"
    )


def _tree_affinity(server: Managed) -> str:
    pids = [server.proc.pid, *_children(server.proc.pid)]
    return ",".join(sorted({_cpus_allowed(pid) for pid in pids}))


def _round_of(result: WrkResult) -> proxy_report.Round:
    return proxy_report.Round(
        requests_per_second=result.requests_per_second,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        cpu_us_per_request=result.cpu_us_per_request,
        requests=result.requests,
        non_2xx_3xx=result.non_2xx_3xx,
        socket_errors=dict(result.socket_errors),
    )


def _progress(round_no: int, rounds: int, index: int, total: int, name: str, left: float) -> None:
    minutes, seconds = divmod(max(0, round(left)), 60)
    print(
        f"[round {round_no}/{rounds}] target {index}/{total}: {name} "
        f"(about {minutes}:{seconds:02d} left)",
        file=sys.stderr,
        flush=True,
    )


def _tls_cost(plain: WrkResult, tls: WrkResult, connections: int) -> None:
    """What TLS termination costs per request, same run, same route."""
    extra = tls.cpu_us_per_request - plain.cpu_us_per_request
    share = extra / plain.cpu_us_per_request * 100 if plain.cpu_us_per_request else 0.0
    print(
        f"TLS termination: {NOKEY_TLS!r} {tls.cpu_us_per_request:.0f} µs CPU per request vs "
        f"{plain.cpu_us_per_request:.0f} µs plain: {extra:+.0f} µs ({share:+.0f}%), "
        f"{tls.requests_per_second:,.0f} vs {plain.requests_per_second:,.0f} req/s "
        f"({connections} keep-alive connections: one handshake each, amortised)"
    )


def run(args: argparse.Namespace) -> int:
    nginx = _find("nginx")
    wrk = _find("wrk")
    peers = not args.no_peers
    if peers and not proxy_report.PEERS_PYTHON.exists():
        _fail(
            f"the peers' venv {proxy_report.PEERS_PYTHON.parent.parent} is missing: run "
            "'bash benchmarks/setup.sh' first (or pass --no-peers)"
        )
    server_core = _core(args.server_core, "server")
    load_core = _core(args.load_core, "load")

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triogate-bench-")))
        upstream_port = _free_port()
        proxy_port = _free_port()
        while proxy_port == upstream_port:
            proxy_port = _free_port()
        bare_port = _free_port()
        while bare_port in (upstream_port, proxy_port):
            bare_port = _free_port()

        upstream = _start_nginx(
            stack, nginx, tmp, "upstream", _write_upstream_conf(tmp, upstream_port), server_core
        )
        proxy = _start_nginx(
            stack,
            nginx,
            tmp,
            "proxy",
            _write_proxy_conf(tmp, proxy_port, upstream_port),
            server_core,
        )
        bare = _start_bare(stack, tmp, bare_port, upstream_port, server_core)
        peer_servers: list[tuple[Managed, int, Target]] = []
        if peers:
            for name, script, extra, path, headers in (
                (AIOHTTP, "aiohttp_proxy.py", (), "nokey", ()),
                (
                    AIOHTTP_KEY,
                    "aiohttp_proxy.py",
                    ("--api-key", PEER_KEY),
                    "key",
                    (("X-API-Key", PEER_KEY),),
                ),
                (STARLETTE, "starlette_proxy.py", (), "nokey", ()),
            ):
                port = _free_port()
                server = _start_peer(
                    stack, tmp, name, script, port, upstream_port, server_core, extra
                )
                target = Target(name, f"http://{HOST}:{port}/{path}/{REQUEST_PATH}", headers)
                peer_servers.append((server, port, target))
        data_dir = tmp / "data"
        data_dir.mkdir()
        keys = create_bench_keys(data_dir)
        key, limited_key = keys.key, keys.limited
        admin_key = _create_admin(data_dir)
        gateway, gateway_url, admin_url = _start_triogate(
            stack, tmp, _triogate_conf(tmp, data_dir, upstream_port), server_core
        )
        # The TLS target: its own process and data directory (one LMDB
        # environment per server), made ready by the CLI like the first.
        tls_data = tmp / "data-tls"
        tls_data.mkdir()
        _create_admin(tls_data)
        tls_name = "triogate-tls"
        tls_conf = _triogate_conf(
            tmp, tls_data, upstream_port, tls=bench_certificate(tmp), name=tls_name
        )
        tls_gateway, tls_url, _ = _start_triogate(stack, tmp, tls_conf, server_core, tls_name)
        _wait_port(upstream, upstream_port)
        _wait_port(proxy, proxy_port)
        _wait_port(bare, bare_port)
        for server, port, _ in peer_servers:
            _wait_port(server, port)

        targets = [
            Target(DIRECT, f"http://{HOST}:{upstream_port}/nokey/{REQUEST_PATH}"),
            Target(NGINX_PROXY, f"http://{HOST}:{proxy_port}/nokey/{REQUEST_PATH}"),
            Target(BARE, f"http://{HOST}:{bare_port}/nokey/{REQUEST_PATH}"),
            *(target for _, _, target in peer_servers),
            Target(NOKEY, f"{gateway_url}/nokey/{REQUEST_PATH}"),
            Target(NOKEY_TLS, f"{tls_url}/nokey/{REQUEST_PATH}"),
            Target(KEY, f"{gateway_url}/key/{REQUEST_PATH}", (("X-API-Key", key.key),)),
            Target(
                LIMITED,
                f"{gateway_url}/limited/{REQUEST_PATH}",
                (("X-API-Key", limited_key.key),),
                # Both policies, the key's own and the route's, and the state.
                (
                    ("RateLimit-Policy", '"burst"'),
                    ("RateLimit-Policy", '"route-key"'),
                    ("RateLimit", ""),
                ),
            ),
        ]
        by_name = {t.name: t for t in targets}
        policy = ""
        for target in targets:
            policy = _verify(target).get("RateLimit-Policy", policy)
        # And key-auth is really on: no key, no entry.
        for name in (KEY, LIMITED, AIOHTTP_KEY) if peers else (KEY, LIMITED):
            status, _ = _get(by_name[name].url, ())
            if status != 401:
                _fail(f"{name!r} answered {status} without a key; expected 401")

        servers = (
            upstream,
            proxy,
            bare,
            *(s for s, _, _ in peer_servers),
            gateway,
            tls_gateway,
        )
        # CPU spent per request by the process answering wrk (not the
        # upstream): steady under load from other programs, where req/s
        # is not.
        answering = {
            DIRECT: upstream,
            NGINX_PROXY: proxy,
            BARE: bare,
            **{target.name: server for server, _, target in peer_servers},
            NOKEY: gateway,
            NOKEY_TLS: tls_gateway,
            KEY: gateway,
            LIMITED: gateway,
        }
        placement = "; ".join(f"{s.name}: cpus {_tree_affinity(s)}" for s in servers)

        print("benchmark: end-to-end HTTP/1.1 proxy, 20-byte body from an nginx upstream")
        print(describe(_pinning(server_core, load_core)))
        print(f"processes: {placement}")
        print(
            f"load: wrk -t1 -c{args.connections} -d{args.seconds}s --latency "
            f"(after a {args.warmup} s warm-up), one target at a time, all on loopback"
        )
        print(f"  ({nginx} {_version([nginx, '-v'])}; {_version([wrk, '-v'])})")
        print(
            f"{LIMITED!r}: route rate-limit {NEVER:,}/1 s by key, key limit burst={NEVER:,}/1 s, "
            f"{CREDITS:,} credits (nothing is refused: the checks are measured)"
        )
        print(FLOOR_PURPOSE)
        print(
            f"rounds: {args.rounds}, interleaved (every target once per round); "
            "figures are the median per target over its rounds"
        )
        print()

        load_before = os.getloadavg()[0]
        rounds: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
        warm_rounds: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
        usage_before = None
        answered = 0  # the rate-limited key's requests, warm-ups included
        order = proxy_report.interleave([t.name for t in targets], args.rounds)
        per_load = args.warmup + args.seconds + 0.5  # wrk's start-up and the checks
        for done, (round_no, name) in enumerate(order):
            target = by_name[name]
            _progress(
                round_no,
                args.rounds,
                targets.index(target) + 1,
                len(targets),
                name,
                (len(order) - done) * per_load,
            )
            for server in servers:
                server.check_alive()
            if target.name == LIMITED and usage_before is None:
                usage_before = _usage(admin_url, admin_key, limited_key.id)
            if args.warmup > 0:
                output = _wrk(
                    wrk,
                    target,
                    seconds=args.warmup,
                    connections=args.connections,
                    core=load_core,
                    latency=False,
                )
                warm = parse_wrk(output, latency=False)
                warm_rounds[name].append(warm)
                if name == LIMITED:
                    answered += warm.requests
            cpu_before = _cpu_seconds(answering[target.name].proc.pid)
            measured = parse_wrk(
                _wrk(
                    wrk,
                    target,
                    seconds=args.seconds,
                    connections=args.connections,
                    core=load_core,
                    latency=True,
                )
            )
            cpu = _cpu_seconds(answering[target.name].proc.pid) - cpu_before
            if measured.requests:
                measured = dataclasses.replace(
                    measured, cpu_us_per_request=cpu / measured.requests * 1e6
                )
            rounds[name].append(measured)
            if name == LIMITED:
                answered += measured.requests
            for server in servers:
                server.check_alive()
            _verify(target)  # still healthy after the load
        print("all rounds done", file=sys.stderr, flush=True)
        rows = [
            proxy_report.median_row(
                t.name,
                [_round_of(r) for r in rounds[t.name]],
                [_round_of(r) for r in warm_rounds[t.name]],
            )
            for t in targets
        ]
        results = {row.target: _median_result(row) for row in rows}
        warmups = {name: _merged(found) for name, found in warm_rounds.items() if found}
        assert usage_before is not None
        usage_after, waited = _await_usage(
            admin_url, admin_key, limited_key.id, usage_before, answered
        )
        usage = UsageCheck(limited_key.id, usage_before, usage_after, answered, policy, waited)
        triogate_log = "\n".join(
            log
            for log in (_problems(tmp / "triogate.err"), _problems(tmp / f"{tls_name}.err"))
            if log
        )
        bare_log = _stderr_text(tmp / "bare.err")
        load_after = os.getloadavg()[0]

    code = _report(targets, results, warmups, triogate_log, bare_log, usage)
    _tls_cost(results[NOKEY], results[NOKEY_TLS], args.connections)
    load_text = f"1-min load average {load_before:.2f} before, {load_after:.2f} after"
    print(f"machine {load_text}; anything else running on the servers' core skews these figures")
    if args.report is not None:
        meta: dict[str, object] = {
            "command": "python -m benchmarks proxy " + " ".join(args.argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": describe(_pinning(server_core, load_core)).removeprefix("machine: "),
            "load": load_text,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "connections": args.connections,
            "flagged": code != 0,
        }
        for line in proxy_report.write_report(Path(args.report), rows, meta):
            print(f"report: {line}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks proxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per target")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per target")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument(
        "--server-core", type=int, default=0, help="core for every server under test (-1: none)"
    )
    parser.add_argument("--load-core", type=int, default=1, help="core for wrk (-1: none)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds; the median per target"
    )
    parser.add_argument(
        "--report", metavar="DIR", help="write results.json, results.md and proxy.png there"
    )
    parser.add_argument(
        "--no-peers", action="store_true", help="without the aiohttp and Starlette peers"
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.seconds < 1 or args.warmup < 0 or args.connections < 1 or args.rounds < 1:
        parser.error("--seconds, --connections and --rounds must be >= 1, --warmup >= 0")

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    # SIGTERM unwinds like Ctrl-C does, so every server is stopped.
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return run(args)
    except BenchError as exc:
        print(f"benchmarks proxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchmarks proxy: interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
