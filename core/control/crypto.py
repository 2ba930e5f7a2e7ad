"""Server secrets: the HMAC keyring that digests keys, and the AES-GCM keyring
that seals sensitive record fields. Both are versioned so they can rotate.

Where they come from, in order:
* ``TRIOGATE_HMAC_SECRET``: comma-separated ``[version:]secret`` (at least 32
  bytes each; a bare secret is version 1);
* ``TRIOGATE_ENCRYPTION_KEYS``: comma-separated ``version:base64(32 bytes)``;
* otherwise ``data_dir/secrets`` (JSON, mode 0600), generated once on first
  start and read by every later process, the CLI included. Only the very
  first start of a data directory generates it (``core/datadir.py`` decides):
  a store whose secrets file went missing refuses to start instead.

``ServerSecrets.fingerprints`` identifies the secrets without revealing them
(an HMAC of a constant under each one): the store keeps them, so a start with
the wrong secrets is caught before a single key fails to validate.

A running process picks up versions another process added to the file
(``triogate secrets rotate-hmac``) without a restart: ``refresh`` re-reads the
file (a reload calls it), and ``refresh_if_changed`` does so when the file's
inode, mtime or size changed, looking (one ``stat()``) at most once per
``RECHECK_SECONDS``; a key lookup calls it on a digest miss, so a flood of
unknown keys costs one ``stat()`` a second and never a read per request. The
read is synchronous, on the event loop: the file is a few hundred bytes of
JSON on a local disk, cheaper than handing it to a thread. A refresh only
ever *adds* versions: a file that went missing, does not parse, dropped a
version or holds other secrets is not taken (logged once per change of the
file); nothing is ever generated again.

The highest version is *current*: it digests new keys and seals new records.
Older versions stay valid for validation and decryption, so adding a version
never invalidates an existing key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from triogate.errors import SecretsError, SecretsMissing

__all__ = [
    "FileSignature",
    "HmacKeyring",
    "Sealer",
    "ServerSecrets",
    "compare_fingerprints",
    "environment_complete",
    "file_signature",
    "fingerprint",
    "load_secrets",
    "secrets_file",
]

log = logging.getLogger("triogate.control.crypto")

#: What tells a changed secrets file apart: (inode, mtime in ns, size).
#: ``rotate-hmac`` replaces the file (a new inode), so even an edit within
#: the file system's mtime granularity is seen.
FileSignature = tuple[int, int, int]

_SEAL_MAGIC = 1  # first byte of a sealed blob: format version
# NUL bytes never occur in a key or an owner tag's input: a fingerprint can
# never equal a digest the store holds.
_FINGERPRINT_INPUT = b"\x00triogate secrets fingerprint\x00v1"


def fingerprint(secret: bytes) -> str:
    """Names ``secret`` without revealing it: HMAC-SHA256 of a constant under
    it, 16 bytes in hex. Equal secrets, equal fingerprints."""
    return hmac.new(secret, _FINGERPRINT_INPUT, hashlib.sha256).hexdigest()[:32]


def compare_fingerprints(
    known: dict[str, dict[int, str]], given: dict[str, dict[int, str]]
) -> str | None:
    """Why ``given`` secrets are not the ``known`` ones, or None when they are
    (every version both know agrees, and each kind shares one)."""
    for kind, label in (("hmac", "HMAC secret"), ("encryption", "encryption key")):
        mine, theirs = known.get(kind, {}), given.get(kind, {})
        common = sorted(set(mine) & set(theirs))
        for version in common:
            if mine[version] != theirs[version]:
                return f"{label} version {version} differs"
        if mine and not common:
            return f"no {label} version in common"
    return None


def file_signature(path: Path) -> FileSignature | None:
    """``path``'s (inode, mtime, size), or None when it cannot be stat()ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class HmacKeyring:
    """HMAC-SHA256 under versioned secrets. Digesting copies a precomputed
    HMAC object (cheaper than keying a new one per call)."""

    def __init__(self, versions: Mapping[int, bytes]) -> None:
        if not versions:
            raise SecretsError("no HMAC secret")
        self._bases = {v: hmac.new(s, digestmod=hashlib.sha256) for v, s in versions.items()}
        self.fingerprints = {v: fingerprint(s) for v, s in versions.items()}
        self.current = max(versions)
        # Newest first: validation tries the current version, then older ones.
        self.versions = tuple(sorted(versions, reverse=True))

    def __repr__(self) -> str:
        return f"<HmacKeyring versions={list(self.versions)} current={self.current}>"

    def digest(self, value: str, version: int | None = None) -> bytes:
        h = self._bases[self.current if version is None else version].copy()
        h.update(value.encode())
        return h.digest()

    def tag(self, purpose: str, value: str, version: int | None = None) -> bytes:
        """A keyed blind index of ``value``: equal inputs give equal tags, and
        nobody without the secret can invert or precompute them."""
        return self.digest(f"{purpose}\x00{value}", version)[:16]


