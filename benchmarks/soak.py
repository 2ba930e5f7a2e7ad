"""Soak: mixed traffic through a real ``triogate serve`` for a long while
(10 minutes by default), watching that the server stays flat and correct.

The gateway runs as a subprocess on a real LMDB in a temporary directory,
in front of an upstream this process runs (benchmarks/soak_http.py) that
fails and dawdles on request. ``--concurrency`` workers, each on its own
keep-alive connection, send a seeded random mix:

* a valid key (GET, POST with a body, a fresh connection closed after the
  answer), no key, unknown and malformed keys;
* keys revoked during the run (one every ``--revoke-seconds``, a new one
  created each time) and a key revoked before it;
* a key with a small rate limit (5/s) and a key with few credits (30,
  refilled every 5 s): both are refused with 429 much of the time;
* the upstream answering 500 or 503 on purpose (passed through), slowly
  within the route's 0.5 s read timeout, and too slowly (the gateway's 504);
* a path no route matches.

Every ``--reload-seconds`` the config file is rewritten (atomically) and
reloaded, by ``POST /config/reload`` and by SIGHUP in turn; each reload
changes a response header on one route and the settings of one upstream
(so its connection pool is replaced). Every ``--sample-seconds`` the
server's RSS, its process-private memory (``RssAnon``), its open file
descriptors (``/proc/PID/fd``) and the latency of the window's answers
(p50/p99, the slow route left out) are sampled and printed as a row.

The run fails (exit status 1, with the reasons) when private memory or fds
keep growing (after a warm-up of a quarter of the run, the median of the
last third of the samples against that of the second third, with a
tolerance), when the gateway makes a 5xx that the upstream did not cause
(the upstream marks its answers; the slow route's 504 is expected), when any
answer is not what its kind of request must get (a revoked key let in, a
valid key refused), when a request gets no answer (connection errors, 10 s
without an answer), when a reload does not apply, when the server logs a
traceback, or when it does not stop cleanly on SIGTERM at the end.

RSS as a whole is shown but not judged: it includes LMDB's mapped file
pages, which grow with the data file (usage history, audit entries) by
design; ``RssAnon`` is what a leak in the process itself would grow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from triogate.control.keyformat import KeyFormat

from .soak_http import Answer, Connection, SoakUpstream, TransportError, fetch
from .soak_report import Report, Sample, Window, print_header, print_row, print_summary
from .soak_server import ServerProcess, SoakError, proc_stats
from .soak_verdict import Kind, judge

HOST = "127.0.0.1"
ANSWER_TIMEOUT = 10.0  # no answer within this is a hang (the upstream answers in < 3 s)
SLOW_MS = 20  # the slow upstream's delay, well within the slow route's 0.5 s read timeout
TOO_SLOW_MS = 2000  # and well past it
ACTIVE_DOOMED = 3  # keys waiting for their revocation at any time
WEIGHTS: dict[Kind, float] = {
    Kind.OK: 38,
    Kind.POST: 8,
    Kind.CLOSE: 4,
    Kind.MISSING: 4,
    Kind.INVALID: 6,
    Kind.DOOMED: 8,
    Kind.REVOKED: 4,
    Kind.RATE: 8,
    Kind.CREDITS: 6,
    Kind.UPSTREAM_ERROR: 6,
    Kind.SLOW: 4,
    Kind.TOO_SLOW: 0.5,
    Kind.NO_ROUTE: 3,
}


@dataclass(frozen=True)
class Settings:
    seconds: float = 600.0
    sample_seconds: float = 5.0
    concurrency: int = 16
    reload_seconds: float = 60.0
    revoke_seconds: float = 20.0
    seed: int = 1
    json: bool = False


@dataclass
class DoomedKey:
    id: str
    key: str
    revoke_sent_at: float | None = None
    revoked_at: float | None = None


@dataclass
class Keys:
    valid: str
    rate: str
    credits: str
    doomed: list[DoomedKey]
    revoked: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.s = settings
        self.rng = random.Random(settings.seed)
        self.keyformat = KeyFormat("tg_")
        self.upstream = SoakUpstream(HOST)
        self.report = Report(settings=dataclasses.asdict(settings))
        self.window = Window()
        self.server = ServerProcess(tmp)
        self.admin_key = ""
        self.generation = 0
        self.keys: Keys | None = None
        self.seq = 0

    # --- the admin API ----------------------------------------------------

    async def call(self, method: str, path: str, body: object = None, ok: int = 200) -> Answer:
        headers = [("authorization", f"Bearer {self.admin_key}")] if self.admin_key else []
        data = b""
        if body is not None:
            data = json.dumps(body).encode()
            headers.append(("content-type", "application/json"))
        try:
            with trio.fail_after(ANSWER_TIMEOUT):
                answer = await fetch(HOST, self.server.admin_port, method, path, headers, data)
        except (TransportError, trio.TooSlowError) as exc:
            raise SoakError(f"admin API {method} {path}: no answer ({exc})") from exc
        if answer.status != ok:
            raise SoakError(f"admin API {method} {path}: {answer.status} {answer.body[:300]!r}")
        return answer

    async def create_key(self, name: str, **extra: object) -> tuple[str, str]:
        answer = await self.call("POST", "/keys", {"name": name, "owner": "soak", **extra}, 201)
        doc = answer.json()
        assert isinstance(doc, dict)
        return str(doc["id"]), str(doc["key"])

    async def setup(self) -> None:
        setup = await self.call(
            "POST", "/setup", {"name": "soak", "email": "soak@example.com"}, 201
        )
        doc = setup.json()
        assert isinstance(doc, dict)
        self.admin_key = str(doc["key"])
        _, valid = await self.create_key("valid")
        _, rate = await self.create_key(
            "rate", rate_limits=[{"name": "soak", "limit": 5, "period_seconds": 1}]
        )
        _, credits = await self.create_key(
            "credits",
            credits={"remaining": 30, "refill_amount": 30, "refill_interval_seconds": 5},
        )
        doomed = [DoomedKey(*await self.create_key("doomed")) for _ in range(ACTIVE_DOOMED)]
        gone_id, gone = await self.create_key("revoked")
        await self.call("DELETE", f"/keys/{gone_id}")
        self.keys = Keys(valid, rate, credits, doomed, [gone])

    async def revoke_one(self) -> None:
        """A new doomed key in, the oldest one revoked."""
        keys = self.keys
        assert keys is not None
        keys.doomed.append(DoomedKey(*await self.create_key("doomed")))
        victim = keys.doomed[0]
        victim.revoke_sent_at = trio.current_time()
        await self.call("DELETE", f"/keys/{victim.id}")
        victim.revoked_at = trio.current_time()
        keys.doomed.pop(0)
        keys.revoked = [*keys.revoked[-19:], victim.key]
        self.report.revoked += 1
        self.report.created += 1

    async def reload(self) -> None:
        """Rewrite the config, reload it (POST and SIGHUP in turn) and wait
        until the server says it applied it."""
        before = await self.call("GET", "/config")
        previous = before.json()
        assert isinstance(previous, dict)
        self.generation += 1
        self.server.write_config(self.upstream.port, self.generation)
        by_signal = self.generation % 2 == 0
        if by_signal:
            self.server.signal(signal.SIGHUP)
        else:
            await self.call("POST", "/config/reload")
        with trio.move_on_after(ANSWER_TIMEOUT):
            while True:
                doc = (await self.call("GET", "/config")).json()
                assert isinstance(doc, dict)
                if doc["reloads"] > previous["reloads"] and doc["version"] != previous["version"]:
                    self.report.reloads.append("SIGHUP" if by_signal else "POST /config/reload")
                    return
                await trio.sleep(0.1)
        how = "SIGHUP" if by_signal else "POST /config/reload"
        self.report.failures.append(f"reload {self.generation} ({how}) did not apply")

    # --- the load -----------------------------------------------------------

    def _request(
        self, kind: Kind
    ) -> tuple[str, str, list[tuple[str, str]], bytes, DoomedKey | None]:
        keys = self.keys
        assert keys is not None
        self.seq += 1
        n, rng = self.seq, self.rng
        bearer = rng.random() < 0.5  # both ways of carrying a key

        def key(value: str) -> list[tuple[str, str]]:
            return [("authorization", f"Bearer {value}") if bearer else ("x-api-key", value)]

        doomed = None
        if kind is Kind.POST:
            return "POST", f"/ok/upload/{n}", key(keys.valid), b"x" * 2048, None
        if kind is Kind.MISSING:
            return "GET", f"/ok/item/{n}", [], b"", None
        if kind is Kind.INVALID:
            made_up = self.keyformat.generate()  # well formed, never issued
            if n % 3 == 1:
                made_up = made_up[:-1] + ("A" if made_up[-1] != "A" else "B")  # bad checksum
            elif n % 3 == 2:
                made_up = f"garbage-{n}"
            return "GET", f"/ok/item/{n}", key(made_up), b"", None
        if kind is Kind.DOOMED:
            doomed = rng.choice(keys.doomed)
            return "GET", f"/ok/doomed/{n}", key(doomed.key), b"", doomed
        if kind is Kind.REVOKED:
            return "GET", f"/ok/item/{n}", key(rng.choice(keys.revoked)), b"", None
        if kind is Kind.RATE:
            return "GET", f"/ok/rate/{n}", key(keys.rate), b"", None
        if kind is Kind.CREDITS:
            return "GET", f"/ok/credits/{n}", key(keys.credits), b"", None
        if kind is Kind.UPSTREAM_ERROR:
            status = rng.choice((500, 503))
            return "GET", f"/error/{n}?status={status}", key(keys.valid), b"", None
        if kind is Kind.SLOW:
            return "GET", f"/slow/{n}?delay_ms={SLOW_MS}", key(keys.valid), b"", None
        if kind is Kind.TOO_SLOW:
            return "GET", f"/slow/{n}?delay_ms={TOO_SLOW_MS}", key(keys.valid), b"", None
        if kind is Kind.NO_ROUTE:
            return "GET", f"/nowhere/{n}", [], b"", None
        return "GET", f"/ok/item/{n}", key(keys.valid), b"", None  # OK, CLOSE

    async def worker(self, deadline: float) -> None:
        conn = Connection(HOST, self.server.proxy_port)
        kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
        try:
            while trio.current_time() < deadline:
                kind = self.rng.choices(kinds, weights)[0]
                method, target, headers, body, doomed = self._request(kind)
                started = trio.current_time()
                answer: Answer | None = None
                problem = ""
                with trio.move_on_after(ANSWER_TIMEOUT):
                    try:
                        answer = await conn.request(
                            method, target, headers, body, close=kind is Kind.CLOSE
                        )
                    except TransportError as exc:
                        problem = str(exc)
                    else:
                        problem = ""
                ended = trio.current_time()
                if answer is None:
                    problem = problem or f"no answer within {ANSWER_TIMEOUT:.0f} s"
                    self.window.transport_error(kind, f"{method} {target}: {problem}")
                    await trio.sleep(0.05)  # do not spin on a server that refuses connections
                    continue
                revoked = None
                if doomed is not None:
                    if doomed.revoked_at is not None and started >= doomed.revoked_at:
                        revoked = True
                    elif doomed.revoke_sent_at is None or doomed.revoke_sent_at > ended:
                        revoked = False
                code = None if answer.from_upstream else answer.code
                outcome = judge(
                    kind, answer.status, code, from_upstream=answer.from_upstream, revoked=revoked
                )
                self.window.add(kind, outcome, answer, code, ended - started, f"{method} {target}")
        finally:
            await conn.aclose()

    # --- the run --------------------------------------------------------------

    def sample(self, t: float) -> Sample:
        rss, anon, fds = proc_stats(self.server.pid)
        window, self.window = self.window, Window()
        return self.report.add_window(t, window, rss, anon, fds, self.s.sample_seconds)

    async def sampler(self, start: float, emit: Callable[[Sample], None]) -> None:
        count = int(self.s.seconds // self.s.sample_seconds)
        for i in range(1, count + 1):
            await trio.sleep_until(start + i * self.s.sample_seconds)
            self.server.check_alive()
            emit(self.sample(i * self.s.sample_seconds))

    async def operator(self, start: float, deadline: float) -> None:
        """Revocations, reloads and an admin probe, each on its schedule."""
        next_revoke = start + self.s.revoke_seconds
        next_reload = start + self.s.reload_seconds
        next_probe = start + self.s.sample_seconds / 2
        while True:
            upcoming = min(next_revoke, next_reload, next_probe)
            if upcoming >= deadline:
                return
            await trio.sleep_until(upcoming)
            if upcoming == next_revoke:
                await self.revoke_one()
                next_revoke += self.s.revoke_seconds
            elif upcoming == next_reload:
                await self.reload()
                next_reload += self.s.reload_seconds
            else:
                await self.call("GET", "/health")
                await self.call("GET", "/metrics")
                next_probe += self.s.sample_seconds

    async def run(self, emit: Callable[[Sample], None]) -> None:
        async with trio.open_nursery() as outer:
            await outer.start(self.upstream.run)
            try:
                await self.server.start(self.upstream.port)
                await self.setup()
                rss, anon, fds = proc_stats(self.server.pid)
                self.report.start = (rss, anon, fds)
                start = trio.current_time()
                deadline = start + self.s.seconds
                async with trio.open_nursery() as load:
                    for _ in range(self.s.concurrency):
                        load.start_soon(self.worker, deadline)
                    load.start_soon(self.operator, start, deadline)
                    await self.sampler(start, emit)
                self.report.seconds = trio.current_time() - start
                self.report.upstream_answered = self.upstream.answered
                self.report.exit_status = await self.server.stop()
                self.report.stopped = True
                self.report.server_log = self.server.log()
                self.report.data_mb = self.server.data_mb()
            finally:
                self.server.kill()
                outer.cancel_scope.cancel()


def run(settings: Settings) -> Report:
    with tempfile.TemporaryDirectory(prefix="triogate-soak-") as tmp:
        soak = Soak(settings, Path(tmp))
        if not settings.json:
            print_header(settings)
        emit = (lambda sample: None) if settings.json else print_row
        try:
            trio.run(soak.run, emit)
        except BaseExceptionGroup as group:
            # A task's SoakError arrives wrapped by its nursery: say it plainly.
            found: BaseException | None = group.split(SoakError)[0]
            while isinstance(found, BaseExceptionGroup):
                found = found.exceptions[0]
            if found is not None:
                raise found from None
            raise
        finally:
            soak.server.kill()
    return soak.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the run")
    parser.add_argument("--sample-seconds", type=float, default=5.0, help="between samples")
    parser.add_argument("--concurrency", type=int, default=16, help="client connections")
    parser.add_argument("--reload-seconds", type=float, default=60.0, help="between reloads")
    parser.add_argument("--revoke-seconds", type=float, default=20.0, help="between revocations")
    parser.add_argument("--seed", type=int, default=1, help="seed of the traffic mix")
    parser.add_argument("--json", action="store_true", help="print one JSON document at the end")
    args = parser.parse_args(argv)
    if args.sample_seconds <= 0 or args.concurrency < 1:
        parser.error("--sample-seconds must be > 0 and --concurrency >= 1")
    if args.seconds < 8 * args.sample_seconds:
        parser.error("--seconds must cover at least 8 samples (growth is judged on them)")
    if args.reload_seconds <= 0 or args.revoke_seconds <= 0:
        parser.error("--reload-seconds and --revoke-seconds must be > 0")
    settings = Settings(
        seconds=args.seconds,
        sample_seconds=args.sample_seconds,
        concurrency=args.concurrency,
        reload_seconds=args.reload_seconds,
        revoke_seconds=args.revoke_seconds,
        seed=args.seed,
        json=args.json,
    )

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)  # unwind: the server is stopped
    began = time.time()
    try:
        report = run(settings)
    except SoakError as exc:
        print(f"benchmarks soak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchmarks soak: interrupted; server stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    report.began = began
    return print_summary(report)
