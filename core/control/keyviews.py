"""Reading API keys: the records as the admin API shows them (owner and
metadata unsealed, credits with the live balance, the customer fields and
the ``effective`` block), listing with cursor paging, and usage.

``KeyReads`` is the read half of ``keys.KeyService`` (which adds
validation and the mutations): one object, two modules, so neither grows
past what one can read.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec

from triogate.control.crypto import ServerSecrets
from triogate.control.ids import is_valid_id
from triogate.control.keychain import LiveBalance, live_credits, usage_and_state
from triogate.control.keyfields import key_effective
from triogate.control.keyformat import Keyspaces
from triogate.control.keyrules import effective_status
from triogate.control.membership import members
from triogate.control.models import KeyPage, KeyView, UsageView
from triogate.control.paging import decode_cursor, take_page
from triogate.control.timeutil import Clock, system_clock, utc, utc_required
from triogate.errors import NotFound, ValidationError
from triogate.storage import KeyRecord, ReadTxn, Store, Table, codec

__all__ = ["OWNER_TAG", "KeyReads"]

_sealed_encoder = msgspec.msgpack.Encoder()
_sealed_decoder = msgspec.msgpack.Decoder(tuple[str, dict[str, Any] | None])
OWNER_TAG = "owner"


class KeyReads:
    def __init__(
        self,
        store: Store,
        secrets: ServerSecrets,
        *,
        prefix: str = "tg_",
        clock: Clock = system_clock,
    ) -> None:
        self._store = store
        self._secrets = secrets
        self._clock = clock
        self.format = Keyspaces.single(prefix)  # the gateway sets every keyspace's
        # The actors' in-memory balances (set by the gateway that runs
        # them): views show the balance being spent, not the last flush.
        self.live_balance: LiveBalance | None = None

    # ---- sealing ----------------------------------------------------------

    def _seal(self, key_id: str, owner: str, metadata: dict[str, Any] | None) -> bytes:
        return self._secrets.sealer.seal(_sealed_encoder.encode((owner, metadata)), key_id.encode())

    def _unseal(self, record: KeyRecord) -> tuple[str, dict[str, Any] | None]:
        owner, metadata = _sealed_decoder.decode(
            self._secrets.sealer.open(record.sealed, record.id.encode())
        )
        return owner, metadata

    # ---- reading ----------------------------------------------------------

    @staticmethod
    def _load(txn: ReadTxn, key_id: str) -> KeyRecord:
        if not is_valid_id(key_id, "key"):
            raise ValidationError.single("id", "not a key id")
        raw = txn.get(Table.KEYS, key_id.encode())
        if raw is None:
            raise NotFound(f"no key {key_id}")
        return codec.key.decode(raw)

    def _view(self, record: KeyRecord, txn: ReadTxn, now: float) -> KeyView:
        owner, metadata = self._unseal(record)
        usage, state = usage_and_state(txn, record)
        return KeyView(
            id=record.id,
            name=record.name,
            owner=owner,
            start=record.start,
            scopes=list(record.scopes),
            status=effective_status(record, now),  # type: ignore[arg-type]
            created_at=utc_required(record.created_at),
            updated_at=utc_required(record.updated_at),
            expires_at=utc(record.expires_at),
            revoked_at=utc(record.revoked_at),
            rotated_to=record.rotated_to,
            rotated_from=record.rotated_from,
            grace_ends_at=utc(record.grace_ends_at),
            last_used_at=utc(usage.last_used_at),
            metadata=metadata,
            rate_limits=list(record.rate_limits),
            credits=live_credits(record, state, self.live_balance),
            identity_id=record.identity_id,
            plan_id=record.plan_id,
            enabled=record.enabled,
            roles=list(record.roles),
            keyspace=record.keyspace,
            effective=key_effective(txn, record),
        )

    def get(self, key_id: str) -> KeyView:
        with self._store.read() as txn:
            return self._view(self._load(txn, key_id), txn, self._clock())

    def list(
        self,
        *,
        limit: int,
        cursor: str | None = None,
        owner: str | None = None,
        status: str | None = None,
        identity_id: str | None = None,
    ) -> KeyPage:
        """A page of keys, newest first; ``owner`` and ``identity_id`` go
        through their indexes (an identity's ten thousand keys are paged
        like any others), ``status`` filters what they give."""
        after = decode_cursor(cursor, "key")
        now = self._clock()

        keyring = self._secrets.hmac
        # With both, the identity's index is walked and the owner checked
        # per record, by its blind index (the owner itself is sealed).
        by_owner = owner if identity_id is not None else None

        def keep(r: KeyRecord) -> bool:
            if status is not None and effective_status(r, now) != status:
                return False
            return (
                by_owner is None
                or keyring.tag(OWNER_TAG, by_owner, r.owner_tag_version) == r.owner_tag
            )

        with self._store.read() as txn:
            ids: Iterable[bytes]
            if identity_id is not None:
                since = None if after is None else after.decode()
                ids = (
                    m.encode()
                    for m in members(
                        txn, Table.IDENTITY_KEYS, identity_id, after=since, reverse=True
                    )
                )
            elif owner is not None:
                ids = self._ids_by_owner(txn, owner, after)
            else:
                ids = (k for k, _ in txn.scan(Table.KEYS, after=after, reverse=True))
            rows = self._records(txn, ids)
            items, next_cursor = take_page(
                rows, limit=limit, keep=keep, view=lambda r: self._view(r, txn, now)
            )
        return KeyPage(items=items, next_cursor=next_cursor)

    def _ids_by_owner(self, txn: ReadTxn, owner: str, after: bytes | None) -> Iterator[bytes]:
        # One index prefix per HMAC version that may have tagged a record;
        # merged newest first (ids are time-ordered), each id once.
        streams = []
        for version in self._secrets.hmac.versions:
            tag = self._secrets.hmac.tag(OWNER_TAG, owner, version)
            scan = txn.scan(
                Table.KEY_OWNERS,
                prefix=tag,
                after=None if after is None else tag + after,
                reverse=True,
            )
            streams.append(k[len(tag) :] for k, _ in scan)
        previous = None
        for key_id in heapq.merge(*streams, reverse=True):
            if key_id != previous:
                yield key_id
            previous = key_id

    @staticmethod
    def _records(txn: ReadTxn, ids: Iterable[bytes]) -> Iterator[tuple[str, KeyRecord]]:
        for key_id in ids:
            raw = txn.get(Table.KEYS, key_id)
            if raw is not None:
                yield key_id.decode(), codec.key.decode(raw)

    def usage(self, key_id: str) -> UsageView:
        with self._store.read() as txn:
            record = self._load(txn, key_id)
            usage, state = usage_and_state(txn, record)
        classes = {f"{i + 1}xx": n for i, n in enumerate(usage.by_class)}
        credits = live_credits(record, state, self.live_balance)
        return UsageView(
            key_id=key_id,
            requests=usage.requests,
            last_used_at=utc(usage.last_used_at),
            by_status_class=classes,
            credits_remaining=None if credits is None else credits.remaining,
            rate_limits=list(record.rate_limits),
        )
