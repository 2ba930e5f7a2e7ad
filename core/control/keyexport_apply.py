"""``triogate keys import FILE`` of an export file: the records made here
exactly as they were there, idempotently.

Theory of operation
-------------------
Each record line is decided against what this data directory holds under
its id (``decide``): **created** (no such record), **unchanged** (the same
record) or **updated** (the file's record replaces this one: the file is the
declared state). Decided and applied in *one* storage write: every record
and its indexes, or none (a ``Conflict`` lists every problem, by line).
A dry run decides in a read snapshot and writes nothing. Importing a file
twice changes nothing the second time: every line is unchanged.

Conflicts refuse the whole file: a digest another key here holds, an
identity ``external_id``, plan name or role name another record here has,
a role renamed (keys name roles by name: rename it with ``roles patch``
first), a key or identity naming a plan, identity or role neither the file
nor this data directory has, a record twice in the file.

Versions that caches and balances go by are never moved backwards: an
updated plan's ``version`` becomes one past this directory's, and an updated
record whose credits changed gets a ``credits_version`` past this one's
(its balance restarts from the new credits, as a PATCH does). The
comparison ignores those counters, so a second import is still unchanged.

A key revoked or rotated here is never brought back by a file that has it
earlier in its life (``_ended_here``): its record here stays, reported
unchanged, so a stale file imported again cannot undo a revocation.

Usage records (credit balances, limiter state, counters) are runtime state,
owned by the running server's actors: one is written only where this
directory has none for that id (a key or identity new here), never
overwritten.

Every created or updated record gets an audit entry (``key.import``,
``identity.import``, ``plan.import``, ``role.import``, with
``{"via": "export-file", "outcome": ...}``) in the same write.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from triogate.control.audit import Actor, append_audit
from triogate.control.keyexport import ParsedFile, Record, read_record
from triogate.control.keyexport_models import Change, ImportReport
from triogate.control.keyfields import index_key
from triogate.control.keysha256 import SHA256_VERSION
from triogate.control.membership import add_member, remove_member
from triogate.control.timeutil import Clock
from triogate.errors import Conflict
from triogate.storage import KeyRecord, ReadTxn, Store, Table, WriteTxn, codec
from triogate.storage.records import IdentityRecord, PlanRecord, RoleRecord

__all__ = ["import_records", "refused"]

#: Counters that only move forwards here; not compared (see the docstring).
_IGNORED = frozenset({"version", "credits_version"})


def refused(problems: list[str]) -> Conflict:
    """The refusal of a file that conflicts with this data directory (or
    with itself): every problem, by line (the first 20)."""
    shown = problems[:20]
    more = [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
    return Conflict("\n".join(["nothing was imported:", *shown, *more]))


def _same(a: msgspec.Struct, b: msgspec.Struct) -> bool:
    return all(
        getattr(a, f) == getattr(b, f) for f in type(a).__struct_fields__ if f not in _IGNORED
    )


#: How far along its life a key is: revocation and rotation are final, so a
#: key further along here than in the file keeps its record here.
_LIFE = {"active": 0, "expired": 0, "rotated": 1, "revoked": 2}


def _ended_here(old: msgspec.Struct, new: msgspec.Struct) -> bool:
    """Whether ``old`` is a key revoked or rotated here after the file was
    made (the file has it earlier in its life). The file's record would bring
    it back: a revoked key valid again, a rotated one beside its successor.
    Kept as it is, and reported unchanged (a stale file is no way to undo a
    revocation; the API has none either)."""
    if not isinstance(old, KeyRecord) or not isinstance(new, KeyRecord):
        return False
    return _LIFE.get(old.status, 0) > _LIFE.get(new.status, 0)


class _Decision(msgspec.Struct):
    record: Record
    outcome: str
    old: Any
    new: Any  # what is written (counters moved forwards), None if unchanged


def _forwards(new: Any, old: Any) -> Any:
    """``new`` with the counters caches and balances go by past ``old``'s."""
    changes: dict[str, int] = {}
    if isinstance(new, PlanRecord):
        changes["version"] = max(new.version, old.version + 1)
    credits_version = getattr(new, "credits_version", None)
    if credits_version is not None:
        if new.credits != old.credits:
            changes["credits_version"] = max(credits_version, old.credits_version + 1)
        else:
            changes["credits_version"] = max(credits_version, old.credits_version)
    return msgspec.structs.replace(new, **changes)


