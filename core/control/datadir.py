"""Opening a data directory only when it is what it was.

A data directory holds a store (``lmdb/``) and, unless they come from the
environment, the secrets that make its records usable (``secrets``). Either
one alone is worse than nothing: a store without its secrets locks every key
out, and secrets with an empty store open ``/setup`` to anyone. So every
start (``serve``, and every CLI command that opens the store) settles the
directory first and refuses, with one sentence (``DataDirError``), anything
it cannot vouch for.

Theory of operation
-------------------
* **The marker.** The store's ``meta`` table holds ``b"datadir"``: a store id,
  when it was made, and the *fingerprints* of the secrets it was made with (an
  HMAC of a constant under each secret version: it names a secret and reveals
  nothing). Every start compares them with the secrets at hand: a version both
  know must have the same fingerprint, and each kind (HMAC, encryption) must
  share at least one version. Versions added since (``secrets rotate-hmac``)
  are added to the marker.
* **The witness.** ``data_dir/store.json`` (the store id and date, no secret)
  is written once a store with a marker exists. It is what tells an emptied or
  deleted ``data.mdb`` apart from a first start: a witness with no store, or
  with an empty store and no marker, is a store that went missing.
* **Settling** runs as one LMDB write transaction, so processes starting on
  the same directory at once (workers, a CLI command) take turns and agree:

  =====================  ==================  =====================================
  store                  secrets             outcome
  =====================  ==================  =====================================
  marker                 match               start (new versions recorded)
  marker                 differ / missing    refuse
  records, no marker     open its records    start; marker written (pre-marker store)
  records, no marker     fail / missing      refuse
  empty                  witness present     refuse (the store went missing)
  empty                  file or env         start; marker written (secrets provisioned)
  empty                  none                first start: secrets generated, marker
  =====================  ==================  =====================================

  A store from before markers is accepted when the secrets open one sealed
  admin and one sealed key record and reproduce that key's owner tag (that
  checks both the encryption key and the HMAC secret); it gets its marker
  then. A store with no sealed record at all is accepted as it is.
* The generated secrets file is linked in *inside* the transaction that
  writes the marker: a start killed half-way leaves no witness, so the next
  start finishes the job instead of refusing.
"""

from __future__ import annotations

import json
import logging
import os
import secrets as token
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec

from triogate.control.crypto import (
    ServerSecrets,
    compare_fingerprints,
    load_secrets,
    secrets_file,
)
from triogate.errors import DataDirError, SecretsError, SecretsMissing, StorageFull
from triogate.storage import LmdbStore, Table, WriteTxn, codec, open_lmdb_store
from triogate.storage.lmdb_file import DATA_FILE

__all__ = [
    "MARKER_KEY",
    "WITNESS_FILE",
    "Marker",
    "Witness",
    "compare_fingerprints",
    "lmdb_path",
    "open_data_dir",
    "read_witness",
]

log = logging.getLogger("triogate.control.datadir")

MARKER_KEY = b"datadir"
WITNESS_FILE = "store.json"
FORMAT = 1


class Marker(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    format: int
    store_id: str
    created_at: float
    hmac: dict[int, str]
    encryption: dict[int, str]


class Witness(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    format: int
    store_id: str
    created_at: float


_marker_decoder = msgspec.msgpack.Decoder(Marker)
_marker_encoder = msgspec.msgpack.Encoder()


def lmdb_path(data_dir: Path) -> Path:
    return data_dir / "lmdb"


def _date(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at))


def read_witness(data_dir: Path) -> Witness | None:
    path = data_dir / WITNESS_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=Witness)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:
        raise DataDirError(
            f"{path} cannot be read ({exc}): it names the store this data directory "
            "holds; if the store is intact, delete the file and start again"
        ) from exc


