"""The API-key lifecycle: create, update, revoke, rotate, validate, clean up
(reading, listing and usage are ``keyviews.KeyReads``, its read half).

Theory of operation
-------------------
A key is ``prefix + 256 random bits + checksum`` (``keyformat``), the prefix
of its keyspace. Its plaintext exists only in the response that creates it:
storage keeps an HMAC-SHA256 digest (indexed, for lookup), a short
non-secret ``start`` hint, and the sensitive fields (owner, metadata) sealed
with AES-GCM. Listing by owner goes through a keyed blind index of the
owner, never the plaintext owner.

Validation (the hot path) is synchronous: checksum, digest, two LMDB gets,
one msgpack decode and the pure ``key_decision`` (a ``KeyVerdict`` or None);
no await, no lock, no write. A key looked up before, with nothing written to
the store and no new keyring or keyspaces since, skips all but the decision
(``keycache``). A key found under an *older* HMAC version is
re-indexed by the async ``validate``; an unknown one may be made under a
version another process added: ``find_by_digest`` picks that up.

Every mutation is one storage write function that re-reads the record inside
the transaction, decides, writes the record, its indexes and the audit entry
together: a check-then-act race between two admins cannot happen. The ids a
key names (identity, plan, roles) are checked in that same write
(``keyfields``): an identity deleted at the same moment cannot be missed.

A rotation moves nothing: the new key shares the old one's credit balance and
limiter state through a state key (``keychain``), during the grace and after,
and keeps its identity, plan, roles, keyspace and ``enabled``.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any

import msgspec
from msgspec import UNSET

from triogate.control import keychain
from triogate.control.audit import Actor, append_audit
from triogate.control.eventsink import EventSink, key_data
from triogate.control.ids import new_id
from triogate.control.keycache import LookupCache
from triogate.control.keyfields import (
    identity_disabled,
    index_key,
    key_effective,
    reference_errors,
    revoke_record,
)
from triogate.control.keyrules import (
    access_decision,
    effective_status,
    find_by_digest,
    scopes_refused,
)
from triogate.control.keyrules import key_decision as key_decision
from triogate.control.keysha256 import Sha256Index, drop_sha256
from triogate.control.keyviews import OWNER_TAG, KeyReads
from triogate.control.models import (
    CreatedKey,
    CreateKeyRequest,
    KeyView,
    RevokeResult,
    RotatedOld,
    RotateKeyRequest,
    RotateResult,
    UpdateKeyRequest,
    ValidateResult,
)
from triogate.control.timeutil import epoch, utc, utc_required
from triogate.errors import Conflict, KeyVerdict, StorageFull, StoreUnreachable, ValidationError
from triogate.policy.keyaccess import KeyRule
from triogate.storage import KeyRecord, Table, WriteTxn, codec

__all__ = ["KeyService", "effective_status", "find_by_digest", "key_decision"]

_INVALID = KeyVerdict.INVALID_KEY


class KeyService(KeyReads):
    #: Where key events go, in each change's own write (the runtime sets
    #: it when webhooks are configured; ``control.eventsink``).
    events: EventSink | None = None

    def __repr__(self) -> str:
        return f"<KeyService {self.format!r} store={self._store!r}>"

    # ---- validation (hot path) --------------------------------------------

    @cached_property
    def sha256_index(self) -> Sha256Index:
        """Keys imported by their SHA-256 (``keysha256``): tried on a miss."""
        return Sha256Index(self._store)

    @cached_property
    def _lookups(self) -> LookupCache:
        return LookupCache()

    def lookup_nowait(self, plaintext: str) -> tuple[KeyRecord | None, bool]:
        """The key's record (None if malformed or unknown), and whether it was
        found under an older HMAC version and so wants re-indexing. A key
        found before, with nothing written to the store since, comes from
        the lookup cache (``keycache``)."""
        generation = self._store.generation()
        keyring = self._secrets.hmac
        keyspaces = self.format
        cache = self._lookups
        hit = cache.get(plaintext, generation, keyring, keyspaces)
        if hit is not None:
            return hit
        record, stale = self._lookup(plaintext)
        if record is not None:
            cache.put(plaintext, (record, stale), generation, keyring, keyspaces)
        return record, stale

    def _lookup(self, plaintext: str) -> tuple[KeyRecord | None, bool]:
        if not self.format.is_well_formed(plaintext):
            return None, False
        found = find_by_digest(self._store, self._secrets, plaintext, Table.KEY_DIGESTS, Table.KEYS)
        if found is None:  # imported by its SHA-256, not used yet? (keysha256)
            return self.sha256_index.find(plaintext)
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
        record, stale = self.lookup_nowait(plaintext)
        if record is None:
            return ValidateResult(valid=False, code=_INVALID)
        if stale:
            await self.reindex(plaintext, record.id)
        # As the data plane decides: effective scopes (plan, roles), and a
        # disabled key or identity refused (401s first, then 403s).
        with self._store.read() as txn:
            scopes = key_effective(txn, record).scopes
            identity_enabled = not identity_disabled(txn, record)
        rule = KeyRule(scopes=tuple(required_scopes))
        verdict = access_decision(
            record, self._clock(), rule, scopes=scopes, identity_enabled=identity_enabled
        )
        owner, _ = self._unseal(record)
        result = ValidateResult(
            valid=verdict is None,
            code=verdict,
            key_id=record.id,
            owner=owner,
            scopes=list(scopes),
            expires_at=utc(record.expires_at),
            grace_ends_at=utc(record.grace_ends_at),
        )
        if verdict is KeyVerdict.INSUFFICIENT_SCOPE:
            result.required_scopes = scopes_refused(scopes, rule)
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
            drop_sha256(txn, record)  # a SHA-256 import's weak entry does not stay
            updated = msgspec.structs.replace(
                record, digest=new_digest, digest_version=keyring.current
            )
            txn.put(Table.KEYS, key_id.encode(), codec.encode(updated))

        # A full store must not refuse a valid key: re-indexed at a later use.
        # Nor a cluster node cut off from Redis (the key is still found under
        # its old digest or SHA-256 entry, and re-indexed at a later use).
        with contextlib.suppress(StorageFull, StoreUnreachable):
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
        **customer: Any,
    ) -> KeyRecord:
        """``customer``: identity_id, plan_id, enabled, roles, keyspace."""
        keyring = self._secrets.hmac
        return KeyRecord(
            id=key_id,
            digest=keyring.digest(plaintext),
            digest_version=keyring.current,
            start=self.format.start(plaintext),
            name=name,
            sealed=self._seal(key_id, owner, metadata),
            owner_tag=keyring.tag(OWNER_TAG, owner),
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
            **customer,
        )

    @staticmethod
    def _put_new(txn: WriteTxn, record: KeyRecord) -> None:
        kid = record.id.encode()
        txn.put(Table.KEYS, kid, codec.encode(record))
        txn.put(Table.KEY_DIGESTS, record.digest, kid)
        txn.put(Table.KEY_OWNERS, record.owner_tag + kid, b"")
        index_key(txn, None, record)

    def _created(self, record: KeyRecord, plaintext: str, now: float) -> CreatedKey:
        with self._store.read() as txn:
            view = self._view(record, txn, now)
        return CreatedKey(**msgspec.structs.asdict(view), key=plaintext)

    async def create(self, req: CreateKeyRequest, actor: Actor) -> CreatedKey:
        now = self._clock()
        expires_at = epoch(req.expires_at)
        if expires_at is not None and expires_at <= now:
            raise ValidationError.single("expires_at", "must be in the future")
        plaintext = self.format.require(req.keyspace).generate()
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
            identity_id=req.identity_id,
            plan_id=req.plan_id,
            enabled=req.enabled,
            roles=tuple(dict.fromkeys(req.roles)),
            keyspace=req.keyspace,
        )

        def fn(txn: WriteTxn) -> None:
            errors = reference_errors(
                txn, identity_id=req.identity_id, plan_id=req.plan_id, roles=req.roles
            )
            if errors:
                raise ValidationError(errors)
            self._put_new(txn, record)
            details: dict[str, Any] = {"name": record.name, "scopes": list(record.scopes)}
            for field in ("identity_id", "plan_id", "roles", "keyspace"):
                value = getattr(record, field)
                if value and value != "default":
                    details[field] = list(value) if isinstance(value, tuple) else value
            if not record.enabled:
                details["enabled"] = False
            append_audit(
                txn,
                actor=actor,
                action="key.create",
                target_id=record.id,
                now=now,
                details=details,
            )
            if self.events is not None:
                self.events.emit(txn, "key.created", key_data(record, now), now)

        await self._store.write(fn)
        return self._created(record, plaintext, now)

    async def update(self, key_id: str, req: UpdateKeyRequest, actor: Actor) -> KeyView:
        now = self._clock()
        changed = [f for f in req.__struct_fields__ if getattr(req, f) is not UNSET]
        if isinstance(req.expires_at, datetime) and req.expires_at.timestamp() <= now:
            raise ValidationError.single("expires_at", "must be in the future")

        def fn(txn: WriteTxn) -> KeyRecord:
            record = self._load(txn, key_id)
            errors = reference_errors(
                txn,
                identity_id=None if req.identity_id is UNSET else req.identity_id,
                plan_id=None if req.plan_id is UNSET else req.plan_id,
                roles=() if req.roles is UNSET else req.roles,
            )
            if errors:
                raise ValidationError(errors)
            changes: dict[str, Any] = {"updated_at": now}
            shared: dict[str, Any] = {}
            # Credits and limits govern the state a rotation chain shares,
            # and a chain is one key to its owner (disabling the new key
            # must not leave the old one working in its grace): set on one
            # key of it, they and ``enabled`` are set on every key of it.
            chained = (req.credits, req.rate_limits, req.enabled)
            members = (
                keychain.chain(txn, record) if any(v is not UNSET for v in chained) else [record]
            )
            if req.name is not UNSET:
                changes["name"] = req.name
            if req.scopes is not UNSET:
                changes["scopes"] = tuple(dict.fromkeys(req.scopes))
            if req.expires_at is not UNSET:
                changes["expires_at"] = epoch(req.expires_at)
            if req.identity_id is not UNSET:
                changes["identity_id"] = req.identity_id
            if req.plan_id is not UNSET:
                changes["plan_id"] = req.plan_id
            if req.enabled is not UNSET:
                shared["enabled"] = req.enabled
            if req.roles is not UNSET:
                changes["roles"] = tuple(dict.fromkeys(req.roles))
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
            index_key(txn, record, updated)
            others = keychain.share_settings(txn, members, key_id, shared, now)
            details: dict[str, Any] = {"fields": changed}
            if others:
                details["shared_with"] = others
            if updated.identity_id != record.identity_id:
                details["identity_id"] = {"from": record.identity_id, "to": updated.identity_id}
            if updated.plan_id != record.plan_id:
                details["plan_id"] = {"from": record.plan_id, "to": updated.plan_id}
            append_audit(
                txn,
                actor=actor,
                action="key.update",
                target_id=key_id,
                now=now,
                details=details,
            )
            for member in members:
                if req.enabled is not UNSET and member.enabled != req.enabled:
                    append_audit(
                        txn,
                        actor=actor,
                        action="key.enable" if req.enabled else "key.disable",
                        target_id=member.id,
                        now=now,
                        details=None if member.id == key_id else {"via": key_id},
                    )
            if self.events is not None:
                data = key_data(updated, now, fields=changed)
                self.events.emit(txn, "key.updated", data, now)
                for member in members:  # the rotation chain's keys too
                    if member.enabled and req.enabled is False:
                        gone = updated if member.id == key_id else member
                        data = key_data(msgspec.structs.replace(gone, enabled=False), now)
                        self.events.emit(txn, "key.disabled", data, now)
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
            revoked = revoke_record(txn, record, now=now, actor=actor)
            if self.events is not None:
                self.events.emit(txn, "key.revoked", key_data(revoked, now), now)

        await self._store.write(fn)
        return RevokeResult(id=key_id, status="revoked", revoked_at=utc_required(now))

    async def rotate(self, key_id: str, req: RotateKeyRequest, actor: Actor) -> RotateResult:
        now = self._clock()
        new_key_id = new_id("key", now)
        grace_ends_at = now + req.grace_seconds
        with self._store.read() as txn:
            keyspace = self._load(txn, key_id).keyspace  # immutable: read ahead
        plaintext = self.format.require(keyspace).generate()

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
                **keychain.customer_fields(old),
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
            index_key(txn, old, rotated)
            append_audit(
                txn,
                actor=actor,
                action="key.rotate",
                target_id=key_id,
                now=now,
                details={"new_id": new_key_id, "grace_seconds": req.grace_seconds},
            )
            if self.events is not None:
                data = key_data(
                    rotated,
                    now,
                    new_key_id=new_key_id,
                    grace_ends_at=utc_required(grace_ends_at).isoformat(),
                )
                self.events.emit(txn, "key.rotated", data, now)
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
            if self.events is not None:
                for expired_id in expired:  # marked expired now: once per key
                    data = key_data(self._load(txn, expired_id), now)
                    self.events.emit(txn, "key.expired", data, now)
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