class _Planner:
    """Decides every line against ``txn``; collects the problems."""

    def __init__(self, txn: ReadTxn, records: list[Record]) -> None:
        self.txn = txn
        self.records = records
        self.problems: list[str] = []
        self.in_file: dict[str, set[str]] = {"plan": set(), "role": set(), "identity": set()}
        for r in records:
            if r.kind == "role":
                self.in_file["role"].add(r.record.name)  # type: ignore[attr-defined]
            elif r.kind in self.in_file:
                self.in_file[r.kind].add(r.id)

    def problem(self, r: Record, text: str) -> None:
        self.problems.append(f"line {r.line}: {r.kind} {r.id}: {text}")

    def _exists(self, kind: str, ref: str) -> bool:
        if ref in self.in_file[kind]:
            return True
        if kind == "role":
            return self.txn.get(Table.ROLE_NAMES, ref.encode()) is not None
        table = Table.PLANS if kind == "plan" else Table.IDENTITIES
        return self.txn.get(table, ref.encode()) is not None

    def _references(self, r: Record) -> None:
        rec: Any = r.record
        plan_id = getattr(rec, "plan_id", None)
        if plan_id is not None and not self._exists("plan", plan_id):
            self.problem(r, f"names plan {plan_id}, which is neither in the file nor here")
        if isinstance(rec, KeyRecord):
            if rec.identity_id is not None and not self._exists("identity", rec.identity_id):
                self.problem(
                    r, f"names identity {rec.identity_id}, which is neither in the file nor here"
                )
            for name in rec.roles:
                if not self._exists("role", name):
                    self.problem(r, f"names role {name!r}, which is neither in the file nor here")

    def _index_owner(self, table: Table, key: bytes, r: Record, what: str) -> None:
        owner = self.txn.get(table, key)
        if owner is not None and owner.decode() != r.id:
            self.problem(r, f"its {what} belongs to {owner.decode()} here")

    def _unique(self, r: Record) -> None:
        rec: Any = r.record
        if isinstance(rec, KeyRecord):
            table = Table.KEY_SHA256 if rec.digest_version == SHA256_VERSION else Table.KEY_DIGESTS
            self._index_owner(table, rec.digest, r, "digest")
        elif isinstance(rec, IdentityRecord):
            self._index_owner(
                Table.IDENTITY_EXTERNAL_IDS, rec.external_id.encode(), r, "external_id"
            )
        elif isinstance(rec, RoleRecord):
            self._index_owner(Table.ROLE_NAMES, rec.name.encode(), r, f"name {rec.name!r}")
        elif isinstance(rec, PlanRecord):
            for _, raw in self.txn.scan(Table.PLANS):
                other = codec.plan.decode(raw)
                if other.name == rec.name and other.id != rec.id:
                    self.problem(r, f"a plan named {rec.name!r} is {other.id} here")

    def _duplicates(self) -> None:
        seen: dict[tuple[str, Any], int] = {}
        for r in self.records:
            rec: Any = r.record
            keys: list[tuple[str, Any]] = [(r.kind, r.id)]
            if isinstance(rec, KeyRecord):
                keys.append(("digest", rec.digest))
            elif isinstance(rec, IdentityRecord):
                keys.append(("external_id", rec.external_id))
            elif isinstance(rec, PlanRecord | RoleRecord):
                keys.append((f"{r.kind} name", rec.name))
            for k in keys:
                if k in seen:
                    self.problem(r, f"its {k[0]} is on line {seen[k]} too")
                else:
                    seen[k] = r.line

    def _usage_owners(self) -> set[str]:
        owners: set[str] = set()
        for r in self.records:
            if isinstance(r.record, KeyRecord):
                owners.update((r.record.id, r.record.state_key))
            elif isinstance(r.record, IdentityRecord):
                owners.add(r.record.id)
        return owners

    def decide(self) -> list[_Decision]:
        self._duplicates()
        owners = self._usage_owners()
        out: list[_Decision] = []
        for r in self.records:
            old = read_record(self.txn, r.kind, r.id)
            if r.kind == "usage":
                if r.id not in owners:
                    self.problem(r, "no key or identity of the file keeps its usage here")
                out.append(_Decision(r, "created" if old is None else "unchanged", old, None))
                continue
            self._references(r)
            self._unique(r)
            if isinstance(old, RoleRecord) and old.name != r.record.name:  # type: ignore[attr-defined]
                self.problem(r, f"is named {old.name!r} here: rename it with `roles patch` first")
            if old is None:
                out.append(_Decision(r, "created", None, r.record))
            elif _same(old, r.record) or _ended_here(old, r.record):
                out.append(_Decision(r, "unchanged", old, None))
            else:
                out.append(_Decision(r, "updated", old, _forwards(r.record, old)))
        return out