def _write_witness(data_dir: Path, marker: Marker) -> None:
    path = data_dir / WITNESS_FILE
    doc = {"format": FORMAT, "store_id": marker.store_id, "created_at": marker.created_at}
    tmp = path.with_name(f".{WITNESS_FILE}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise DataDirError(f"cannot write {path}: {exc.strerror}") from exc


def _store_missing(data_dir: Path, witness: Witness) -> DataDirError:
    store = lmdb_path(data_dir)
    return DataDirError(
        f"{data_dir} held a store made on {_date(witness.created_at)} but {store} is now "
        f"empty or missing: restore {store} from a backup (to start over on purpose, move "
        "the whole data directory away)"
    )


def _secrets_missing(data_dir: Path) -> DataDirError:
    return DataDirError(
        f"{data_dir} holds a store but not its secrets ({secrets_file(data_dir)} is missing "
        "and TRIOGATE_HMAC_SECRET / TRIOGATE_ENCRYPTION_KEYS are not set): restore the "
        "secrets file from a backup; new secrets would lock out every key"
    )


def _wrong_secrets(data_dir: Path, source: str, what: str) -> DataDirError:
    return DataDirError(
        f"the secrets from {source} are not the ones the store in {data_dir} was made with "
        f"({what}): use the right secrets file or environment; with these, no key would "
        "validate"
    )


def _has_records(txn: WriteTxn) -> bool:
    for table in Table:
        for key, _ in txn.scan(table):
            if table is Table.META and key == MARKER_KEY:
                continue
            return True
    return False


def _legacy_mismatch(txn: WriteTxn, secrets: ServerSecrets) -> str | None:
    """Why ``secrets`` cannot be this pre-marker store's, or None."""
    for _, raw in txn.scan(Table.ADMINS):
        admin = codec.admin.decode(raw)
        try:
            secrets.sealer.open(admin.sealed, admin.id.encode())
        except SecretsError:
            return f"admin {admin.id}'s sealed e-mail does not open"
        break
    for _, raw in txn.scan(Table.KEYS):
        key = codec.key.decode(raw)
        try:
            sealed: Any = msgspec.msgpack.decode(secrets.sealer.open(key.sealed, key.id.encode()))
        except SecretsError:
            return f"key {key.id}'s sealed owner does not open"
        version = key.owner_tag_version
        if (
            version in secrets.hmac.versions
            and isinstance(sealed, list)
            and sealed
            and secrets.hmac.tag("owner", str(sealed[0]), version) != key.owner_tag
        ):
            return f"key {key.id}'s owner tag does not match (HMAC version {version})"
        break
    return None


def _new_marker(secrets: ServerSecrets, now: float) -> Marker:
    fp = secrets.fingerprints()
    return Marker(FORMAT, token.token_hex(8), now, fp["hmac"], fp["encryption"])


def _settle(
    data_dir: Path,
    secrets: ServerSecrets | None,
    witness: Witness | None,
    dry: bool,
    txn: WriteTxn,
) -> tuple[ServerSecrets, Marker]:
    """Inside one write transaction (the LMDB writer lock is held): decide as
    the module docstring's table says; write the marker unless ``dry``."""
    if secrets is None:
        # Looked for again under the lock: another process may just have
        # made the first start (and the file) while this one was waiting.
        secrets = _resolve_secrets(data_dir)
    raw = txn.get(Table.META, MARKER_KEY)
    now = time.time()
    if raw is not None:
        try:
            marker = _marker_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise DataDirError(
                f"the store in {data_dir} is damaged: its data-directory marker does not "
                "decode; restore the store from a backup"
            ) from exc
        if secrets is None:
            raise _secrets_missing(data_dir)
        why = compare_fingerprints(
            {"hmac": marker.hmac, "encryption": marker.encryption}, secrets.fingerprints()
        )
        if why is not None:
            raise _wrong_secrets(data_dir, secrets.source, why)
        fp = secrets.fingerprints()
        updated = msgspec.structs.replace(
            marker,
            hmac={**marker.hmac, **fp["hmac"]},
            encryption={**marker.encryption, **fp["encryption"]},
        )
        if updated != marker and not dry:
            txn.put(Table.META, MARKER_KEY, _marker_encoder.encode(updated))
        return secrets, updated
    if _has_records(txn):
        if secrets is None:
            raise _secrets_missing(data_dir)
        why = _legacy_mismatch(txn, secrets)
        if why is not None:
            raise _wrong_secrets(data_dir, secrets.source, why)
        log.warning("%s: a store from before data-directory markers; marking it now", data_dir)
    elif witness is not None:
        raise _store_missing(data_dir, witness)
    elif secrets is None:
        # The first start. Generated here, under the writer lock, so that
        # every process starting on this directory now ends up with one file.
        secrets = load_secrets(data_dir, create=True)
        log.warning(
            "%s: generated new secrets in %s. BACK THIS FILE UP with the data "
            "directory: without it no key or admin in this store can be validated "
            "or read again",
            data_dir,
            secrets_file(data_dir),
        )
    marker = _new_marker(secrets, now)
    if not dry:
        txn.put(Table.META, MARKER_KEY, _marker_encoder.encode(marker))
    return secrets, marker


def _preflight(data_dir: Path) -> Witness | None:
    """What can be refused before anything is created or mapped."""
    if not data_dir.exists():
        try:
            data_dir.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        except OSError as exc:
            raise DataDirError(
                f"cannot create the data directory {data_dir}: {exc.strerror}"
            ) from exc
    else:
        if not data_dir.is_dir():
            raise DataDirError(f"the data directory {data_dir} is not a directory")
        if not os.access(data_dir, os.R_OK | os.W_OK | os.X_OK):
            raise DataDirError(
                f"the data directory {data_dir} is not writable by this user "
                f"(uid {os.geteuid()}): give it to the user the gateway runs as"
            )
    witness = read_witness(data_dir)
    data = lmdb_path(data_dir) / DATA_FILE
    if witness is not None and (not data.exists() or data.stat().st_size == 0):
        raise _store_missing(data_dir, witness)
    return witness


def _resolve_secrets(data_dir: Path) -> ServerSecrets | None:
    try:
        return load_secrets(data_dir, create=False)
    except SecretsMissing:
        return None


@asynccontextmanager
async def open_data_dir(
    data_dir: Path, *, map_size: int
) -> AsyncIterator[tuple[LmdbStore, ServerSecrets]]:
    """The store and its secrets, once the directory is settled; raises
    ``DataDirError`` (or ``StoreDamaged`` / ``StoreUnavailable`` from opening
    the store) with one sentence otherwise."""
    witness = _preflight(data_dir)
    secrets = _resolve_secrets(data_dir)
    async with open_lmdb_store(lmdb_path(data_dir), map_size=map_size) as store:

        def settle(txn: WriteTxn, dry: bool = False) -> tuple[ServerSecrets, Marker]:
            return _settle(data_dir, secrets, witness, dry, txn)

        dry = False
        try:
            found, marker = await store.write(settle)
        except StorageFull:
            # A full store still serves: check without recording anything.
            dry = True
            found, marker = await store.write(lambda txn: settle(txn, dry=True))
            log.warning("%s: the store is full; its marker was not updated", data_dir)
        if not dry and (witness is None or witness.store_id != marker.store_id):
            if witness is not None:
                log.warning(
                    "%s: the store is %s, not %s as recorded in %s: another store was put "
                    "in place (its secrets match)",
                    data_dir,
                    marker.store_id,
                    witness.store_id,
                    WITNESS_FILE,
                )
            _write_witness(data_dir, marker)
        yield store, found
