"""Importing keys users already hold (``POST /keys/import``, ``triogate keys
import``): Unkey's ``migrateKeys``, Tyk's and Kong's key import.

Theory of operation
-------------------
Each item is checked alone (``keyimport_models.ImportKeyItem``: the fields
of ``POST /keys`` with its checks, plus ``key`` or ``sha256``); a bad one
is answered in ``failed`` at its index and the others go on.

* ``key``: a plaintext, digested at once with the gateway's HMAC exactly as
  a created key is, and never stored. A key in a keyspace's own format
  (prefix and checksum) belongs to that keyspace; any other must match one
  of ``[keys] import_formats`` (``keyformat.ImportFormats``), which is also
  what lets the data plane look it up at all, and belongs to the item's
  ``keyspace``.
* ``sha256``: the plaintext is gone; the record keeps the SHA-256 and is
  found through ``KEY_SHA256`` until its first use re-indexes it under the
  HMAC (``keysha256``). Its plaintext must still be of a format the data
  plane accepts (a keyspace's or an import format), or it is refused
  before any look-up.

Re-import is idempotent. Each imported key gets an *import mark*
(``KEY_IMPORTS``, ``b"id:" + id``): a keyed tag of the item's fields. The
same key again (found by its HMAC, its SHA-256, or the keyed tag of its
SHA-256 the mark table keeps, ``b"sha256:" + tag``, so a SHA-256 import
already used, or a plaintext import, is recognised from its SHA-256 too)
with the same fields answers the existing id (``existing: true``) and
changes nothing; with other fields, or a key made here rather than
imported, it is a ``CONFLICT``. A plaintext re-import of a key imported by
its SHA-256 and not used yet re-indexes it under the HMAC on the spot.

Items are written in chunks of ``CHUNK`` per store write (each one
transaction: the items' look-ups see the earlier items' writes, so a key
twice in one batch is imported once), the answer given once every chunk is
committed: imported keys work on the data plane at once. Every imported
key gets its own ``key.import`` audit entry, as a created key gets its
``key.create``, and the same ``key.created`` event (``KeyService.events``,
in the same write); re-imports and failures change nothing and log
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import msgspec

from triogate.control.audit import Actor, append_audit
from triogate.control.crypto import HmacKeyring
from triogate.control.eventsink import key_data
from triogate.control.ids import new_id
from triogate.control.keyfields import index_key, reference_errors
from triogate.control.keyformat import DEFAULT_KEYSPACE
from triogate.control.keyimport_models import (
    MAX_IMPORT_ITEMS,
    ImportedKey,
    ImportFailure,
    ImportKeyItem,
    ImportResult,
)
from triogate.control.keys import KeyService
from triogate.control.keysha256 import SHA256_VERSION, drop_sha256, sha256_of
from triogate.control.models import FieldErrorView
from triogate.control.timeutil import epoch
from triogate.errors import FieldError, StorageFull, ValidationError
from triogate.storage import KeyRecord, Table, WriteTxn, codec
from triogate.validation import convert_all

__all__ = ["CHUNK", "KeyImporter", "foreign_start"]

CHUNK: Final = 100  # items per store write: a checkpoint between them
_FIELDS_TAG: Final = "import-fields"
_SHA256_TAG: Final = "import-sha256"
_ID_ROW: Final = b"id:"
_SHA_ROW: Final = b"sha256:"
_MAX_SEPARATOR: Final = 17  # a foreign key's readable prefix ends within this


class ImportMark(msgspec.Struct, array_like=True, frozen=True):
    """``KEY_IMPORTS[b"id:" + key id]``: the key was imported, with these
    fields (a keyed tag under HMAC ``version``: owner and metadata are in
    it, so it must not be guessable)."""

    version: int
    fields: bytes
    imported_at: float
    kind: str  # "key" or "sha256"


_mark_decoder = msgspec.msgpack.Decoder(ImportMark)
_encoder = msgspec.json.Encoder(order="sorted")


def foreign_start(key: str) -> str:
    """The ``start`` hint of a foreign key: its readable prefix (up to its
    last ``_`` or ``-`` among the first characters) and at most four more
    characters, fewer for a short key (they are secret ones)."""
    head = key[:_MAX_SEPARATOR]
    cut = max(head.rfind("_"), head.rfind("-")) + 1
    return key[: cut + min(4, (len(key) - cut) // 6)]


@dataclass
class _Item:
    """One valid item, ready to write."""

    index: int
    record: KeyRecord  # not written yet; its id is new
    kind: str  # "key" or "sha256"
    fields: str  # the canonical JSON of its fields: what a re-import must match
    sha256: bytes  # of the plaintext (given, or computed)
    hmac_digests: list[bytes] = field(default_factory=list)  # every version's (plaintext only)
    details: dict[str, Any] = field(default_factory=dict)  # for its audit entry


def _failure(index: int, exc: ValidationError) -> ImportFailure:
    errors = [FieldErrorView(path=e.path, message=e.message) for e in exc.errors]
    first = exc.errors[0] if exc.errors else FieldError("$", exc.detail)
    return ImportFailure(
        index=index,
        code=exc.code,
        detail=f"{first.path}: {first.message}",
        errors=errors,
    )


class KeyImporter:
    """Imports batches of keys into ``keys``'s store."""

    def __init__(self, keys: KeyService) -> None:
        self._keys = keys

    def __repr__(self) -> str:
        return f"<KeyImporter {self._keys!r}>"

    async def run(self, items: Sequence[Any], actor: Actor) -> ImportResult:
        if not 1 <= len(items) <= MAX_IMPORT_ITEMS:
            raise ValidationError.single("keys", f"give 1 to {MAX_IMPORT_ITEMS} keys per call")
        migrated: list[ImportedKey] = []
        failed: list[ImportFailure] = []
        for start in range(0, len(items), CHUNK):
            now = self._keys._clock()
            ready: list[_Item] = []
            for index in range(start, min(start + CHUNK, len(items))):
                try:
                    ready.append(self._prepare(index, items[index], now))
                except ValidationError as exc:
                    failed.append(_failure(index, exc))
            if not ready:
                continue
            try:
                done, refused = await self._keys._store.write(
                    partial(self._write, items=ready, now=now, actor=actor)
                )
            except StorageFull as exc:
                failed.extend(
                    ImportFailure(index=it.index, code=exc.code, detail=exc.detail) for it in ready
                )
                continue
            migrated.extend(done)
            failed.extend(refused)
            if any(it.kind == "sha256" for it in ready):
                self._keys.sha256_index.mark_present()
        migrated.sort(key=lambda m: m.index)
        failed.sort(key=lambda f: f.index)
        return ImportResult(migrated=migrated, failed=failed)

    # ---- one item, before any write -----------------------------------------

    def _prepare(self, index: int, raw: Any, now: float) -> _Item:
        """The item checked and its record built (sealed, digested), or the
        ValidationError that refuses it (paths within the item)."""
        item = convert_all(raw, ImportKeyItem)  # an object, with POST /keys' checks
        assert isinstance(raw, dict)  # convert_all refused anything else
        if (item.key is None) == (item.sha256 is None):
            raise ValidationError.single("key", "give exactly one of key or sha256")
        if item.start is not None and item.sha256 is None:
            raise ValidationError.single("start", "only with sha256 (a key's start is its own)")
        expires_at = epoch(item.expires_at)
        if expires_at is not None and expires_at <= now:
            raise ValidationError.single("expires_at", "must be in the future")
        keys = self._keys
        keyring = keys._secrets.hmac
        keyspace = item.keyspace
        details: dict[str, Any] = {"name": item.name}
        if item.key is not None:
            own = keys.format.keyspace_of(item.key)
            if own is not None:
                if "keyspace" in raw and item.keyspace != own:
                    raise ValidationError.single(
                        "keyspace", f"the key is in keyspace {own!r}'s format (its prefix)"
                    )
                keyspace = own
                details["format"] = "own"
            elif keys.format.imports.matches(item.key):
                details["format"] = "foreign"
            else:
                raise ValidationError.single(
                    "key",
                    "not in a keyspace's format (prefix and checksum) and matching none of "
                    "[keys] import_formats",
                )
        keys.format.require(keyspace)  # 400 on "keyspace" naming the configured ones
        record = keys._new_record(
            plaintext=item.key or "",
            key_id=new_id("key", now),
            name=item.name,
            owner=item.owner,
            metadata=item.metadata,
            scopes=item.scopes,
            now=now,
            expires_at=expires_at,
            rate_limits=item.rate_limits,
            credits=item.credits,
            identity_id=item.identity_id,
            plan_id=item.plan_id,
            enabled=item.enabled,
            roles=tuple(dict.fromkeys(item.roles)),
            keyspace=keyspace,
        )
        fields = _encoder.encode(
            {
                "name": record.name,
                "owner": item.owner,
                "metadata": item.metadata,
                "scopes": record.scopes,
                "expires_at": expires_at,
                "rate_limits": record.rate_limits,
                "credits": record.credits,
                "identity_id": record.identity_id,
                "plan_id": record.plan_id,
                "enabled": record.enabled,
                "roles": record.roles,
                "keyspace": keyspace,
            }
        ).decode()
        for name in ("identity_id", "plan_id", "roles"):
            value = getattr(record, name)
            if value:
                details[name] = list(value) if isinstance(value, tuple) else value
        if keyspace != DEFAULT_KEYSPACE:
            details["keyspace"] = keyspace
        if item.key is not None:
            if details["format"] == "foreign":
                record = msgspec.structs.replace(record, start=foreign_start(item.key))
            return _Item(
                index=index,
                record=record,
                kind="key",
                fields=fields,
                sha256=sha256_of(item.key),
                hmac_digests=[keyring.digest(item.key, v) for v in keyring.versions],
                details={"kind": "key", **details},
            )
        assert item.sha256 is not None
        digest = bytes.fromhex(item.sha256)
        record = msgspec.structs.replace(
            record, digest=digest, digest_version=SHA256_VERSION, start=item.start or ""
        )
        return _Item(
            index=index,
            record=record,
            kind="sha256",
            fields=fields,
            sha256=digest,
            details={"kind": "sha256", **details},
        )

    # ---- the write (one transaction per chunk) ------------------------------

    def _write(
        self, txn: WriteTxn, items: list[_Item], now: float, actor: Actor
    ) -> tuple[list[ImportedKey], list[ImportFailure]]:
        keyring = self._keys._secrets.hmac
        done: list[ImportedKey] = []
        refused: list[ImportFailure] = []
        for it in items:
            existing = self._existing(txn, it, keyring)
            if existing is not None:
                if self._same_fields(txn, existing, it, keyring):
                    if it.kind == "key" and existing.digest_version == SHA256_VERSION:
                        self._to_hmac(txn, existing, it.record)
                    done.append(ImportedKey(index=it.index, id=existing.id, existing=True))
                else:
                    refused.append(self._conflict(txn, it.index, existing))
                continue
            record = it.record
            errors = reference_errors(
                txn, identity_id=record.identity_id, plan_id=record.plan_id, roles=record.roles
            )
            if errors:
                refused.append(_failure(it.index, ValidationError(errors)))
                continue
            self._put(txn, it, now, keyring)
            append_audit(
                txn,
                actor=actor,
                action="key.import",
                target_id=it.record.id,
                now=now,
                details=it.details,
            )
            events = self._keys.events
            if events is not None:  # as a created key: its event in the same write
                events.emit(txn, "key.created", key_data(it.record, now), now)
            done.append(ImportedKey(index=it.index, id=it.record.id, existing=False))
        return done, refused

    @staticmethod
    def _existing(txn: WriteTxn, it: _Item, keyring: HmacKeyring) -> KeyRecord | None:
        """The stored key ``it`` is (a re-import), or None."""
        ids = [txn.get(Table.KEY_DIGESTS, d) for d in it.hmac_digests]
        ids.append(txn.get(Table.KEY_SHA256, it.sha256))
        hexdigest = it.sha256.hex()
        ids.extend(
            txn.get(Table.KEY_IMPORTS, _SHA_ROW + keyring.tag(_SHA256_TAG, hexdigest, v))
            for v in keyring.versions
        )
        for key_id in ids:
            if key_id is not None:
                raw = txn.get(Table.KEYS, key_id)
                if raw is not None:  # else left by a purged key: not a re-import
                    return codec.key.decode(raw)
        return None

    @staticmethod
    def _same_fields(txn: WriteTxn, existing: KeyRecord, it: _Item, keyring: HmacKeyring) -> bool:
        raw = txn.get(Table.KEY_IMPORTS, _ID_ROW + existing.id.encode())
        if raw is None:
            return False  # made here, not imported
        mark = _mark_decoder.decode(raw)
        if mark.version not in keyring.versions:
            return False
        return keyring.tag(_FIELDS_TAG, it.fields, mark.version) == mark.fields

    @staticmethod
    def _conflict(txn: WriteTxn, index: int, existing: KeyRecord) -> ImportFailure:
        imported = txn.get(Table.KEY_IMPORTS, _ID_ROW + existing.id.encode()) is not None
        why = "imported with other fields" if imported else "made here, not imported"
        return ImportFailure(
            index=index,
            code="CONFLICT",
            detail=f"the key is already present as {existing.id}, {why}",
        )

    def _put(self, txn: WriteTxn, it: _Item, now: float, keyring: HmacKeyring) -> None:
        record = it.record
        kid = record.id.encode()
        if it.kind == "key":
            self._keys._put_new(txn, record)
        else:
            # As ``_put_new``, but indexed by its SHA-256 only (the weak
            # index): never in KEY_DIGESTS, where a re-index would leave it.
            txn.put(Table.KEYS, kid, codec.encode(record))
            txn.put(Table.KEY_SHA256, record.digest, kid)
            txn.put(Table.KEY_OWNERS, record.owner_tag + kid, b"")
            index_key(txn, None, record)
        mark = ImportMark(
            version=keyring.current,
            fields=keyring.tag(_FIELDS_TAG, it.fields),
            imported_at=now,
            kind=it.kind,
        )
        txn.put(Table.KEY_IMPORTS, _ID_ROW + kid, msgspec.msgpack.encode(mark))
        txn.put(Table.KEY_IMPORTS, _SHA_ROW + keyring.tag(_SHA256_TAG, it.sha256.hex()), kid)

    @staticmethod
    def _to_hmac(txn: WriteTxn, existing: KeyRecord, fresh: KeyRecord) -> None:
        """A key imported by its SHA-256, now given by its plaintext: indexed
        under the HMAC at once (as its first use would), the weak entry gone."""
        txn.put(Table.KEY_DIGESTS, fresh.digest, existing.id.encode())
        drop_sha256(txn, existing)
        updated = msgspec.structs.replace(
            existing,
            digest=fresh.digest,
            digest_version=fresh.digest_version,
            start=existing.start or fresh.start,
        )
        txn.put(Table.KEYS, existing.id.encode(), codec.encode(updated))
