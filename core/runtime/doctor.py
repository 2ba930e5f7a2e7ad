"""``triogate doctor``: check a data directory without serving it.

It reads; it never writes (no marker, no witness, no secrets file). The
checks, in order, each a finding (``ok``, ``warning``, ``error``):

1. the directory: there, a directory, writable by this user (a warning
   only: doctor may run as another user than the gateway);
2. the secrets: from the environment or a readable file, mode 0600;
3. ``data.mdb``'s header (``storage.lmdb_file``): meta pages, page size,
   every page the header names inside the file;
4. the records, walked in a **child process** with LMDB opened read-only:
   a page overwritten with garbage can make LMDB read past the end of the
   file (SIGBUS) or follow a wild pointer, and that must end the child, not
   the report. The child decodes every record of every table, opens every
   sealed field, checks the digest indexes both ways, and compares the
   marker with the secrets (``core/datadir.py``).

Exit status 0 when there is no error (warnings allowed), 1 otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec

from triogate.control.crypto import (
    ServerSecrets,
    environment_complete,
    load_secrets,
    secrets_file,
)
from triogate.control.datadir import (
    MARKER_KEY,
    WITNESS_FILE,
    Marker,
    compare_fingerprints,
    lmdb_path,
    read_witness,
)
from triogate.errors import DataDirError, SecretsError, StoreError
from triogate.storage import Table, codec
from triogate.storage.limits_file import limits_path
from triogate.storage.lmdb_file import DATA_FILE, inspect_data_file

__all__ = ["Finding", "diagnose", "main", "render"]

Level = Literal["ok", "warning", "error"]
WALK_TIMEOUT = 600.0
SHOWN = 3  # ids quoted per kind of problem


class Finding(msgspec.Struct, frozen=True):
    level: Level
    subject: str
    message: str


def _count(n: int, what: str = "record") -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _ids(ids: list[str]) -> str:
    shown = ", ".join(ids[:SHOWN])
    return shown + (f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else "")


# ---- the parent: files ------------------------------------------------------


def _check_directory(data_dir: Path) -> Iterator[Finding]:
    st = data_dir.stat()
    mode = stat.S_IMODE(st.st_mode)
    yield Finding("ok", "directory", f"{data_dir} (owner uid {st.st_uid}, mode {mode:04o})")
    if not os.access(data_dir, os.W_OK):
        yield Finding(
            "warning",
            "directory",
            f"not writable by this user (uid {os.geteuid()}): `triogate serve` as this "
            "user would refuse to start",
        )


def _check_secrets(data_dir: Path) -> tuple[ServerSecrets | None, list[Finding]]:
    path = secrets_file(data_dir)
    found: list[Finding] = []
    if not environment_complete() and path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            found.append(Finding("warning", "secrets", f"{path} has mode {mode:04o}, not 0600"))
    try:
        secrets = load_secrets(data_dir, create=False)
    except SecretsError as exc:
        level: Level = "warning" if not path.exists() else "error"
        found.append(Finding(level, "secrets", str(exc)))
        return None, found
    versions = (
        f"HMAC versions {sorted(secrets.hmac.versions)}, "
        f"encryption versions {sorted(secrets.sealer.fingerprints)}"
    )
    found.insert(0, Finding("ok", "secrets", f"from {secrets.source} ({versions})"))
    return secrets, found


def diagnose(data_dir: Path) -> list[Finding]:
    """Every finding about ``data_dir``, worst last is not promised: in check order."""
    findings: list[Finding] = []
    if not data_dir.exists():
        return [Finding("error", "directory", f"{data_dir} does not exist")]
    if not data_dir.is_dir():
        return [Finding("error", "directory", f"{data_dir} is not a directory")]
    findings.extend(_check_directory(data_dir))
    try:
        witness = read_witness(data_dir)
    except DataDirError as exc:
        findings.append(Finding("error", WITNESS_FILE, str(exc)))
        witness = None
    _, found = _check_secrets(data_dir)
    findings.extend(found)
    findings.extend(_check_limits(data_dir))
    try:
        header = inspect_data_file(lmdb_path(data_dir))
    except StoreError as exc:
        findings.append(Finding("error", "store", str(exc)))
        return findings
    if header is None:
        if witness is not None:
            findings.append(
                Finding(
                    "error",
                    "store",
                    f"{lmdb_path(data_dir) / DATA_FILE} is empty or missing, but this data "
                    f"directory held a store ({WITNESS_FILE}): restore it from a backup",
                )
            )
        else:
            findings.append(Finding("ok", "store", "no store yet: the first start makes one"))
        return findings
    page = header.page_size
    findings.append(
        Finding(
            "ok",
            "store",
            f"{DATA_FILE}: {header.file_size} bytes, {header.current.last_page + 1} pages of "
            f"{page} in use, map {header.current.map_size >> 20} MiB, "
            f"transaction {header.current.txnid}",
        )
    )
    findings.extend(_walk_in_child(data_dir, witness_id=witness.store_id if witness else None))
    return findings


def _check_limits(data_dir: Path) -> Iterator[Finding]:
    """The workers' shared limiter state (``limits/``): disposable, so at
    worst a warning (a start recreates it), never an error."""
    path = limits_path(data_dir)
    if not path.exists():
        return
    try:
        header = inspect_data_file(path) if path.is_dir() else None
        if not path.is_dir():
            raise StoreError(f"{path} is not a directory")
    except StoreError as exc:
        # Not "restore it from a backup": there is nothing to restore.
        what = str(exc).split("; restore", 1)[0]
        yield Finding("warning", "limits", f"{what}; the next start recreates it")
        return
    used = "empty" if header is None else f"{header.used_bytes} bytes in use"
    yield Finding("ok", "limits", f"{path} (the workers' shared limiter state): {used}")


def _walk_in_child(data_dir: Path, *, witness_id: str | None) -> list[Finding]:
    cmd = [
        sys.executable,
        "-m",
        "triogate.runtime.doctor",
        "--walk",
        str(data_dir),
        witness_id or "",
    ]
    try:
        done = subprocess.run(
            cmd, capture_output=True, timeout=WALK_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return [Finding("error", "records", f"walking the records took over {WALK_TIMEOUT:.0f}s")]
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        return [
            Finding(
                "error",
                "records",
                f"reading the records crashed the reader ({name}): pages inside {DATA_FILE} "
                "are damaged; restore the store from a backup",
            )
        ]
    try:
        return msgspec.json.decode(done.stdout, type=list[Finding])
    except msgspec.DecodeError:
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return [Finding("error", "records", f"the record walk failed: {last[0]}")]


# ---- the child: records -----------------------------------------------------


def _decoder_for(table: Table) -> Callable[[bytes], Any] | None:
    return {
        Table.KEYS: codec.key.decode,
        Table.USAGE: codec.usage.decode,
        Table.ADMINS: codec.admin.decode,
        Table.AUDIT: codec.audit.decode,
    }.get(table)


class _Walk:
    def __init__(self, data_dir: Path, witness_id: str | None) -> None:
        self.data_dir = data_dir
        self.witness_id = witness_id
        self.findings: list[Finding] = []
        try:
            self.secrets: ServerSecrets | None = load_secrets(data_dir, create=False)
        except SecretsError:
            self.secrets = None

    def add(self, level: Level, subject: str, message: str) -> None:
        self.findings.append(Finding(level, subject, message))

    def run(self) -> list[Finding]:
        import lmdb

        path = str(lmdb_path(self.data_dir))
        options: dict[str, Any] = {"readonly": True, "max_dbs": len(Table) + 4, "subdir": True}
        try:
            env = lmdb.open(path, lock=True, **options)
        except lmdb.Error:
            # A read-only directory or lock file: read without the lock (the
            # gateway should be stopped then, or the snapshot can tear).
            env = lmdb.open(path, lock=False, **options)
            self.add("warning", "store", "opened without its lock file: stop the gateway first")
        try:
            with env.begin(buffers=False) as txn:
                tables: dict[Table, dict[bytes, bytes]] = {}
                for table in Table:
                    try:
                        db = env.open_db(table.value, txn=txn, create=False)
                    except lmdb.NotFoundError:
                        self.add("warning", table.value.decode(), "table missing (never opened)")
                        tables[table] = {}
                        continue
                    tables[table] = dict(txn.cursor(db=db))
            self._records(tables)
            self._indexes(tables)
            self._marker(tables)
        except lmdb.Error as exc:
            self.add("error", "records", f"LMDB refused to read the store: {exc}")
        finally:
            env.close()
        return self.findings

    def _records(self, tables: dict[Table, dict[bytes, bytes]]) -> None:
        for table, rows in tables.items():
            name = table.value.decode()
            decode = _decoder_for(table)
            bad = []
            for key, raw in rows.items():
                if decode is None:
                    continue
                try:
                    record = decode(raw)
                except msgspec.DecodeError:
                    bad.append(key.decode(errors="replace"))
                    continue
                if getattr(record, "id", key.decode(errors="replace")) != key.decode(
                    errors="replace"
                ):
                    bad.append(key.decode(errors="replace"))
            if bad:
                self.add("error", name, f"{_count(len(bad))} do not decode: {_ids(bad)}")
            else:
                self.add("ok", name, _count(len(rows)) + (", all decode" if decode else ""))
        self._sealed(tables)

    def _sealed(self, tables: dict[Table, dict[bytes, bytes]]) -> None:
        if self.secrets is None:
            self.add("warning", "sealed", "no secrets: sealed fields not checked")
            return
        sealer = self.secrets.sealer
        failed = []
        count = 0
        for table, decode in ((Table.KEYS, codec.key.decode), (Table.ADMINS, codec.admin.decode)):
            for raw in tables[table].values():
                try:
                    record = decode(raw)
                except msgspec.DecodeError:
                    continue  # reported above
                count += 1
                try:
                    sealer.open(record.sealed, record.id.encode())
                except SecretsError:
                    failed.append(record.id)
        if failed:
            self.add(
                "error",
                "sealed",
                f"{len(failed)} sealed fields do not open with these secrets: {_ids(failed)}",
            )
        else:
            self.add("ok", "sealed", f"{count} sealed fields open")

    def _indexes(self, tables: dict[Table, dict[bytes, bytes]]) -> None:
        for records, index, what in (
            (Table.KEYS, Table.KEY_DIGESTS, "key"),
            (Table.ADMINS, Table.ADMIN_DIGESTS, "admin"),
        ):
            decode = codec.key.decode if records is Table.KEYS else codec.admin.decode
            digests = tables[index]
            unindexed = []
            for key, raw in tables[records].items():
                try:
                    record = decode(raw)
                except msgspec.DecodeError:
                    continue
                # A key imported by its SHA-256 (keysha256) is in KEY_SHA256
                # until its first use.
                if digests.get(record.digest) != key and (
                    records is not Table.KEYS or tables[Table.KEY_SHA256].get(record.digest) != key
                ):
                    unindexed.append(record.id)
            dangling = [
                v.decode(errors="replace") for v in digests.values() if v not in tables[records]
            ]
            name = index.value.decode()
            if unindexed:
                self.add(
                    "error",
                    name,
                    f"{len(unindexed)} {what}s are missing from the digest index and cannot "
                    f"authenticate: {_ids(unindexed)}",
                )
            if dangling:
                self.add(
                    "warning",
                    name,
                    f"{len(dangling)} entries name {what}s that no longer exist (left by "
                    "purged or re-indexed keys; harmless)",
                )
            if not unindexed and not dangling:
                self.add("ok", name, f"consistent with {records.value.decode()}")
        orphans = [k for k in tables[Table.KEY_OWNERS] if k[16:] not in tables[Table.KEYS]]
        if orphans:
            self.add("warning", "key_owners", f"{len(orphans)} entries name missing keys")

    def _marker(self, tables: dict[Table, dict[bytes, bytes]]) -> None:
        raw = tables[Table.META].get(MARKER_KEY)
        has_records = any(
            rows and (t is not Table.META or set(rows) - {MARKER_KEY}) for t, rows in tables.items()
        )
        if raw is None:
            if has_records:
                self.add(
                    "warning",
                    "marker",
                    "none yet (a store from before markers): the next start writes it",
                )
            elif self.witness_id is not None:
                self.add(
                    "error",
                    "marker",
                    f"the store is empty but {WITNESS_FILE} says this directory held one: "
                    "restore it from a backup",
                )
            return
        try:
            marker = msgspec.msgpack.decode(raw, type=Marker)
        except msgspec.DecodeError:
            self.add("error", "marker", "the data-directory marker does not decode")
            return
        made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(marker.created_at))
        if self.witness_id and self.witness_id != marker.store_id:
            self.add(
                "warning",
                "marker",
                f"store {marker.store_id}, but {WITNESS_FILE} names {self.witness_id}",
            )
        if self.secrets is None:
            self.add(
                "error",
                "marker",
                f"store {marker.store_id} (made {made}) has no secrets: restore the secrets file",
            )
            return
        why = compare_fingerprints(
            {"hmac": marker.hmac, "encryption": marker.encryption}, self.secrets.fingerprints()
        )
        if why is not None:
            self.add("error", "marker", f"the secrets are not this store's ({why})")
        else:
            self.add("ok", "marker", f"store {marker.store_id}, made {made}; the secrets match")


# ---- output ------------------------------------------------------------------


def render(data_dir: Path, findings: list[Finding]) -> str:
    lines = [f"triogate doctor: {data_dir}"]
    lines += [f"  {f.level:<8} {f.subject}: {f.message}" for f in findings]
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    verdict = "damaged" if errors else "healthy"
    lines.append(f"{verdict}: {errors} error(s), {warnings} warning(s)")
    return "\n".join(lines)


def main(data_dir: Path, *, as_json: bool = False) -> int:
    findings = diagnose(data_dir)
    if as_json:
        print(json.dumps([msgspec.structs.asdict(f) for f in findings], indent=2))
    else:
        print(render(data_dir, findings))
    return 1 if any(f.level == "error" for f in findings) else 0


if __name__ == "__main__":
    # The child of ``_walk_in_child``: ``--walk DATA_DIR WITNESS_ID``.
    if sys.argv[1:2] == ["--walk"] and len(sys.argv) == 4:
        found = _Walk(Path(sys.argv[2]), sys.argv[3] or None).run()
        sys.stdout.buffer.write(msgspec.json.encode(found))
        sys.exit(0)
    sys.exit(2)