# ---- writing ----------------------------------------------------------------------


def _put_key(txn: WriteTxn, old: KeyRecord | None, new: KeyRecord) -> None:
    kid = new.id.encode()
    if old is not None:
        if old.digest != new.digest:
            table = Table.KEY_SHA256 if old.digest_version == SHA256_VERSION else Table.KEY_DIGESTS
            if txn.get(table, old.digest) == kid:
                txn.delete(table, old.digest)
        if old.owner_tag != new.owner_tag:
            txn.delete(Table.KEY_OWNERS, old.owner_tag + kid)
    txn.put(Table.KEYS, kid, codec.encode(new))
    # A SHA-256-imported key is indexed where only that look-up finds it
    # (``keysha256``), never in KEY_DIGESTS.
    digests = Table.KEY_SHA256 if new.digest_version == SHA256_VERSION else Table.KEY_DIGESTS
    txn.put(digests, new.digest, kid)
    txn.put(Table.KEY_OWNERS, new.owner_tag + kid, b"")
    index_key(txn, old, new)


def _put_identity(txn: WriteTxn, old: IdentityRecord | None, new: IdentityRecord) -> None:
    iid = new.id.encode()
    if old is not None and old.external_id != new.external_id:
        txn.delete(Table.IDENTITY_EXTERNAL_IDS, old.external_id.encode())
    txn.put(Table.IDENTITIES, iid, codec.encode(new))
    txn.put(Table.IDENTITY_EXTERNAL_IDS, new.external_id.encode(), iid)
    old_plan = None if old is None else old.plan_id
    if old_plan != new.plan_id:
        if old_plan is not None:
            remove_member(txn, Table.PLAN_MEMBERS, old_plan, new.id)
        if new.plan_id is not None:
            add_member(txn, Table.PLAN_MEMBERS, new.plan_id, new.id)


def _apply(txn: WriteTxn, decisions: Iterable[_Decision], actor: Actor, now: float) -> None:
    for d in decisions:
        kind = d.record.kind
        if kind == "usage":
            if d.outcome == "created":
                txn.put(Table.USAGE, d.record.id.encode(), codec.encode(d.record.record))
            continue
        if d.new is None:
            continue
        if isinstance(d.new, KeyRecord):
            _put_key(txn, d.old, d.new)
        elif isinstance(d.new, IdentityRecord):
            _put_identity(txn, d.old, d.new)
        elif isinstance(d.new, RoleRecord):
            txn.put(Table.ROLES, d.new.id.encode(), codec.encode(d.new))
            txn.put(Table.ROLE_NAMES, d.new.name.encode(), d.new.id.encode())
        else:
            txn.put(Table.PLANS, d.record.id.encode(), codec.encode(d.new))
        append_audit(
            txn,
            actor=actor,
            action=f"{kind}.import",
            target_id=d.record.id,
            now=now,
            details={"via": "export-file", "outcome": d.outcome},
        )


def _report(decisions: list[_Decision], dry_run: bool) -> ImportReport:
    changes = [
        Change(type=d.record.kind, id=d.record.id, outcome=d.outcome, line=d.record.line)  # type: ignore[arg-type]
        for d in decisions
        if d.record.kind != "usage"
    ]
    return ImportReport(
        dry_run=dry_run,
        created=sum(c.outcome == "created" for c in changes),
        updated=sum(c.outcome == "updated" for c in changes),
        unchanged=sum(c.outcome == "unchanged" for c in changes),
        usage_written=sum(d.record.kind == "usage" and d.outcome == "created" for d in decisions),
        changes=changes,
    )


def _decide(txn: ReadTxn, parsed: ParsedFile) -> list[_Decision]:
    planner = _Planner(txn, parsed.records)
    decisions = planner.decide()
    if planner.problems:
        raise refused(planner.problems)
    return decisions


async def import_records(
    store: Store, parsed: ParsedFile, actor: Actor, *, clock: Clock, dry_run: bool = False
) -> ImportReport:
    """Import ``parsed`` (its secrets checked by the caller: ``check_secrets``)."""
    if dry_run:
        with store.read() as txn:
            return _report(_decide(txn, parsed), True)
    now = clock()

    def fn(txn: WriteTxn) -> list[_Decision]:
        decisions = _decide(txn, parsed)
        _apply(txn, decisions, actor, now)
        return decisions

    return _report(await store.write(fn), False)
