"""The API-key lifecycle: create, read, list, update, revoke, rotate, validate,
clean up.

Theory of operation
-------------------
A key is ``prefix + 256 random bits + checksum`` (``keyformat``). Its plaintext
exists only in the response that creates it: storage keeps an HMAC-SHA256
digest (indexed, for lookup), a short non-secret ``start`` hint, and the
sensitive fields (owner, metadata) sealed with AES-GCM. Listing by owner goes
through a keyed blind index of the owner, never the plaintext owner.

Validation (the hot path) is synchronous: checksum, digest, two LMDB gets,
one msgpack decode and the pure ``key_decision`` (a ``KeyVerdict`` or None);
no await, no lock, no write. A key found under an *older* HMAC version is
re-indexed by the async ``validate``; an unknown one may be made under a
version another process added: ``find_by_digest`` picks that up.

Every mutation is one storage write function that re-reads the record inside
the transaction, decides, writes the record, its indexes and the audit entry
together: a check-then-act race between two admins cannot happen.

A rotation moves nothing: the new key shares the old one's credit balance and
limiter state through a state key (``keychain``), during the grace and after.
"""

from __future__ import annotations

import contextlib
import heapq
import hmac
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

import msgspec
from msgspec import UNSET

from triogate.control import keychain
from triogate.control.audit import Actor, append_audit
from triogate.control.crypto import ServerSecrets
from triogate.control.ids import is_valid_id, new_id
from triogate.control.keychain import LiveBalance, live_credits, usage_and_state
from triogate.control.keyformat import KeyFormat
from triogate.control.keyrules import effective_status, find_by_digest, key_decision
from triogate.control.models import (
    CreatedKey,
    CreateKeyRequest,
    KeyPage,
    KeyView,
    RevokeResult,
    RotatedOld,
    RotateKeyRequest,
    RotateResult,
    UpdateKeyRequest,
    UsageView,
    ValidateResult,
)
from triogate.control.paging import decode_cursor, take_page
from triogate.control.permissions import scopes_missing
from triogate.control.timeutil import Clock, epoch, system_clock, utc, utc_required
from triogate.errors import Conflict, KeyVerdict, NotFound, StorageFull, ValidationError
from triogate.storage import KeyRecord, ReadTxn, Store, Table, WriteTxn, codec

__all__ = ["KeyService", "effective_status", "find_by_digest", "key_decision"]

_sealed_encoder = msgspec.msgpack.Encoder()
_sealed_decoder = msgspec.msgpack.Decoder(tuple[str, dict[str, Any] | None])
_OWNER_TAG = "owner"
_INVALID = KeyVerdict.INVALID_KEY