class Sealer:
    """AES-256-GCM with a versioned key ring. A sealed blob is
    ``magic(1) | version(2) | nonce(12) | ciphertext+tag``; the record id is the
    associated data, so a blob cannot be moved onto another record."""

    def __init__(self, keys: Mapping[int, bytes]) -> None:
        if not keys:
            raise SecretsError("no encryption key")
        for v, k in keys.items():
            if len(k) != 32:
                raise SecretsError(f"encryption key version {v} must be 32 bytes, got {len(k)}")
        # One AESGCM object per key, reused: a new object per call doubles the cost.
        self._aead = {v: AESGCM(k) for v, k in keys.items()}
        self.fingerprints = {v: fingerprint(k) for v, k in keys.items()}
        self.current = max(keys)

    def __repr__(self) -> str:
        return f"<Sealer versions={sorted(self._aead)} current={self.current}>"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        ct = self._aead[self.current].encrypt(nonce, plaintext, aad)
        return bytes([_SEAL_MAGIC]) + self.current.to_bytes(2, "big") + nonce + ct

    def open(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < 15 or blob[0] != _SEAL_MAGIC:
            raise SecretsError("not a sealed blob")
        version = int.from_bytes(blob[1:3], "big")
        aead = self._aead.get(version)
        if aead is None:
            raise SecretsError(f"sealed with unknown encryption key version {version}")
        try:
            return aead.decrypt(blob[3:15], blob[15:], aad)
        except InvalidTag as exc:
            raise SecretsError("sealed blob failed authentication") from exc


class ServerSecrets:
    """The keyrings in use, and where they were read from. ``hmac`` and
    ``sealer`` are replaced (never mutated) by a refresh: whoever needs them
    reads the attribute at each use."""

    #: A digest miss looks at the secrets file at most this often.
    RECHECK_SECONDS: ClassVar[float] = 1.0

    def __init__(
        self,
        hmac_keys: HmacKeyring,
        sealer: Sealer,
        source: str,
        *,
        data_dir: Path | None = None,
        signature: FileSignature | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hmac = hmac_keys
        self.sealer = sealer
        self.source = source
        # Where a refresh reads from; None when nothing came from a file
        # (both secrets from the environment): nothing to pick up then.
        self.data_dir = data_dir
        self.signature = signature  # the file as last read (or looked at)
        # Spaces the looks at the file (tests move it by hand).
        self.monotonic = monotonic
        self._next_check = -math.inf

    def __repr__(self) -> str:
        return f"<ServerSecrets from {self.source} {self.hmac!r} {self.sealer!r}>"

    def fingerprints(self) -> dict[str, dict[int, str]]:
        """Per kind (``hmac``, ``encryption``), version -> fingerprint."""
        return {"hmac": dict(self.hmac.fingerprints), "encryption": dict(self.sealer.fingerprints)}

    def refresh_if_changed(self) -> bool:
        """``refresh`` if the secrets file changed since it was last read,
        looking at most once per ``RECHECK_SECONDS`` (one ``stat()``). True
        when new versions were taken."""
        if self.data_dir is None:
            return False
        now = self.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.RECHECK_SECONDS
        if file_signature(secrets_file(self.data_dir)) == self.signature:
            return False
        return self.refresh()

    def refresh(self) -> bool:
        """Re-read the secrets and take the versions added since (``triogate
        secrets rotate-hmac`` from another process): True when there were
        any. Secrets that went missing, do not parse, lost a version or are
        not these ones are not taken (logged); the ones in use stay, and the
        next start refuses them (``core/control/datadir.py``)."""
        if self.data_dir is None:
            return False
        try:
            fresh = load_secrets(self.data_dir, create=False)
        except SecretsError as exc:
            # Looked at again once it changes, not at every miss.
            self.signature = file_signature(secrets_file(self.data_dir))
            log.error("keeping the secrets in use: %s", exc)
            return False
        # As looked at before the read: a change in between is seen next time.
        self.signature = fresh.signature
        mine, theirs = self.fingerprints(), fresh.fingerprints()
        why = compare_fingerprints(mine, theirs)
        if why is None:
            lost = {k: sorted(set(mine[k]) - set(theirs[k])) for k in mine}
            if any(lost.values()):
                why = f"versions {lost} are gone"
        if why is not None:
            log.error(
                "keeping the secrets in use: %s are not the same secrets (%s)", fresh.source, why
            )
            return False
        if theirs == mine:
            return False
        self.hmac = fresh.hmac
        self.sealer = fresh.sealer
        log.info(
            "secrets: HMAC versions %s (current %d), encryption versions %s (current %d)",
            sorted(fresh.hmac.versions),
            fresh.hmac.current,
            sorted(fresh.sealer.fingerprints),
            fresh.sealer.current,
        )
        return True


def _parse_versioned(raw: str, *, what: str, decode: bool) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for i, part in enumerate(p.strip() for p in raw.split(",") if p.strip()):
        version_s, sep, value = part.partition(":")
        if sep and version_s.isdigit():
            version = int(version_s)
        elif decode:
            raise SecretsError(f"{what}: entry {i + 1} must look like 'version:base64'")
        else:
            version, value = 1 if i == 0 else i + 1, part
        if not 1 <= version <= 65535:
            raise SecretsError(f"{what}: version {version} out of range 1..65535")
        if decode:
            try:
                secret = base64.b64decode(value, validate=True)
            except ValueError as exc:
                raise SecretsError(f"{what}: version {version} is not valid base64") from exc
        else:
            secret = value.encode()
            if len(secret) < 32:
                raise SecretsError(f"{what}: version {version} must be at least 32 bytes")
        out[version] = secret
    if not out:
        raise SecretsError(f"{what} is empty")
    return out


def _write_private(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as JSON to a temp file beside ``path``, mode 0600, synced."""
    tmp = path.with_name(f".secrets.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _generate_file(path: Path) -> None:
    doc = {
        "hmac": {"1": base64.b64encode(secrets.token_bytes(32)).decode()},
        "encryption": {"1": base64.b64encode(AESGCM.generate_key(256)).decode()},
    }
    tmp = _write_private(path, doc)
    try:
        # link() fails if another process created the file first: theirs wins,
        # so every process of one data dir agrees on the same secrets.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _read_file(path: Path) -> tuple[dict[int, bytes], dict[int, bytes]]:
    try:
        doc = json.loads(path.read_text())
        hmac_keys = {int(v): base64.b64decode(s) for v, s in doc["hmac"].items()}
        enc_keys = {int(v): base64.b64decode(s) for v, s in doc["encryption"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SecretsError(f"cannot read secrets file {path}: {exc}") from exc
    return hmac_keys, enc_keys


def secrets_file(data_dir: Path) -> Path:
    return data_dir / "secrets"


def environment_complete(environ: Mapping[str, str] | None = None) -> bool:
    """Both secrets come from the environment: no file is read or needed."""
    env = os.environ if environ is None else environ
    return bool(env.get("TRIOGATE_HMAC_SECRET") and env.get("TRIOGATE_ENCRYPTION_KEYS"))


def load_secrets(
    data_dir: Path, environ: Mapping[str, str] | None = None, *, create: bool = True
) -> ServerSecrets:
    """The secrets, from the environment or ``data_dir/secrets``. Without a
    file, ``create`` generates one; otherwise ``SecretsMissing`` is raised."""
    env = os.environ if environ is None else environ
    hmac_raw = env.get("TRIOGATE_HMAC_SECRET")
    enc_raw = env.get("TRIOGATE_ENCRYPTION_KEYS")
    if hmac_raw and enc_raw:
        return ServerSecrets(
            HmacKeyring(_parse_versioned(hmac_raw, what="TRIOGATE_HMAC_SECRET", decode=False)),
            Sealer(_parse_versioned(enc_raw, what="TRIOGATE_ENCRYPTION_KEYS", decode=True)),
            "environment",
        )
    path = secrets_file(data_dir)
    if not path.exists():
        if not create:
            raise SecretsMissing(f"the secrets file {path} is missing")
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _generate_file(path)
    signature = file_signature(path)  # before the read: a later change is seen
    file_hmac, file_enc = _read_file(path)
    hmac_keys = (
        _parse_versioned(hmac_raw, what="TRIOGATE_HMAC_SECRET", decode=False)
        if hmac_raw
        else file_hmac
    )
    enc_keys = (
        _parse_versioned(enc_raw, what="TRIOGATE_ENCRYPTION_KEYS", decode=True)
        if enc_raw
        else file_enc
    )
    return ServerSecrets(
        HmacKeyring(hmac_keys),
        Sealer(enc_keys),
        str(path),
        data_dir=data_dir,
        signature=signature,
    )


def add_hmac_version(data_dir: Path) -> int:
    """Rotate the file-based HMAC secret: add a new current version, keep the
    old ones (existing keys are re-indexed under the new one as they are used)."""
    path = secrets_file(data_dir)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SecretsMissing(
            f"the secrets file {path} is missing: nothing to rotate "
            "(with secrets from the environment, rotate them there)"
        ) from None
    except (OSError, ValueError) as exc:
        raise SecretsError(f"cannot read secrets file {path}: {exc}") from exc
    version = max(int(v) for v in doc["hmac"]) + 1
    doc["hmac"][str(version)] = base64.b64encode(secrets.token_bytes(32)).decode()
    os.replace(_write_private(path, doc), path)
    return version
