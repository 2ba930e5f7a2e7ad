"""Retry, circuit breaker, passive and active health, end to end: the real
gateway (native listener, real LMDB in a temp dir) in front of scripted h11
upstreams on loopback, driven with httpx.

Most tests run on trio's virtual clock (``autojump_clock``): the clock jumps
only when every task is blocked, so back-off waits, open periods and
timeouts are exact, and the tests take no real time. Arrival times are read
with ``trio.current_time()`` inside the fake upstream's handler. The retry
plugin's jitter source is replaced by a fixed draw (or a seeded generator)
to pin the back-off. Socket read timeouts are checked every ``sockio.TICK``,
so those are asserted within a tick.

A few tests run in real time: the one that measures the breaker's answer
in wall-clock milliseconds, and those using the admin API (it commits to
LMDB in a worker thread, and the virtual clock would race ahead while the
event loop waits for the thread).
"""

from __future__ import annotations

import math
import random
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio.testing import MockClock

from tests.helpers_gateway import PROBLEM_JSON, assert_problem, refused_config, setup_admin
from triogate.dataplane.sockio import TICK
from triogate.dataplane.upstream import TargetPool, Upstream
from triogate.policy.breaker import Breaker
from triogate.policy.retry_policy import backoff
from triogate.testing import (
    FakeResponse,
    FakeUpstream,
    Harness,
    LoopbackServer,
    RecordedRequest,
    open_harness,
)

ALMOST_ONE = 1.0 - 2**-52


# ---- helpers ----------------------------------------------------------------------------------


class FixedRandom:
    """Stands in for the retry plugin's ``random.Random``: every draw the same."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.draws = 0

    def random(self) -> float:
        self.draws += 1
        return self.value


class Timed:
    """A fake upstream handler: answers in order (then ``then`` for ever)
    and records when each request arrived, on trio's clock."""

    def __init__(self, *answers: FakeResponse, then: FakeResponse | None = None) -> None:
        self.answers = deque(answers)
        self.then = then or FakeResponse(200, body=b"ok")
        self.times: list[float] = []
        self.requests: list[RecordedRequest] = []

    async def __call__(self, request: RecordedRequest) -> FakeResponse:
        self.times.append(trio.current_time())
        self.requests.append(request)
        return self.answers.popleft() if self.answers else self.then

    def gaps(self) -> list[float]:
        return [b - a for a, b in pairwise(self.times)]


class Switch:
    """A fake upstream handler answering ``status`` (changed by the test);
    ``/health`` answers ``health``."""

    def __init__(self, status: int = 200, *, delay: float = 0.0, health: int = 200) -> None:
        self.status = status
        self.delay = delay
        self.health = health
        self.traffic: list[float] = []  # arrival times, not counting /health
        self.health_probes: list[tuple[float, int]] = []

    async def __call__(self, request: RecordedRequest) -> FakeResponse:
        now = trio.current_time()
        if request.path == "/health":
            self.health_probes.append((now, self.health))
            return FakeResponse(self.health)
        self.traffic.append(now)
        return FakeResponse(self.status, body=b"from upstream", delay=self.delay)


def upstream_answer(r: httpx.Response, status: int) -> None:
    """Assert ``r`` is the upstream's answer passed through, not the gateway's."""
    assert r.status_code == status, r.text
    assert not r.headers.get("content-type", "").startswith(PROBLEM_JSON), r.text


def plugin(h: Harness, name: str) -> Any:
    assert h.server.gateway is not None
    for p in h.server.gateway.current_pipeline().chains[0].plugins:
        if p.name == name:
            return p
    raise AssertionError(f"no {name} plugin on the route")


def upstream_of(h: Harness) -> Upstream:
    assert h.server.gateway is not None
    return h.server.gateway.current_pipeline().upstreams["test"]


def pools(h: Harness) -> list[TargetPool]:
    return upstream_of(h).pools


def breaker(h: Harness, index: int = 0) -> Breaker:
    b = pools(h)[index].breaker
    assert b is not None
    return b


def pin_jitter(h: Harness, draw: float) -> FixedRandom:
    fixed = FixedRandom(draw)
    plugin(h, "retry").random = fixed
    return fixed