class KeyService:
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
        self.format = KeyFormat(prefix)
        # The actors' in-memory balances (set by the gateway that runs
        # them): views show the balance being spent, not the last flush.
        self.live_balance: LiveBalance | None = None

    def __repr__(self) -> str:
        return f"<KeyService {self.format!r} store={self._store!r}>"

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
    ) -> KeyPage:
        after = decode_cursor(cursor, "key")
        now = self._clock()

        def keep(r: KeyRecord) -> bool:
            return status is None or effective_status(r, now) == status

        with self._store.read() as txn:
            ids = (
                self._ids_by_owner(txn, owner, after)
                if owner is not None
                else (k for k, _ in txn.scan(Table.KEYS, after=after, reverse=True))
            )
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
            tag = self._secrets.hmac.tag(_OWNER_TAG, owner, version)
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

    # ---- validation (hot path) --------------------------------------------

    def lookup_nowait(self, plaintext: str) -> tuple[KeyRecord | None, bool]:
        """The key's record (None if malformed or unknown), and whether it was
        found under an older HMAC version and so wants re-indexing."""
        if not self.format.is_well_formed(plaintext):
            return None, False
        found = find_by_digest(self._store, self._secrets, plaintext, Table.KEY_DIGESTS, Table.KEYS)
        if found is None:
            return None, False
        keyring = self._secrets.hmac  # after the lookup: it may have refreshed it
        raw, digest, version = found
        record = codec.key.decode(raw)
        # The record's own digest decides, under the version it was made
        # with. An index entry under another version is one a re-index left
        # behind on purpose, for processes that do not know the newer
        # secret yet: HMAC's preimage resistance makes that hit as good.
        if version == record.digest_version and not hmac.compare_digest(record.digest, digest):
            return None, False
        return record, version != keyring.current and record.digest_version != keyring.current

    def validate_nowait(
        self, plaintext: str, required_scopes: Sequence[str] = ()
    ) -> tuple[KeyRecord | None, KeyVerdict | None, bool]:
        """(record, why it is refused or None, wants re-index). Reads only."""
        record, stale = self.lookup_nowait(plaintext)
        if record is None:
            return None, _INVALID, False
        return record, key_decision(record, self._clock(), required_scopes), stale

    async def validate(self, plaintext: str, required_scopes: Sequence[str] = ()) -> ValidateResult:
        record, verdict, stale = self.validate_nowait(plaintext, required_scopes)
        if record is None:
            return ValidateResult(valid=False, code=verdict)
        if stale:
            await self.reindex(plaintext, record.id)
        owner, _ = self._unseal(record)
        result = ValidateResult(
            valid=verdict is None,
            code=verdict,
            key_id=record.id,
            owner=owner,
            scopes=list(record.scopes),
            expires_at=utc(record.expires_at),
            grace_ends_at=utc(record.grace_ends_at),
        )
        if verdict is KeyVerdict.INSUFFICIENT_SCOPE:
            result.required_scopes = scopes_missing(record.scopes, required_scopes)
        return result

    async def reindex(self, plaintext: str, key_id: str) -> None:
        keyring = self._secrets.hmac
        new_digest = keyring.digest(plaintext)

        def fn(txn: WriteTxn) -> None:
            record = self._load(txn, key_id)
            if record.digest_version == keyring.current:
                return
            # The old entry stays: processes started before the rotation
            # still look the key up under the old secret.
            txn.put(Table.KEY_DIGESTS, new_digest, key_id.encode())
            updated = msgspec.structs.replace(
                record, digest=new_digest, digest_version=keyring.current
            )
            txn.put(Table.KEYS, key_id.encode(), codec.encode(updated))

        # A full store must not refuse a valid key: re-indexed at a later use.
        with contextlib.suppress(StorageFull):
            await self._store.write(fn)

    # ---- mutations --------------------------------------------------------

    def _new_record(
        self,
        *,
        plaintext: str,
        key_id: str,
        name: str,
        owner: str,
        metadata: dict[str, Any] | None,
        scopes: Iterable[str],
        now: float,
        expires_at: float | None,
        rate_limits: Iterable[Any],
        credits: Any,
        rotated_from: str | None = None,
    ) -> KeyRecord:
        keyring = self._secrets.hmac
        return KeyRecord(
            id=key_id,
            digest=keyring.digest(plaintext),
            digest_version=keyring.current,
            start=self.format.start(plaintext),
            name=name,
            sealed=self._seal(key_id, owner, metadata),
            owner_tag=keyring.tag(_OWNER_TAG, owner),
            owner_tag_version=keyring.current,
            scopes=tuple(dict.fromkeys(scopes)),
            status="active",
            created_at=now,
            updated_at=now,
            expires_at=expires_at,
            rotated_from=rotated_from,
            rate_limits=tuple(rate_limits),
            credits=credits,
            credits_set_at=now if credits is not None else None,
        )

    @staticmethod
    def _put_new(txn: WriteTxn, record: KeyRecord) -> None:
        kid = record.id.encode()
        txn.put(Table.KEYS, kid, codec.encode(record))
        txn.put(Table.KEY_DIGESTS, record.digest, kid)
        txn.put(Table.KEY_OWNERS, record.owner_tag + kid, b"")

    def _created(self, record: KeyRecord, plaintext: str, now: float) -> CreatedKey:
        with self._store.read() as txn:
            view = self._view(record, txn, now)
        return CreatedKey(**msgspec.structs.asdict(view), key=plaintext)

    async def create(self, req: CreateKeyRequest, actor: Actor) -> CreatedKey:
        now = self._clock()
        expires_at = epoch(req.expires_at)
        if expires_at is not None and expires_at <= now:
            raise ValidationError.single("expires_at", "must be in the future")
        plaintext = self.format.generate()
        record = self._new_record(
            plaintext=plaintext,
            key_id=new_id("key", now),
            name=req.name,
            owner=req.owner,
            metadata=req.metadata,
            scopes=req.scopes,
            now=now,
            expires_at=expires_at,
            rate_limits=req.rate_limits,
            credits=req.credits,
        )

        def fn(txn: WriteTxn) -> None:
            self._put_new(txn, record)
            append_audit(
                txn,
                actor=actor,
                action="key.create",
                target_id=record.id,
                now=now,
                details={"name": record.name, "scopes": list(record.scopes)},
            )

        await self._store.write(fn)
        return self._created(record, plaintext, now)

    async def update(self, key_id: str, req: UpdateKeyRequest, actor: Actor) -> KeyView:
        now = self._clock()
        changed = [f for f in req.__struct_fields__ if getattr(req, f) is not UNSET]
        if isinstance(req.expires_at, datetime) and req.expires_at.timestamp() <= now:
            raise ValidationError.single("expires_at", "must be in the future")

        def fn(txn: WriteTxn) -> KeyRecord:
            record = self._load(txn, key_id)
            changes: dict[str, Any] = {"updated_at": now}
            shared: dict[str, Any] = {}
            # Credits and limits govern the state a rotation chain shares:
            # set on one key of it, they are set on every key of it.
            members = (
                keychain.chain(txn, record)
                if req.credits is not UNSET or req.rate_limits is not UNSET
                else [record]
            )
            if req.name is not UNSET:
                changes["name"] = req.name
            if req.scopes is not UNSET:
                changes["scopes"] = tuple(dict.fromkeys(req.scopes))
            if req.expires_at is not UNSET:
                changes["expires_at"] = epoch(req.expires_at)
            if req.rate_limits is not UNSET:
                shared["rate_limits"] = tuple(req.rate_limits)
            if req.credits is not UNSET:
                # A new version makes every balance counted so far (by any
                # actor, in any process) stale: the PATCH takes effect at once.
                shared["credits"] = req.credits
                shared["credits_version"] = max(m.credits_version for m in members) + 1
                shared["credits_set_at"] = now
            if req.metadata is not UNSET:
                owner, _ = self._unseal(record)
                changes["sealed"] = self._seal(key_id, owner, req.metadata)
            updated = msgspec.structs.replace(record, **changes, **shared)
            txn.put(Table.KEYS, key_id.encode(), codec.encode(updated))
            others = keychain.share_settings(txn, members, key_id, shared, now)
            details: dict[str, Any] = {"fields": changed}
            if others:
                details["shared_with"] = others
            append_audit(
                txn,
                actor=actor,
                action="key.update",
                target_id=key_id,
                now=now,
                details=details,
            )
            return updated

        updated = await self._store.write(fn)
        with self._store.read() as txn:
            return self._view(updated, txn, now)

    async def revoke(self, key_id: str, actor: Actor) -> RevokeResult:
        now = self._clock()

        def fn(txn: WriteTxn) -> None:
            record = self._load(txn, key_id)
            if record.status == "revoked":
                raise Conflict(f"key {key_id} is already revoked")
            updated = msgspec.structs.replace(
                record, status="revoked", revoked_at=now, updated_at=now
            )
            txn.put(Table.KEYS, key_id.encode(), codec.encode(updated))
            append_audit(txn, actor=actor, action="key.revoke", target_id=key_id, now=now)

        await self._store.write(fn)
        return RevokeResult(id=key_id, status="revoked", revoked_at=utc_required(now))

    async def rotate(self, key_id: str, req: RotateKeyRequest, actor: Actor) -> RotateResult:
        now = self._clock()
        plaintext = self.format.generate()
        new_key_id = new_id("key", now)
        grace_ends_at = now + req.grace_seconds

        def fn(txn: WriteTxn) -> KeyRecord:
            old = self._load(txn, key_id)
            status = effective_status(old, now)
            if status != "active":
                raise Conflict(f"key {key_id} is {status}; only an active key can be rotated")
            owner, metadata = self._unseal(old)
            new = self._new_record(
                plaintext=plaintext,
                key_id=new_key_id,
                name=old.name,
                owner=owner,
                metadata=metadata,
                scopes=old.scopes,
                now=now,
                expires_at=old.expires_at,
                rate_limits=old.rate_limits,
                credits=old.credits,
                rotated_from=key_id,
            )
            # Nothing moves: the new key joins the old one's state.
            new = msgspec.structs.replace(new, **keychain.joined_state(old))
            self._put_new(txn, new)
            rotated = msgspec.structs.replace(
                old,
                status="rotated",
                rotated_to=new_key_id,
                grace_ends_at=grace_ends_at,
                updated_at=now,
            )
            txn.put(Table.KEYS, key_id.encode(), codec.encode(rotated))
            append_audit(
                txn,
                actor=actor,
                action="key.rotate",
                target_id=key_id,
                now=now,
                details={"new_id": new_key_id, "grace_seconds": req.grace_seconds},
            )
            return new

        new = await self._store.write(fn)
        return RotateResult(
            old=RotatedOld(id=key_id, status="rotated", grace_ends_at=utc_required(grace_ends_at)),
            new=self._created(new, plaintext, now),
        )

    async def cleanup(self, actor: Actor) -> tuple[int, int]:
        """Mark past-expiry keys expired; purge rotated keys past their grace."""
        now = self._clock()

        def fn(txn: WriteTxn) -> tuple[int, int]:
            expired, purged = keychain.sweep(txn, now)
            append_audit(
                txn,
                actor=actor,
                action="maintenance.cleanup",
                target_id=None,
                now=now,
                details={"expired": expired[:1000], "purged": purged[:1000]},
            )
            return len(expired), len(purged)

        return await self._store.write(fn)
