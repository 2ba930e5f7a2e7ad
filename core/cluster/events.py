"""Data-plane events once per cluster: the claims a node makes in Redis
before it writes an event to its own outbox.

Theory of operation
-------------------
Every node keeps its LMDB outbox and delivers what it wrote (at least once,
with the event's stable ``id`` for receivers to deduplicate). What must not
happen is two nodes *writing* the same event. Per event type:

* key changes (``key.created`` ... ``key.disabled``) are admin writes, made
  on one node; their event is a local part of that write, applied on that
  node only (``cluster.replica.apply_own``);
* ``key.expired`` is written with the key's status change (``active`` to
  ``expired``), a record write: on a cluster node it goes through Redis
  (``ClusterStore``), which accepts one node's change and makes the others
  run again on a replica that already has it, where the key is no longer
  ``active``: written once;
* ``credits.low`` comes from a balance's decision, made in Redis one at a
  time (``lua.DECIDE``): exactly one decision crosses a threshold;
* ``rate_limit.exceeded`` (at most one per key per ``MARK_SECONDS``) is the
  one every node would see: here each node *claims* it in Redis first
  (``SET NX PX``: ``{NS}:em:<type>:<key id>``) and writes it only if the
  claim was its own.

While Redis is unreachable a claim raises ``ClaimsUnavailable``; the events
wait in the node's queue (bounded) and are claimed once Redis answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import trio
from coredis.tokens import PureToken

from triogate.cluster.decide import DEFAULT_NAMESPACE
from triogate.cluster.redis import REDIS_ERRORS, RedisLink

__all__ = ["ClaimsUnavailable", "EventClaims", "claim_key"]

#: Claims sent in one pipeline at most.
CLAIMS_PER_PIPELINE: Final = 256


class ClaimsUnavailable(Exception):
    """Redis did not answer: nothing was claimed (or not known to be)."""


def claim_key(ns: str, event_type: str, subject: str) -> str:
    return f"{{{ns}}}:em:{event_type}:{subject}"


class EventClaims:
    """Claims of events in Redis (module doc)."""

    def __init__(self, link: RedisLink, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.link = link
        self.namespace = namespace
        self.claimed = 0
        self.lost = 0

    def __repr__(self) -> str:
        return f"<EventClaims claimed={self.claimed} lost={self.lost}>"

    async def claim(self, claims: Sequence[tuple[str, str, float, str]]) -> list[bool]:
        """For each (event type, subject, seconds the claim lasts, token):
        whether this node holds it (the first in the cluster within that
        time). The token names the event: claimed again after an answer
        was lost, an event whose claim did arrive is still this node's.
        ``ClaimsUnavailable`` when Redis does not answer: then claim again
        later."""
        if not claims:
            return []
        if not self.link.reachable:
            raise ClaimsUnavailable("the cluster's Redis is unreachable")
        timeout = max(self.link.config.command_timeout_seconds * 4, 1.0)
        out: list[bool] = []
        try:
            with trio.fail_after(timeout):
                for start in range(0, len(claims), CLAIMS_PER_PIPELINE):
                    out += await self._pipeline(claims[start : start + CLAIMS_PER_PIPELINE])
        except REDIS_ERRORS as exc:
            self.link.failed(exc)
            raise ClaimsUnavailable(f"{type(exc).__name__}: {exc}") from None
        made = sum(out)
        self.claimed += made
        self.lost += len(out) - made
        return out

    async def _pipeline(self, claims: Sequence[tuple[str, str, float, str]]) -> list[bool]:
        client = self.link.client
        async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
            pending = []
            for event_type, subject, seconds, token in claims:
                key = claim_key(self.namespace, event_type, subject)
                made = pipe.set(
                    key, token.encode(), condition=PureToken.NX, px=max(1, int(seconds * 1000))
                )
                pending.append((made, pipe.get(key), token.encode()))
        # SET NX, then the holder's token: this node's if it set it now or
        # an earlier attempt of the same event did (any Redis version).
        return [bool(await made) or (await holder) == token for made, holder, token in pending]