class RawUpstream(LoopbackServer):
    """A byte-level upstream (for what h11 would refuse to send): the n-th
    request on any connection is answered with ``answers[n]``, sent piece by
    piece (a float is a pause in seconds). Request bodies are not expected."""

    def __init__(self, *answers: Sequence[bytes | float]) -> None:
        self.answers = list(answers)
        self.arrivals: list[float] = []

    async def _connection(self, stream: trio.SocketStream) -> None:
        data = b""
        try:
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
                data = data.partition(b"\r\n\r\n")[2]
                self.arrivals.append(trio.current_time())
                for piece in self.answers[len(self.arrivals) - 1]:
                    if isinstance(piece, float):
                        await trio.sleep(piece)
                    else:
                        await stream.send_all(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()


@asynccontextmanager
async def serving(*upstreams: LoopbackServer) -> AsyncIterator[None]:
    """Run fake upstreams (so their URLs are known before the harness starts)."""
    async with trio.open_nursery() as nursery:
        for up in upstreams:
            await nursery.start(up.run)
        yield
        nursery.cancel_scope.cancel()


def dead_url() -> str:
    """A loopback URL where nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def retry(**kw: Any) -> dict[str, dict[str, Any]]:
    return {"retry": kw}


def breaker_cfg(**kw: Any) -> dict[str, Any]:
    return {"minimum_requests": 1000, **kw}  # the error rate out of the way unless asked


async def until(condition: Callable[[], bool], step: float = 0.01) -> None:
    """Poll state owned by the product (no event to wait on)."""
    while not condition():  # noqa: ASYNC110
        await trio.sleep(step)


async def chunked(pieces: Sequence[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


# ---- retry: what is retried -------------------------------------------------------------------


async def test_get_retried_until_success(tmp_path: Path, autojump_clock: MockClock) -> None:
    handler = Timed(FakeResponse(503), FakeResponse(503), FakeResponse(200, body=b"third"))
    up = FakeUpstream(handler=handler)
    async with open_harness(tmp_path, upstream=up, plugins=retry(attempts=3)) as h:
        r = await h.client.get("/thing?x=1")
        assert r.status_code == 200
        assert r.content == b"third"
        assert [q.method for q in up.requests] == ["GET"] * 3
        assert {q.target for q in up.requests} == {"/thing?x=1"}
        assert plugin(h, "retry").retries == 2
        assert upstream_of(h).retries_in_flight == 0


async def test_attempts_bound_the_tries(tmp_path: Path, autojump_clock: MockClock) -> None:
    up = FakeUpstream(handler=Timed(then=FakeResponse(503, body=b"down")))
    async with open_harness(tmp_path, upstream=up, plugins=retry(attempts=4)) as h:
        r = await h.client.get("/r")
        # the last answer is the upstream's own
        upstream_answer(r, 503)
        assert r.content == b"down"
        assert len(up.requests) == 4


async def test_post_without_idempotency_key_sent_exactly_once(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    up = FakeUpstream(handler=Timed(FakeResponse(503), FakeResponse(503)))
    async with open_harness(tmp_path, upstream=up, plugins=retry(attempts=5)) as h:
        r = await h.client.post("/orders", content=b'{"n": 1}')
        upstream_answer(r, 503)
        assert len(up.requests) == 1
        assert up.requests[0].body == b'{"n": 1}'
        assert plugin(h, "retry").retries == 0


async def test_post_with_idempotency_key_retried_with_the_same_body(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    up = FakeUpstream(handler=Timed(FakeResponse(503), FakeResponse(502)))
    body = b"x" * 5000
    async with open_harness(tmp_path, upstream=up, plugins=retry(attempts=3)) as h:
        r = await h.client.post("/orders", content=body, headers={"Idempotency-Key": "k-1"})
        assert r.status_code == 200
        assert len(up.requests) == 3
        for q in up.requests:
            assert q.method == "POST"
            assert q.body == body
            assert q.header("idempotency-key") == "k-1"
            assert q.header("content-length") == "5000"


@pytest.mark.parametrize(
    ("method", "retried"),
    [
        ("GET", True),
        ("HEAD", True),
        ("OPTIONS", True),
        ("PUT", True),
        ("DELETE", True),
        ("POST", False),
        ("PATCH", False),
    ],
)
async def test_only_idempotent_methods_are_retried(
    tmp_path: Path, autojump_clock: MockClock, method: str, retried: bool
) -> None:
    up = FakeUpstream(handler=Timed(FakeResponse(503)))
    async with open_harness(tmp_path, upstream=up, plugins=retry(attempts=2)) as h:
        r = await h.client.request(method, "/m", content=b"body" if method == "PUT" else None)
        assert r.status_code == (200 if retried else 503)
        assert [q.method for q in up.requests] == [method] * (2 if retried else 1)


async def test_methods_list_is_configurable(tmp_path: Path, autojump_clock: MockClock) -> None:
    up = FakeUpstream(handler=Timed(FakeResponse(503), FakeResponse(200), FakeResponse(503)))
    async with open_harness(
        tmp_path, upstream=up, plugins=retry(attempts=2, methods=["POST"])
    ) as h:
        r = await h.client.post("/p", content=b"1")
        assert r.status_code == 200
        r = await h.client.get("/g")
        upstream_answer(r, 503)
        assert [q.method for q in up.requests] == ["POST", "POST", "GET"]


@pytest.mark.parametrize(
    ("statuses", "first", "retried"),
    [
        (None, 502, True),
        (None, 503, True),
        (None, 504, True),
        (None, 500, False),
        (None, 429, False),
        (None, 404, False),
        ([500, 429], 500, True),
        ([500, 429], 429, True),
        ([500, 429], 503, False),
        ([], 503, False),
    ],
)
async def test_retried_statuses_are_configurable(
    tmp_path: Path, autojump_clock: MockClock, statuses: list[int] | None, first: int, retried: bool
) -> None:
    up = FakeUpstream(handler=Timed(FakeResponse(first, body=b"first")))
    cfg: dict[str, Any] = {"attempts": 3}
    if statuses is not None:
        cfg["statuses"] = statuses
    async with open_harness(tmp_path, upstream=up, plugins=retry(**cfg)) as h:
        r = await h.client.get("/r")
        if retried:
            assert r.status_code == 200
            assert len(up.requests) == 2
        else:
            upstream_answer(r, first)
            assert r.content == b"first"
            assert len(up.requests) == 1


async def test_reset_before_any_byte_is_retried(tmp_path: Path, autojump_clock: MockClock) -> None:
    up = FakeUpstream(handler=Timed(FakeResponse(drop=True), FakeResponse(drop=True)))
    async with open_harness(tmp_path, upstream=up, plugins=retry(attempts=3)) as h:
        r = await h.client.get("/r")
        assert r.status_code == 200
        assert len(up.requests) == 3


async def test_reset_on_every_try_gives_502(tmp_path: Path, autojump_clock: MockClock) -> None:
    up = FakeUpstream(handler=Timed(then=FakeResponse(drop=True)))
    async with open_harness(tmp_path, upstream=up, plugins=retry(attempts=3)) as h:
        r = await h.client.get("/r")
        assert_problem(r, 502, "BAD_GATEWAY")
        assert len(up.requests) == 3


async def test_transport_errors_retried_whatever_the_statuses(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    up = FakeUpstream(handler=Timed(FakeResponse(drop=True), FakeResponse(503)))
    async with open_harness(tmp_path, upstream=up, plugins=retry(attempts=3, statuses=[])) as h:
        r = await h.client.get("/r")
        upstream_answer(r, 503)  # the reset was retried, the 503 is not
        assert len(up.requests) == 2


async def test_connect_failure_is_retried_on_the_other_target(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    good = FakeUpstream(handler=Timed())
    dead = dead_url()
    async with (
        serving(good),
        open_harness(
            tmp_path,
            upstream=good,
            plugins=retry(attempts=2),
            upstream_settings={"targets": [dead, good.url]},
        ) as h,
    ):
        assert pools(h)[0].url == dead  # round robin starts with the first target
        r = await h.client.get("/r")
        assert r.status_code == 200
        assert len(good.requests) == 1


async def test_connect_failure_on_the_only_target_gives_502(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    async with open_harness(
        tmp_path, plugins=retry(attempts=3), upstream_settings={"targets": [dead_url()]}
    ) as h:
        r = await h.client.get("/r")
        assert_problem(r, 502, "BAD_GATEWAY")
        assert plugin(h, "retry").retries == 2


async def test_read_timeout_is_retried(tmp_path: Path, autojump_clock: MockClock) -> None:
    handler = Timed(FakeResponse(200, body=b"late", delay=30))
    up = FakeUpstream(handler=handler)
    async with open_harness(
        tmp_path,
        upstream=up,
        plugins=retry(attempts=2),
        upstream_settings={"read_timeout_seconds": 0.5},
    ) as h:
        pin_jitter(h, 0.0)
        t0 = trio.current_time()
        r = await h.client.get("/r")
        assert r.status_code == 200
        assert r.content == b"ok"
        # socket timeouts are checked every sockio.TICK (0.05 s)
        assert 0.5 <= trio.current_time() - t0 <= 0.5 + TICK + 1e-9
        assert len(up.requests) == 2


async def test_moves_to_the_other_target(tmp_path: Path, autojump_clock: MockClock) -> None:
    first = FakeUpstream(handler=Timed(then=FakeResponse(503)))
    second = FakeUpstream(handler=Timed(then=FakeResponse(200, body=b"second")))
    async with (
        serving(first, second),
        open_harness(
            tmp_path,
            upstream=first,
            plugins=retry(attempts=2),
            upstream_settings={"targets": [first.url, second.url]},
        ) as h,
    ):
        r = await h.client.get("/r")
        assert r.status_code == 200
        assert r.content == b"second"
        assert len(first.requests) == 1
        assert len(second.requests) == 1


async def test_each_try_goes_to_an_untried_target(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    ups = [FakeUpstream(handler=Timed(then=FakeResponse(503))) for _ in range(3)]
    async with (
        serving(*ups),
        open_harness(
            tmp_path,
            upstream=ups[0],
            plugins=retry(attempts=3),
            upstream_settings={"targets": [u.url for u in ups]},
        ) as h,
    ):
        r = await h.client.get("/r")
        upstream_answer(r, 503)
        assert [len(u.requests) for u in ups] == [1, 1, 1]


# ---- retry: back-off ----------------------------------------------------------------------------


async def test_exact_backoff_times(tmp_path: Path, autojump_clock: MockClock) -> None:
    handler = Timed(*[FakeResponse(503)] * 5)
    up = FakeUpstream(handler=handler)
    cfg = retry(attempts=6, backoff_base_seconds=1, backoff_cap_seconds=5)
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        pin_jitter(h, 0.5)
        r = await h.client.get("/r")
        assert r.status_code == 200
        # ceilings 1, 2, 4, 8 -> 5 (cap), 16 -> 5; half of each
        assert handler.gaps() == pytest.approx([0.5, 1.0, 2.0, 2.5, 2.5], abs=1e-9)


@pytest.mark.parametrize(
    ("draw", "expected"),
    [
        (0.0, [0.0, 0.0, 0.0, 0.0]),  # a draw of 0: retry at once
        (ALMOST_ONE, [0.2, 0.4, 0.8, 1.0]),  # a draw towards 1: the ceiling
        (0.25, [0.05, 0.1, 0.2, 0.25]),
    ],
)
async def test_backoff_draw_extremes(
    tmp_path: Path, autojump_clock: MockClock, draw: float, expected: list[float]
) -> None:
    handler = Timed(*[FakeResponse(503)] * 4)
    up = FakeUpstream(handler=handler)
    cfg = retry(attempts=5, backoff_base_seconds=0.2, backoff_cap_seconds=1)
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        fixed = pin_jitter(h, draw)
        r = await h.client.get("/r")
        assert r.status_code == 200
        assert handler.gaps() == pytest.approx(expected, abs=1e-9)
        assert fixed.draws == 4


async def test_jitter_within_bounds_with_a_seeded_generator(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    base, cap, attempts = 0.1, 0.5, 6
    handler = Timed(then=FakeResponse(503))
    up = FakeUpstream(handler=handler)
    cfg = retry(attempts=attempts, backoff_base_seconds=base, backoff_cap_seconds=cap)
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        plugin(h, "retry").random = random.Random(20240601)
        twin = random.Random(20240601)
        for _ in range(5):
            start = len(handler.times)
            r = await h.client.get("/r")
            upstream_answer(r, 503)
            times = handler.times[start:]
            assert len(times) == attempts
            gaps = [b - a for a, b in pairwise(times)]
            for n, gap in enumerate(gaps, start=1):
                ceiling = min(cap, base * 2 ** (n - 1))
                assert -1e-9 <= gap <= ceiling + 1e-9
                assert gap == pytest.approx(backoff(n, base, cap, twin.random()), abs=1e-9)


async def test_retry_after_honoured_within_the_cap(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    handler = Timed(FakeResponse(503, [("retry-after", "2")]))
    up = FakeUpstream(handler=handler)
    cfg = retry(attempts=2, backoff_base_seconds=0.1, backoff_cap_seconds=3)
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        pin_jitter(h, 0.5)
        r = await h.client.get("/r")
        assert r.status_code == 200
        assert handler.gaps() == pytest.approx([2.0], abs=1e-9)


async def test_retry_after_http_date_honoured(tmp_path: Path, autojump_clock: MockClock) -> None:
    from email.utils import formatdate

    when = formatdate(math.floor(time.time()) + 3, usegmt=True)
    handler = Timed(FakeResponse(503, [("retry-after", when)]))
    up = FakeUpstream(handler=handler)
    cfg = retry(attempts=2, backoff_base_seconds=0.1, backoff_cap_seconds=10)
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        pin_jitter(h, 0.0)
        r = await h.client.get("/r")
        assert r.status_code == 200
        [gap] = handler.gaps()
        assert 1.5 < gap <= 3.0


@pytest.mark.parametrize(
    ("retry_after", "respect"),
    [("2", False), ("60", False), ("soon", True), ("-3", True), ("1.5", True)],
    ids=["not-respected", "not-respected-over-the-cap", "garbage", "negative", "fraction"],
)
async def test_retry_after_ignored(
    tmp_path: Path, autojump_clock: MockClock, retry_after: str, respect: bool
) -> None:
    handler = Timed(FakeResponse(503, [("retry-after", retry_after)]))
    up = FakeUpstream(handler=handler)
    cfg = retry(
        attempts=2,
        backoff_base_seconds=1,
        backoff_cap_seconds=3,
        respect_retry_after=respect,
    )
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        pin_jitter(h, 0.5)
        r = await h.client.get("/r")
        assert r.status_code == 200
        # the back-off instead: half of the first ceiling (1 s)
        assert handler.gaps() == pytest.approx([0.5], abs=1e-9)


async def test_retry_after_over_the_cap_ends_retrying(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    """docs/resilience.md: a longer Retry-After is respected by not retrying:
    the client gets that response, Retry-After included, at once."""
    handler = Timed(FakeResponse(503, [("retry-after", "60")], b"later"))
    up = FakeUpstream(handler=handler)
    cfg = retry(attempts=3, backoff_base_seconds=1, backoff_cap_seconds=3)
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        fixed = pin_jitter(h, 0.5)
        t0 = trio.current_time()
        r = await h.client.get("/r")
        upstream_answer(r, 503)
        assert r.content == b"later"
        assert r.headers["retry-after"] == "60"
        assert trio.current_time() == t0
        assert len(up.requests) == 1
        assert fixed.draws == 0
        assert upstream_of(h).retries_in_flight == 0


async def test_retry_after_in_unicode_digits_is_ignored(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    """``Retry-After: \xb2`` (latin-1 superscript two) is garbage to be
    ignored (ordinary back-off), not an internal error."""
    raw = RawUpstream(
        [b"HTTP/1.1 503 Service Unavailable\r\nretry-after: \xb2\r\ncontent-length: 0\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
    )
    async with (
        serving(raw),
        open_harness(
            tmp_path,
            plugins=retry(attempts=2, backoff_base_seconds=1, backoff_cap_seconds=3),
            upstream_settings={"targets": [raw.url]},
        ) as h,
    ):
        pin_jitter(h, 0.5)
        r = await h.client.get("/r")
        assert r.status_code == 200, r.text
        assert r.content == b"ok"
        assert [b - a for a, b in pairwise(raw.arrivals)] == pytest.approx([0.5], abs=1e-9)


async def test_retried_response_with_a_streaming_body_gives_its_connection_back(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    """The 503 being retried is still streaming its body (it was not in the
    first read): the plugin closes it, and its connection must leave the
    pool's ``active`` count (and be closed, it has unread bytes)."""
    raw = RawUpstream(
        [b"HTTP/1.1 503 Busy\r\ncontent-length: 5\r\n\r\n", 0.5, b"later"],
        [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
    )
    async with (
        serving(raw),
        open_harness(
            tmp_path, plugins=retry(attempts=2), upstream_settings={"targets": [raw.url]}
        ) as h,
    ):
        r = await h.client.get("/r")
        assert r.status_code == 200
        assert r.content == b"ok"
        await trio.sleep(1)
        [pool] = pools(h)
        assert pool.statistics().active == 0
        assert pool.statistics().idle <= 1


# ---- retry: timeouts and deadline ---------------------------------------------------------------


async def test_slow_upstream_gives_504_within_the_per_try_timeouts(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    up = FakeUpstream(handler=Timed(then=FakeResponse(200, delay=30)))
    cfg = retry(attempts=3, per_try_timeout_seconds=0.2)
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        pin_jitter(h, 0.0)
        t0 = trio.current_time()
        r = await h.client.get("/r")
        assert_problem(r, 504, "UPSTREAM_TIMEOUT")
        assert trio.current_time() - t0 == pytest.approx(0.6, abs=1e-9)
        assert len(up.requests) == 3


async def test_per_try_timeout_then_success(tmp_path: Path, autojump_clock: MockClock) -> None:
    up = FakeUpstream(handler=Timed(FakeResponse(200, body=b"late", delay=30)))
    cfg = retry(attempts=3, per_try_timeout_seconds=0.25)
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        pin_jitter(h, 0.0)
        t0 = trio.current_time()
        r = await h.client.get("/r")
        assert r.status_code == 200
        assert r.content == b"ok"
        assert trio.current_time() - t0 == pytest.approx(0.25, abs=1e-9)


@pytest.mark.parametrize(
    ("method", "attempts"), [("GET", 1), ("POST", 3)], ids=["single-attempt", "not-retryable"]
)
async def test_timeouts_of_the_plugin_skip_requests_it_will_not_retry(
    tmp_path: Path, autojump_clock: MockClock, method: str, attempts: int
) -> None:
    """docs/resilience.md: a request the plugin may not retry goes to the
    upstream once, as if the plugin were not there: only the upstream's read
    timeout bounds it."""
    up = FakeUpstream(handler=Timed(then=FakeResponse(200, delay=30)))
    cfg = retry(attempts=attempts, per_try_timeout_seconds=0.2, overall_timeout_seconds=0.3)
    async with open_harness(
        tmp_path, upstream=up, plugins=cfg, upstream_settings={"read_timeout_seconds": 1}
    ) as h:
        t0 = trio.current_time()
        r = await h.client.request(method, "/r")
        assert_problem(r, 504, "UPSTREAM_TIMEOUT")
        assert 1.0 <= trio.current_time() - t0 <= 1.0 + TICK + 1e-9
        assert len(up.requests) == 1


async def test_overall_deadline_cuts_a_slow_try(tmp_path: Path, autojump_clock: MockClock) -> None:
    up = FakeUpstream(handler=Timed(then=FakeResponse(200, delay=30)))
    cfg = retry(attempts=5, overall_timeout_seconds=0.5)
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        pin_jitter(h, 0.0)
        t0 = trio.current_time()
        r = await h.client.get("/r")
        assert_problem(r, 504, "UPSTREAM_TIMEOUT")
        assert trio.current_time() - t0 == pytest.approx(0.5, abs=1e-9)
        assert len(up.requests) == 1


async def test_overall_deadline_with_per_try_timeouts(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    up = FakeUpstream(handler=Timed(then=FakeResponse(200, delay=30)))
    cfg = retry(attempts=5, per_try_timeout_seconds=0.3, overall_timeout_seconds=0.5)
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        pin_jitter(h, 0.0)
        t0 = trio.current_time()
        r = await h.client.get("/r")
        assert_problem(r, 504, "UPSTREAM_TIMEOUT")
        # 0.3 s for the first try, the second cut at the deadline
        assert trio.current_time() - t0 == pytest.approx(0.5, abs=1e-9)
        assert len(up.requests) == 2


async def test_overall_deadline_stops_retrying(tmp_path: Path, autojump_clock: MockClock) -> None:
    handler = Timed(then=FakeResponse(503, body=b"busy"))
    up = FakeUpstream(handler=handler)
    cfg = retry(
        attempts=10,
        backoff_base_seconds=0.2,
        backoff_cap_seconds=0.2,
        overall_timeout_seconds=0.5,
    )
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        pin_jitter(h, ALMOST_ONE)
        t0 = trio.current_time()
        r = await h.client.get("/r")
        # tries at 0, 0.2, 0.4; one more wait would end past the deadline
        upstream_answer(r, 503)
        assert r.content == b"busy"
        assert len(up.requests) == 3
        assert trio.current_time() - t0 == pytest.approx(0.4, abs=1e-6)


# ---- retry: bodies ------------------------------------------------------------------------------


async def test_body_over_max_replay_bytes_sent_exactly_once(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    up = FakeUpstream(handler=Timed(FakeResponse(503)))
    body = b"y" * 101
    async with open_harness(
        tmp_path, upstream=up, plugins=retry(attempts=3, max_replay_bytes=100)
    ) as h:
        r = await h.client.put("/doc", content=body)
        upstream_answer(r, 503)
        assert len(up.requests) == 1
        assert up.requests[0].body == body
        # at the limit it is kept and sent again
        r = await h.client.put("/doc", content=body[:100])
        assert r.status_code == 200
        assert [len(q.body) for q in up.requests] == [101, 100]


async def test_body_at_max_replay_bytes_is_replayed(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    up = FakeUpstream(handler=Timed(FakeResponse(503), FakeResponse(503)))
    body = bytes(range(256)) * 4
    async with open_harness(
        tmp_path, upstream=up, plugins=retry(attempts=3, max_replay_bytes=len(body))
    ) as h:
        r = await h.client.put("/doc", content=body)
        assert r.status_code == 200
        assert [q.body for q in up.requests] == [body] * 3


async def test_streamed_body_sent_exactly_once(tmp_path: Path, autojump_clock: MockClock) -> None:
    up = FakeUpstream(handler=Timed(FakeResponse(503)))
    async with open_harness(tmp_path, upstream=up, plugins=retry(attempts=3)) as h:
        r = await h.client.put(
            "/doc",
            content=chunked([b"a" * 10, b"b" * 10]),
            headers={"Idempotency-Key": "k"},
        )
        upstream_answer(r, 503)
        assert len(up.requests) == 1
        assert up.requests[0].body == b"a" * 10 + b"b" * 10


# ---- retry: budget ------------------------------------------------------------------------------


async def test_no_budget_no_retries(tmp_path: Path, autojump_clock: MockClock) -> None:
    up = FakeUpstream(handler=Timed(FakeResponse(503), FakeResponse(503)))
    cfg = retry(attempts=3, budget_ratio=0, budget_min_retries=0)
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        r = await h.client.get("/r")
        upstream_answer(r, 503)
        assert len(up.requests) == 1
        assert plugin(h, "retry").retries == 0


async def test_budget_allows_one_retry_in_flight(tmp_path: Path, autojump_clock: MockClock) -> None:
    handler = Timed(*[FakeResponse(503, delay=0.1)] * 3)
    up = FakeUpstream(handler=handler)
    cfg = retry(
        attempts=3,
        backoff_base_seconds=1,
        backoff_cap_seconds=1,
        budget_ratio=0,
        budget_min_retries=1,
    )
    async with open_harness(tmp_path, upstream=up, plugins=cfg) as h:
        pin_jitter(h, 0.5)
        statuses: list[int] = []
        peak = 0

        async def one() -> None:
            r = await h.client.get("/r")
            statuses.append(r.status_code)

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, upstream_of(h).retries_in_flight)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as requests:
                for _ in range(3):
                    requests.start_soon(one)
            nursery.cancel_scope.cancel()
        # The three first tries fail together; one retry gets the budget,
        # the other two answer the upstream's 503 at once.
        assert sorted(statuses) == [200, 503, 503]
        assert len(up.requests) == 4
        assert peak == 1
        assert upstream_of(h).retries_in_flight == 0
        assert handler.times[3] - handler.times[0] == pytest.approx(0.6, abs=1e-9)
        # The budget is about retries in flight: with none running, one may go.
        handler.answers.extend([FakeResponse(503)])
        r = await h.client.get("/r")
        assert r.status_code == 200
        assert len(up.requests) == 6


# ---- circuit breaker ----------------------------------------------------------------------------


async def test_breaker_opens_and_answers_at_once_without_the_upstream(tmp_path: Path) -> None:
    # Real time here: the answer must come in under 100 ms, measured.
    switch = Switch(500)
    up = FakeUpstream(handler=switch)
    cb = breaker_cfg(failure_threshold=3, open_seconds=10)
    async with open_harness(tmp_path, upstream=up, plugins={"circuit-breaker": cb}) as h:
        for _ in range(3):
            upstream_answer(await h.client.get("/r"), 500)
        assert len(switch.traffic) == 3
        assert breaker(h).state.value == "open"
        for _ in range(5):
            started = time.perf_counter()
            r = await h.client.get("/r")
            elapsed = time.perf_counter() - started
            body = assert_problem(r, 503, "UPSTREAM_UNAVAILABLE")
            assert elapsed < 0.1, elapsed
            assert "detail" in body
            retry_after = int(r.headers["retry-after"])
            assert 9 <= retry_after <= 10
        assert len(switch.traffic) == 3
        assert len(up.requests) == 3


async def test_breaker_retry_after_counts_down(tmp_path: Path, autojump_clock: MockClock) -> None:
    switch = Switch(500)
    up = FakeUpstream(handler=switch)
    cb = breaker_cfg(failure_threshold=1, open_seconds=10)
    async with open_harness(tmp_path, upstream=up, plugins={"circuit-breaker": cb}) as h:
        upstream_answer(await h.client.get("/r"), 500)
        opened_at = breaker(h).open_until - 10
        for at, expected in [(0, "10"), (3.5, "7"), (9.0, "1"), (9.99, "1")]:
            await trio.sleep_until(opened_at + at)
            r = await h.client.get("/r")
            assert_problem(r, 503, "UPSTREAM_UNAVAILABLE")
            assert r.headers["retry-after"] == expected
        assert len(switch.traffic) == 1


async def test_half_open_probe_closes_on_success(tmp_path: Path, autojump_clock: MockClock) -> None:
    switch = Switch(500)
    up = FakeUpstream(handler=switch)
    cb = breaker_cfg(failure_threshold=2, open_seconds=0.3)
    async with open_harness(tmp_path, upstream=up, plugins={"circuit-breaker": cb}) as h:
        for _ in range(2):
            upstream_answer(await h.client.get("/r"), 500)
        b = breaker(h)
        until = b.open_until
        assert b.state.value == "open"
        switch.status = 200
        await trio.sleep_until(until - 0.001)
        assert_problem(await h.client.get("/r"), 503, "UPSTREAM_UNAVAILABLE")
        assert len(switch.traffic) == 2
        await trio.sleep_until(until)
        r = await h.client.get("/r")  # the probe
        assert r.status_code == 200
        assert r.content == b"from upstream"
        assert b.state.value == "closed"
        for _ in range(3):
            assert (await h.client.get("/r")).status_code == 200
        assert len(switch.traffic) == 6


async def test_failed_probe_reopens_with_growth(tmp_path: Path, autojump_clock: MockClock) -> None:
    switch = Switch(500)
    up = FakeUpstream(handler=switch)
    cb = breaker_cfg(failure_threshold=1, open_seconds=0.3, growth=2, max_open_seconds=1.0)
    async with open_harness(tmp_path, upstream=up, plugins={"circuit-breaker": cb}) as h:
        upstream_answer(await h.client.get("/r"), 500)
        b = breaker(h)
        periods = [b.open_until - trio.current_time()]
        for _ in range(3):
            until = b.open_until
            await trio.sleep_until(until - 0.001)
            assert_problem(await h.client.get("/r"), 503, "UPSTREAM_UNAVAILABLE")
            await trio.sleep_until(until)
            upstream_answer(await h.client.get("/r"), 500)  # the probe fails
            assert b.state.value == "open"
            periods.append(b.open_until - trio.current_time())
        assert periods == pytest.approx([0.3, 0.6, 1.0, 1.0], abs=1e-9)
        assert len(switch.traffic) == 4
        # A successful probe closes it and resets the open period.
        switch.status = 200
        await trio.sleep_until(b.open_until)
        assert (await h.client.get("/r")).status_code == 200
        assert b.state.value == "closed"
        switch.status = 500
        upstream_answer(await h.client.get("/r"), 500)
        assert b.open_until - trio.current_time() == pytest.approx(0.3, abs=1e-9)


async def test_half_open_lets_a_bounded_number_of_probes_through(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    switch = Switch(500)
    up = FakeUpstream(handler=switch)
    cb = breaker_cfg(failure_threshold=1, open_seconds=0.3, half_open_probes=2, success_threshold=2)
    async with open_harness(tmp_path, upstream=up, plugins={"circuit-breaker": cb}) as h:
        upstream_answer(await h.client.get("/r"), 500)
        b = breaker(h)
        switch.status, switch.delay = 200, 1.0
        await trio.sleep_until(b.open_until)
        t0 = trio.current_time()
        results: list[tuple[float, int]] = []

        async def one() -> None:
            r = await h.client.get("/r")
            results.append((trio.current_time() - t0, r.status_code))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
        # two probes reach the upstream (and take its 1 s); the others are
        # refused at once
        results.sort()
        assert [status for _, status in results] == [503, 503, 200, 200]
        assert [at for at, _ in results] == pytest.approx([0, 0, 1, 1], abs=1e-9)
        assert len(switch.traffic) == 3
        assert b.state.value == "closed"


async def test_open_target_is_skipped_by_the_balancer(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    a, b = Switch(500), Switch(200)
    up_a, up_b = FakeUpstream(handler=a), FakeUpstream(handler=b)
    cb = breaker_cfg(failure_threshold=1, open_seconds=10)
    async with (
        serving(up_a, up_b),
        open_harness(
            tmp_path,
            upstream=up_a,
            plugins={"circuit-breaker": cb},
            upstream_settings={"targets": [up_a.url, up_b.url]},
        ) as h,
    ):
        upstream_answer(await h.client.get("/r"), 500)  # round robin: a first
        assert breaker(h, 0).state.value == "open"
        for _ in range(6):
            assert (await h.client.get("/r")).status_code == 200
        assert (len(a.traffic), len(b.traffic)) == (1, 6)
        # Now b fails too: every target is open -> 503 from the gateway.
        await trio.sleep(4)
        b.status = 500
        upstream_answer(await h.client.get("/r"), 500)
        assert breaker(h, 1).state.value == "open"
        r = await h.client.get("/r")
        assert_problem(r, 503, "UPSTREAM_UNAVAILABLE")
        assert r.headers["retry-after"] == "6"  # the soonest target: a, 6 s left
        assert (len(a.traffic), len(b.traffic)) == (1, 7)
        # a comes back first (half-open), its probe succeeds
        a.status = 200
        await trio.sleep(6)
        assert (await h.client.get("/r")).status_code == 200
        assert (len(a.traffic), len(b.traffic)) == (2, 7)


async def test_retry_and_breaker_together(tmp_path: Path, autojump_clock: MockClock) -> None:
    a, b = Switch(503), Switch(200)
    up_a, up_b = FakeUpstream(handler=a), FakeUpstream(handler=b)
    async with (
        serving(up_a, up_b),
        open_harness(
            tmp_path,
            upstream=up_a,
            plugins={
                "retry": {"attempts": 3},
                "circuit-breaker": breaker_cfg(failure_threshold=1, open_seconds=30),
            },
            upstream_settings={"targets": [up_a.url, up_b.url]},
        ) as h,
    ):
        for _ in range(4):
            r = await h.client.get("/r")
            assert r.status_code == 200
        assert (len(a.traffic), len(b.traffic)) == (1, 4)
        assert breaker(h, 0).state.value == "open"


async def test_retrying_stops_when_the_last_target_opens(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    up = FakeUpstream(handler=Timed(then=FakeResponse(503, body=b"down")))
    async with open_harness(
        tmp_path,
        upstream=up,
        plugins={
            "retry": {"attempts": 5},
            "circuit-breaker": breaker_cfg(failure_threshold=2, open_seconds=30),
        },
    ) as h:
        r = await h.client.get("/r")
        # try 1 and try 2 fail and open the breaker; try 3 finds no target
        r_body = assert_problem(r, 503, "UPSTREAM_UNAVAILABLE")
        assert "detail" in r_body
        assert r.headers["retry-after"] == "30"
        assert len(up.requests) == 2
        assert upstream_of(h).retries_in_flight == 0


async def test_error_rate_opens_the_breaker(tmp_path: Path, autojump_clock: MockClock) -> None:
    handler = Timed(
        *[FakeResponse(s) for s in (200, 500, 200, 500, 200, 500)],
        then=FakeResponse(200),
    )
    up = FakeUpstream(handler=handler)
    cb = {
        "failure_threshold": 100,
        "error_rate_threshold": 0.5,
        "minimum_requests": 6,
        "window_seconds": 10,
    }
    async with open_harness(tmp_path, upstream=up, plugins={"circuit-breaker": cb}) as h:
        statuses = [(await h.client.get("/r")).status_code for _ in range(6)]
        assert statuses == [200, 500, 200, 500, 200, 500]
        # 3 of 6 failed: open
        assert_problem(await h.client.get("/r"), 503, "UPSTREAM_UNAVAILABLE")
        assert len(up.requests) == 6


@pytest.mark.parametrize(
    ("cb", "answer", "opens"),
    [
        ({}, FakeResponse(500), True),
        ({}, FakeResponse(502), True),
        ({}, FakeResponse(503), True),
        ({}, FakeResponse(404), False),
        ({}, FakeResponse(429), False),
        ({"failure_statuses": [503]}, FakeResponse(503), True),
        ({"failure_statuses": [503]}, FakeResponse(500), False),
        ({"failure_statuses": [429, 503]}, FakeResponse(429), True),
        ({}, FakeResponse(drop=True), True),
        ({"count_transport_errors": False}, FakeResponse(drop=True), False),
        ({}, FakeResponse(200, delay=30), True),
        ({"count_timeouts": False}, FakeResponse(200, delay=30), False),
    ],
    ids=[
        "500",
        "502",
        "503",
        "404",
        "429",
        "503-listed",
        "500-not-listed",
        "429-listed",
        "reset",
        "reset-not-counted",
        "timeout",
        "timeout-not-counted",
    ],
)
async def test_what_counts_as_failure(
    tmp_path: Path, autojump_clock: MockClock, cb: dict[str, Any], answer: FakeResponse, opens: bool
) -> None:
    up = FakeUpstream(handler=Timed(then=answer))
    cfg = breaker_cfg(failure_threshold=3, open_seconds=30, **cb)
    async with open_harness(
        tmp_path,
        upstream=up,
        plugins={"circuit-breaker": cfg},
        upstream_settings={"read_timeout_seconds": 0.2},
    ) as h:
        for _ in range(3):
            r = await h.client.get("/r")
            assert r.status_code in (answer.status, 502, 504)
        assert len(up.requests) == 3
        r = await h.client.get("/r")
        if opens:
            assert_problem(r, 503, "UPSTREAM_UNAVAILABLE")
            assert len(up.requests) == 3
        else:
            assert len(up.requests) == 4
            assert breaker(h).state.value == "closed"


async def test_get_upstreams_shows_breaker_states(tmp_path: Path) -> None:
    # Real time: the admin API commits to LMDB in a worker thread, and the
    # virtual clock would race ahead while it waits for it.
    a, b = Switch(500), Switch(200)
    up_a, up_b = FakeUpstream(handler=a), FakeUpstream(handler=b)
    async with (
        serving(up_a, up_b),
        open_harness(
            tmp_path,
            upstream=up_a,
            plugins={"circuit-breaker": breaker_cfg(failure_threshold=1, open_seconds=0.5)},
            upstream_settings={"targets": [up_a.url, up_b.url]},
        ) as h,
    ):
        admin = await setup_admin(h)
        assert (await h.admin.get("/upstreams")).status_code == 401
        upstream_answer(await h.client.get("/r"), 500)
        assert (await h.client.get("/r")).status_code == 200
        r = await h.admin.get("/upstreams", headers=admin)
        assert r.status_code == 200, r.text
        [item] = r.json()["items"]
        assert item["name"] == "test"
        assert item["balance"] == "round_robin"
        assert item["in_flight"] == 0
        assert item["retries_in_flight"] == 0
        ta, tb = item["targets"]
        assert (ta["target"], tb["target"]) == (up_a.url, up_b.url)
        assert ta["healthy"] is tb["healthy"] is True
        assert ta["breaker"]["state"] == "open"
        assert ta["breaker"]["opened"] == 1
        assert ta["breaker"]["open_seconds"] == 0.5
        assert ta["breaker"]["open_until"] == pytest.approx(breaker(h, 0).open_until)
        assert ta["breaker"]["probes_in_flight"] == 0
        assert tb["breaker"]["state"] == "closed"
        assert tb["breaker"]["open_until"] is None
        assert tb["breaker"]["window_requests"] == 1
        assert tb["breaker"]["window_failures"] == 0
        assert tb["breaker"]["consecutive_failures"] == 0
        # After the open period the snapshot shows half-open.
        await trio.sleep_until(breaker(h, 0).open_until)
        r = await h.admin.get("/upstreams", headers=admin)
        assert r.json()["items"][0]["targets"][0]["breaker"]["state"] == "half_open"


async def test_get_upstreams_without_breaker(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        admin = await setup_admin(h)
        r = await h.admin.get("/upstreams", headers=admin)
        assert r.status_code == 200, r.text
        [target] = r.json()["items"][0]["targets"]
        assert target["breaker"] is None
        assert target["healthy"] is True


# ---- active health checks -----------------------------------------------------------------------


async def test_active_health_checks_take_a_target_out_and_back(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    a, b = Switch(200, health=500), Switch(200)
    up_a, up_b = FakeUpstream(handler=a), FakeUpstream(handler=b)
    check = {
        "path": "/health",
        "interval_seconds": 0.1,
        "timeout_seconds": 0.05,
        "unhealthy_threshold": 3,
        "healthy_threshold": 2,
    }
    async with (
        serving(up_a, up_b),
        open_harness(
            tmp_path,
            upstream=up_a,
            upstream_settings={"targets": [up_a.url, up_b.url], "health_check": check},
        ) as h,
    ):
        pool_a, pool_b = pools(h)
        await until(lambda: not pool_a.healthy)
        # out after exactly unhealthy_threshold failed probes in a row
        assert [status for _, status in a.health_probes] == [500, 500, 500]
        assert a.health_probes[-1][0] - a.health_probes[0][0] == pytest.approx(0.2, abs=1e-6)
        assert pool_b.healthy
        healthy = [t.healthy for t in upstream_of(h).statistics().targets]
        assert healthy == [False, True]
        before = len(a.traffic)
        for _ in range(6):
            assert (await h.client.get("/r")).status_code == 200
        assert len(a.traffic) == before
        assert len(b.traffic) >= 6
        # It recovers: back in after healthy_threshold good probes.
        a.health = 200
        recovered_from = len(a.health_probes)
        await until(lambda: pool_a.healthy)
        assert [s for _, s in a.health_probes[recovered_from:]] == [200, 200]
        for _ in range(6):
            assert (await h.client.get("/r")).status_code == 200
        assert len(a.traffic) == before + 3  # round robin again


async def test_get_upstreams_shows_health(tmp_path: Path) -> None:
    # Real time (admin API: see test_get_upstreams_shows_breaker_states).
    a, b = Switch(200, health=500), Switch(200)
    up_a, up_b = FakeUpstream(handler=a), FakeUpstream(handler=b)
    check = {"interval_seconds": 0.05, "unhealthy_threshold": 1}
    async with (
        serving(up_a, up_b),
        open_harness(
            tmp_path,
            upstream=up_a,
            upstream_settings={"targets": [up_a.url, up_b.url], "health_check": check},
        ) as h,
    ):
        admin = await setup_admin(h)
        with trio.fail_after(5):
            while True:
                r = await h.admin.get("/upstreams", headers=admin)
                assert r.status_code == 200, r.text
                targets = r.json()["items"][0]["targets"]
                if not targets[0]["healthy"]:
                    break
                await trio.sleep(0.02)
        assert targets[1]["healthy"] is True
        assert targets[0]["breaker"] is None


async def test_every_target_unhealthy_gives_503(tmp_path: Path, autojump_clock: MockClock) -> None:
    a = Switch(200, health=503)
    up = FakeUpstream(handler=a)
    check = {"interval_seconds": 0.1, "unhealthy_threshold": 1, "healthy_threshold": 1}
    async with open_harness(tmp_path, upstream=up, upstream_settings={"health_check": check}) as h:
        await until(lambda: not pools(h)[0].healthy)
        r = await h.client.get("/r")
        assert_problem(r, 503, "UPSTREAM_UNAVAILABLE")
        assert int(r.headers["retry-after"]) >= 1
        assert a.traffic == []


async def test_health_check_timeout_counts_as_failure(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    slow = FakeUpstream(handler=Timed(then=FakeResponse(200, delay=10)))
    check = {"interval_seconds": 0.1, "timeout_seconds": 0.2, "unhealthy_threshold": 2}
    async with open_harness(
        tmp_path, upstream=slow, upstream_settings={"health_check": check}
    ) as h:
        t0 = trio.current_time()
        await until(lambda: not pools(h)[0].healthy)
        # two probes of 0.2 s each, 0.1 s apart
        assert trio.current_time() - t0 == pytest.approx(0.5, abs=0.011)


# ---- configuration errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "path", "words"),
    [
        ({"plugins": {"retry": {"attempts": 0}}}, "routes[0].plugins.retry.attempts", ">= 1"),
        (
            {"plugins": {"retry": {"backoff_base_seconds": 3, "backoff_cap_seconds": 1}}},
            "routes[0].plugins.retry",
            "backoff_base_seconds",
        ),
        (
            {"plugins": {"retry": {"per_try_timeout_seconds": 0}}},
            "routes[0].plugins.retry.per_try_timeout_seconds",
            "> 0",
        ),
        (
            {"plugins": {"retry": {"budget_ratio": -1}}},
            "routes[0].plugins.retry.budget_ratio",
            ">= 0",
        ),
        (
            {"plugins": {"retry": {"attempts": 2, "tries": 3}}},
            "routes[0].plugins.retry.tries",
            "unknown",
        ),
        (
            {"plugins": {"circuit-breaker": {"open_seconds": 10, "max_open_seconds": 5}}},
            "routes[0].plugins.circuit-breaker",
            "max_open_seconds",
        ),
        (
            {"plugins": {"circuit-breaker": {"failure_threshold": 0}}},
            "routes[0].plugins.circuit-breaker.failure_threshold",
            ">= 1",
        ),
        (
            {"plugins": {"circuit-breaker": {"error_rate_threshold": 1.5}}},
            "routes[0].plugins.circuit-breaker.error_rate_threshold",
            "<= 1",
        ),
        (
            {"plugins": {"circuit-breaker": {"half_open_probes": 0}}},
            "routes[0].plugins.circuit-breaker.half_open_probes",
            ">= 1",
        ),
        (
            {"upstream_settings": {"health_check": {"interval_seconds": 0}}},
            "upstreams.test.health_check.interval_seconds",
            ">= 0.001",
        ),
    ],
)
async def test_config_errors_stop_start_up(
    tmp_path: Path, kw: dict[str, Any], path: str, words: str
) -> None:
    err = await refused_config(tmp_path, **kw)
    paths = [e.path for e in err.errors]
    assert path in paths, err.lines()
    [line] = [e for e in err.errors if e.path == path]
    assert words in line.message, line
