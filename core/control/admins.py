"""Admin users: the one-time ``/setup``, creating and revoking admins, and
authenticating an admin key to its permissions.

Admin keys are their own kind (prefix ``tgadm_``, their own digest index): an
admin key is never an API key on the data plane, nor the reverse.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

import msgspec

from triogate.control.audit import Actor, append_audit
from triogate.control.crypto import ServerSecrets
from triogate.control.ids import is_valid_id, new_id
from triogate.control.keyformat import KeyFormat
from triogate.control.keys import find_by_digest
from triogate.control.models import (
    AdminList,
    AdminView,
    CreateAdminRequest,
    CreatedAdmin,
    SetupRequest,
    SetupResult,
)
from triogate.control.permissions import (
    PERMISSIONS,
    effective_permissions,
    grants,
    unknown_permissions,
)
from triogate.control.timeutil import Clock, system_clock, utc, utc_required
from triogate.errors import (
    Conflict,
    Forbidden,
    InvalidKey,
    KeyRevoked,
    MissingKey,
    NotFound,
    ValidationError,
)
from triogate.storage import AdminRecord, ReadTxn, Store, Table, WriteTxn, codec

__all__ = ["ADMIN_KEY_PREFIX", "AdminService", "Principal"]

ADMIN_KEY_PREFIX = "tgadm_"
_SETUP = b"setup"


def _expand(permissions: Sequence[str]) -> list[str]:
    """Every concrete permission the given ones (wildcards too) grant."""
    return [p for p in PERMISSIONS if grants(permissions, p)]


class Principal(msgspec.Struct, frozen=True):
    """An authenticated admin: who, and what they may do."""

    id: str
    permissions: tuple[str, ...]


class AdminService:
    def __init__(
        self, store: Store, secrets: ServerSecrets, *, clock: Clock = system_clock
    ) -> None:
        self._store = store
        self._secrets = secrets
        self._clock = clock
        self.format = KeyFormat(ADMIN_KEY_PREFIX)

    def __repr__(self) -> str:
        return f"<AdminService store={self._store!r}>"

    def _view(self, r: AdminRecord) -> AdminView:
        email = self._secrets.sealer.open(r.sealed, r.id.encode()).decode()
        return AdminView(
            id=r.id,
            name=r.name,
            email=email,
            start=r.start,
            role=r.role,  # type: ignore[arg-type]
            permissions=list(effective_permissions(r.role, r.permissions)),
            status=r.status,  # type: ignore[arg-type]
            created_at=utc_required(r.created_at),
            revoked_at=utc(r.revoked_at),
        )

    def _new(
        self, *, name: str, email: str, role: str | None, permissions: tuple[str, ...], now: float
    ) -> tuple[AdminRecord, str]:
        plaintext = self.format.generate()
        admin_id = new_id("adm", now)
        record = AdminRecord(
            id=admin_id,
            digest=self._secrets.hmac.digest(plaintext),
            digest_version=self._secrets.hmac.current,
            start=self.format.start(plaintext),
            name=name,
            sealed=self._secrets.sealer.seal(email.encode(), admin_id.encode()),
            role=role,
            permissions=permissions,
            status="active",
            created_at=now,
        )
        return record, plaintext

    @staticmethod
    def _put(txn: WriteTxn, record: AdminRecord) -> None:
        txn.put(Table.ADMINS, record.id.encode(), codec.encode(record))
        txn.put(Table.ADMIN_DIGESTS, record.digest, record.id.encode())

    def refuse_setup_if_done(self) -> None:
        """409 once setup has been done, before the request body is read: a
        finished setup is the common case for whoever still calls it, and
        they need not have a megabyte of JSON validated first. (The write in
        ``setup`` checks again, atomically.)"""
        with self._store.read() as txn:
            if txn.get(Table.META, _SETUP) is not None or next(txn.scan(Table.ADMINS), None):
                raise Conflict("setup has already been done")

    async def setup(self, req: SetupRequest, source_ip: str | None) -> SetupResult:
        """Create the first super_admin. Atomic: the check that no admin exists
        and the insert are one write transaction, so of two concurrent calls
        exactly one succeeds."""
        now = self._clock()
        record, plaintext = self._new(
            name=req.name, email=req.email, role="super_admin", permissions=(), now=now
        )

        def fn(txn: WriteTxn) -> None:
            if txn.get(Table.META, _SETUP) is not None or next(txn.scan(Table.ADMINS), None):
                raise Conflict("setup has already been done")
            self._put(txn, record)
            txn.put(Table.META, _SETUP, record.id.encode())
            append_audit(
                txn,
                actor=Actor(record.id, source_ip),
                action="setup",
                target_id=record.id,
                now=now,
            )

        await self._store.write(fn)
        return SetupResult(
            id=record.id, key=plaintext, role="super_admin", name=req.name, email=req.email
        )

    def is_set_up(self) -> bool:
        with self._store.read() as txn:
            return (
                txn.get(Table.META, _SETUP) is not None
                or next(txn.scan(Table.ADMINS), None) is not None
            )

    async def create(
        self, req: CreateAdminRequest, actor: Actor, *, granter: Sequence[str] = ("*",)
    ) -> CreatedAdmin:
        """Create an admin. ``granter`` is what the creating admin may do: it
        cannot hand out a permission it does not hold (no escalation from
        ``admin:users:create`` to ``super_admin``). The CLI, root on the
        data directory, passes ``*``."""
        if req.permissions is not None:
            bad = unknown_permissions(req.permissions)
            if bad:
                raise ValidationError.single(
                    "permissions", f"unknown permissions: {', '.join(bad)}"
                )
        wanted = effective_permissions(req.role, req.permissions or ())
        beyond = [p for p in _expand(wanted) if not grants(granter, p)]
        if beyond:
            raise Forbidden(
                f"an admin cannot grant what it does not hold: {', '.join(beyond)}",
                required_permission=beyond[0],
            )
        now = self._clock()
        record, plaintext = self._new(
            name=req.name,
            email=req.email,
            role=req.role,
            permissions=tuple(req.permissions or ()),
            now=now,
        )

        def fn(txn: WriteTxn) -> None:
            self._put(txn, record)
            append_audit(
                txn,
                actor=actor,
                action="admin.create",
                target_id=record.id,
                now=now,
                details={"role": req.role, "permissions": req.permissions},
            )

        await self._store.write(fn)
        view = self._view(record)
        return CreatedAdmin(**msgspec.structs.asdict(view), key=plaintext)

    def setup_admin_id(self) -> str | None:
        """The id of the admin ``setup`` created, if setup was done."""
        with self._store.read() as txn:
            raw = txn.get(Table.META, _SETUP)
        return raw.decode() if raw is not None else None

    async def reissue(self, admin_id: str, actor: Actor) -> CreatedAdmin:
        """A new key for an active admin, the old one refused from now on: the
        same admin (id, role, audit trail), not another one. ``triogate demo``
        uses it on a re-run, where the first key was shown once and is gone."""
        now = self._clock()
        plaintext = self.format.generate()

        def fn(txn: WriteTxn) -> AdminRecord:
            record = self._load(txn, admin_id)
            if record.status != "active":
                raise Conflict(f"admin {admin_id} is {record.status}")
            txn.delete(Table.ADMIN_DIGESTS, record.digest)
            updated = msgspec.structs.replace(
                record,
                digest=self._secrets.hmac.digest(plaintext),
                digest_version=self._secrets.hmac.current,
                start=self.format.start(plaintext),
            )
            self._put(txn, updated)
            append_audit(txn, actor=actor, action="admin.reissue", target_id=admin_id, now=now)
            return updated

        view = self._view(await self._store.write(fn))
        return CreatedAdmin(**msgspec.structs.asdict(view), key=plaintext)

    def list(self) -> AdminList:
        with self._store.read() as txn:
            items = [
                self._view(codec.admin.decode(v)) for _, v in txn.scan(Table.ADMINS, reverse=True)
            ]
        return AdminList(items=items)

    @staticmethod
    def _load(txn: ReadTxn, admin_id: str) -> AdminRecord:
        if not is_valid_id(admin_id, "adm"):
            raise ValidationError.single("id", "not an admin id")
        raw = txn.get(Table.ADMINS, admin_id.encode())
        if raw is None:
            raise NotFound(f"no admin {admin_id}")
        return codec.admin.decode(raw)

    async def revoke(
        self, admin_id: str, actor: Actor, *, revoker: Sequence[str] = ("*",)
    ) -> AdminView:
        """Revoke an admin. The revoker must hold every permission the target
        holds (``admin:users:revoke`` alone cannot remove a super_admin)."""
        now = self._clock()
        if admin_id == actor.id:
            raise Conflict("an admin cannot revoke their own key")

        def fn(txn: WriteTxn) -> AdminRecord:
            record = self._load(txn, admin_id)
            if record.status == "revoked":
                raise Conflict(f"admin {admin_id} is already revoked")
            held = _expand(effective_permissions(record.role, record.permissions))
            beyond = [p for p in held if not grants(revoker, p)]
            if beyond:
                raise Forbidden(
                    f"only an admin holding all of the target's permissions may revoke it "
                    f"(missing {', '.join(beyond)})",
                    required_permission=beyond[0],
                )
            updated = msgspec.structs.replace(record, status="revoked", revoked_at=now)
            txn.put(Table.ADMINS, admin_id.encode(), codec.encode(updated))
            append_audit(txn, actor=actor, action="admin.revoke", target_id=admin_id, now=now)
            return updated

        return self._view(await self._store.write(fn))

    def authenticate(self, plaintext: str | None) -> Principal:
        if not plaintext:
            raise MissingKey("an admin key is required: Authorization: Bearer <admin key>")
        if not self.format.is_well_formed(plaintext):
            raise InvalidKey("malformed admin key")
        found = find_by_digest(
            self._store, self._secrets, plaintext, Table.ADMIN_DIGESTS, Table.ADMINS
        )
        if found is not None:
            raw, digest, _ = found
            record = codec.admin.decode(raw)
            if hmac.compare_digest(record.digest, digest):
                if record.status != "active":
                    raise KeyRevoked("this admin key has been revoked")
                return Principal(record.id, effective_permissions(record.role, record.permissions))
        raise InvalidKey("unknown admin key")
