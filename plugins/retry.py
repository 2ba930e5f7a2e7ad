"""``retry``: try an upstream request again when that is safe and useful.

Retried: a connection that could not be made, was reset, or closed before
any byte of the answer (502 ``BAD_GATEWAY`` from the upstream client), a
timeout (504), and the configured statuses (default 502, 503, 504). Only for
idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE) or a request with an
``Idempotency-Key`` header, and only if the body can be sent again: bodies
up to ``max_replay_bytes`` are kept for that; a longer or streamed body
means no retry. ``attempts`` counts every try, the first included.

Between tries: exponential back-off with full jitter, capped, or the
upstream's ``Retry-After`` when it is within the cap. Each try may have its
own timeout and all of them an overall deadline. A retry budget per upstream
(retries in flight at most ``budget_ratio`` of the requests in flight, but
always ``budget_min_retries``) keeps retries from multiplying the load on an
upstream that is already failing. A retry goes to another target when the
upstream has one that was not tried yet.

However many tries it takes, a request is charged once: its credits and
limits were taken in the access phase, before the first try, and once any
try has sent a byte (``ctx.sent_upstream``) nothing is given back.
"""

from __future__ import annotations

import math
import random
import time
from typing import Annotated

import msgspec
import trio
from msgspec import Meta

from triogate.errors import BadGateway, UpstreamTimeout
from triogate.http import Response, body_from_bytes
from triogate.plugins.contract import CallNext, Context, Plugin, PluginEnv
from triogate.policy.retry_policy import IDEMPOTENT, backoff, may_retry, retry_after

__all__ = ["Retry"]


class RetryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    attempts: Annotated[int, Meta(ge=1, le=20, description="tries in all, the first included")] = 3
    statuses: Annotated[
        list[Annotated[int, Meta(ge=100, le=599)]],
        Meta(description="upstream statuses worth another try"),
    ] = msgspec.field(default_factory=lambda: [502, 503, 504])
    methods: Annotated[
        list[Annotated[str, Meta(pattern=r"^[A-Z]{1,16}$")]],
        Meta(description="methods retried without an Idempotency-Key"),
    ] = msgspec.field(default_factory=lambda: sorted(IDEMPOTENT - {"TRACE"}))
    backoff_base_seconds: Annotated[
        float, Meta(ge=0, le=60, description="first back-off ceiling; doubles per retry")
    ] = 0.05
    backoff_cap_seconds: Annotated[
        float, Meta(ge=0, le=600, description="largest back-off, and largest Retry-After honoured")
    ] = 2.0
    respect_retry_after: Annotated[
        bool,
        Meta(
            description=(
                "wait as long as the upstream's Retry-After says, within the cap; "
                "a longer one ends retrying"
            )
        ),
    ] = True
    per_try_timeout_seconds: Annotated[
        Annotated[float, Meta(gt=0, le=3600)] | None,
        Meta(description="a try slower than this is a timeout (504); none: the upstream's"),
    ] = None
    overall_timeout_seconds: Annotated[
        Annotated[float, Meta(gt=0, le=3600)] | None,
        Meta(description="deadline for all tries and waits together; none: no deadline"),
    ] = None
    max_replay_bytes: Annotated[
        int, Meta(ge=0, le=64 << 20, description="request bodies kept for replay, at most")
    ] = 65536
    budget_ratio: Annotated[
        float, Meta(ge=0, le=10, description="retries in flight per request in flight, at most")
    ] = 0.2
    budget_min_retries: Annotated[
        int,
        Meta(ge=0, le=10_000, description="retries always allowed in flight, whatever the ratio"),
    ] = 3

    def __post_init__(self) -> None:
        if self.backoff_base_seconds > self.backoff_cap_seconds:
            raise ValueError("backoff_base_seconds must not exceed backoff_cap_seconds")


class Retry(Plugin[RetryConfig]):
    name = "retry"
    priority = 600
    Config = RetryConfig

    def __init__(self, config: RetryConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        self.methods = frozenset(config.methods)
        self.statuses = frozenset(config.statuses)
        self.random = random.Random()  # tests may seed or replace it
        self.retries = 0  # statistics: retries made

    async def upstream(self, ctx: Context, call_next: CallNext) -> Response:
        cfg = self.config
        request = ctx.request
        if cfg.attempts == 1 or not may_retry(
            request.method, request.headers.get_raw(b"idempotency-key") is not None, self.methods
        ):
            return await call_next()
        replay: bytes | None = None
        if request.body.length != 0:
            if request.body.length is None or request.body.length > cfg.max_replay_bytes:
                return await call_next()  # streamed or too long to send twice
            replay = await request.body.read(cfg.max_replay_bytes)
        upstream = ctx.upstream
        if ctx.tried_targets is None:
            ctx.tried_targets = set()  # each retry prefers a target not tried yet
        deadline = (
            trio.current_time() + cfg.overall_timeout_seconds
            if cfg.overall_timeout_seconds is not None
            else math.inf
        )
        if replay is not None:
            request.body = body_from_bytes(replay)
        attempt = 1
        response, error = await self._try(call_next, deadline)
        while True:
            if response is not None and response.status not in self.statuses:
                return response
            if attempt >= cfg.attempts or upstream is None:
                return self._give_up(response, error)
            delay = self._delay(attempt, response)
            if delay is None or trio.current_time() + delay >= deadline:
                return self._give_up(response, error)
            if not upstream.begin_retry(cfg.budget_ratio, cfg.budget_min_retries):
                return self._give_up(response, error)  # the budget is spent
            try:
                if response is not None and response.body is not None:
                    await response.body.aclose()
                await trio.sleep(delay)
                attempt += 1
                self.retries += 1
                ctx.retries = attempt - 1
                if replay is not None:
                    request.body = body_from_bytes(replay)
                response, error = await self._try(call_next, deadline)
            finally:
                upstream.end_retry()

    async def _try(
        self, call_next: CallNext, deadline: float
    ) -> tuple[Response | None, BadGateway | UpstreamTimeout | None]:
        cfg = self.config
        until = deadline
        if cfg.per_try_timeout_seconds is not None:
            until = min(until, trio.current_time() + cfg.per_try_timeout_seconds)
        try:
            with trio.move_on_at(until) as scope:
                response = await call_next()
            if scope.cancelled_caught:
                return None, UpstreamTimeout("the upstream did not answer within the try's time")
            return response, None
        except (BadGateway, UpstreamTimeout) as exc:
            return None, exc

    def _delay(self, attempt: int, response: Response | None) -> float | None:
        """Seconds to wait before the next try; None: do not retry (the
        upstream asked for a longer pause than the cap allows)."""
        cfg = self.config
        if cfg.respect_retry_after and response is not None:
            header = response.headers.get_raw(b"retry-after")
            asked = retry_after(header, cfg.backoff_cap_seconds, time.time())
            if asked is not None:
                return asked
            if header is not None and retry_after(header, math.inf, time.time()) is not None:
                return None  # a valid Retry-After beyond the cap: respect it, give up
        draw = self.random.random()
        return backoff(attempt, cfg.backoff_base_seconds, cfg.backoff_cap_seconds, draw)

    @staticmethod
    def _give_up(response: Response | None, error: Exception | None) -> Response:
        if response is not None:
            return response
        assert error is not None
        raise error
