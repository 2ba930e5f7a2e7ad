"""The shape of an API key: ``prefix + body + checksum``.

* body: 256 random bits in base62, always 43 characters;
* checksum: CRC32 of ``prefix + body`` in base62, always 6 characters.

The checksum lets the gateway refuse a mistyped, truncated or made-up key
without touching storage (and lets secret scanners recognise leaked keys). It
is not a security feature: the HMAC digest lookup is.

Keyspaces (config ``[keyspaces.NAME]``, ``[keys] prefix`` being ``default``)
give several prefixes to one gateway: ``Keyspaces`` holds one ``KeyFormat``
per keyspace. A prefix has exactly one ``_``, at its end, so a key's prefix
is everything up to its first ``_``: one ``find`` and one dict lookup pick
the only format that can accept it, before any checksum or HMAC.

Imported keys (``POST /keys/import``, docs/metering.md) may be in a
*foreign* format: the config's ``[keys] import_formats``, regular
expressions compiled with RE2 (``policy.userregex``: linear time whatever
the pattern), joined into one alternation so a key costs one match however
many formats there are. A key in a keyspace's own format never reaches
them; with no import formats configured ``is_well_formed`` is exactly what
it was.
"""

from __future__ import annotations

import re
import secrets
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Final

from triogate.errors import ValidationError
from triogate.policy.userregex import LinearPattern, compile_linear

__all__ = [
    "BODY_LENGTH",
    "CHECKSUM_LENGTH",
    "DEFAULT_KEYSPACE",
    "MAX_IMPORTED_KEY_LENGTH",
    "MIN_IMPORTED_KEY_LENGTH",
    "ImportFormats",
    "KeyFormat",
    "Keyspaces",
]

_B62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_LENGTH: Final = 43  # 62**43 > 2**256
CHECKSUM_LENGTH: Final = 6  # 62**6 > 2**32
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,15}_$")
_MAX_PREFIX: Final = 17  # 16 characters and the "_"
DEFAULT_KEYSPACE: Final = "default"  # the config's too (``triogate.config``)
# A foreign key's length bounds (the config's too): shorter is too guessable
# to be worth importing, longer is not a key; both are refused before RE2.
MIN_IMPORTED_KEY_LENGTH: Final = 16
MAX_IMPORTED_KEY_LENGTH: Final = 512


def _b62(value: int, length: int) -> str:
    out = ["0"] * length
    for i in range(length - 1, -1, -1):
        value, rem = divmod(value, 62)
        out[i] = _B62[rem]
    return "".join(out)


# Two base62 digits at a time: the checksum is computed on every validation,
# and three table lookups cost a third of six divmods.
_PAIRS: Final = tuple(a + b for a in _B62 for b in _B62)


def _checksum(head: str) -> str:
    value = zlib.crc32(head.encode())
    hi, rest = divmod(value, 62**4)
    mid, lo = divmod(rest, 62**2)
    return _PAIRS[hi] + _PAIRS[mid] + _PAIRS[lo]


class KeyFormat:
    """Generates and checks keys for one prefix (``tg_`` for API keys,
    ``tgadm_`` for admin keys). Pure: no I/O, no state but the prefix."""

    __slots__ = ("_head_length", "length", "prefix")

    def __init__(self, prefix: str) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(
                f"key prefix {prefix!r} must be lowercase letters/digits ending in '_'"
            )
        self.prefix = prefix
        self.length = len(prefix) + BODY_LENGTH + CHECKSUM_LENGTH
        self._head_length = len(prefix) + BODY_LENGTH

    def __repr__(self) -> str:
        return f"KeyFormat(prefix={self.prefix!r})"

    def generate(self) -> str:
        head = self.prefix + _b62(secrets.randbits(256), BODY_LENGTH)
        return head + _checksum(head)

    def is_well_formed(self, key: str) -> bool:
        if len(key) != self.length or not key.startswith(self.prefix):
            return False
        # Base62 is exactly ASCII letters and digits: two C-level checks.
        if not (key.isascii() and key[len(self.prefix) :].isalnum()):
            return False
        head = key[: self._head_length]
        return secrets.compare_digest(key[self._head_length :], _checksum(head))

    def start(self, key: str) -> str:
        """A short, non-secret hint that lets people tell their keys apart."""
        return key[: len(self.prefix) + 4]


class ImportFormats:
    """The config's ``[keys] import_formats``: which foreign keys are looked
    up at all. Pure and immutable (a reload makes a new one)."""

    __slots__ = ("_joined", "patterns")

    def __init__(self, patterns: tuple[str, ...] = ()) -> None:
        """Raises ``policy.userregex.RegexError`` for a pattern RE2 refuses
        (the config checks them first, so a config error names it)."""
        self.patterns = patterns
        for source in patterns:
            compile_linear(source)  # each alone: the error names the bad one
        self._joined: LinearPattern | None = (
            compile_linear("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        )

    def __repr__(self) -> str:
        return f"ImportFormats({list(self.patterns)!r})"

    def __bool__(self) -> bool:
        return self._joined is not None

    def matches(self, key: str) -> bool:
        """Whether ``key`` is a foreign key some import format accepts: the
        whole key matches one pattern (anchors or not), and it is printable
        ASCII of an importable length."""
        joined = self._joined
        return (
            joined is not None
            and MIN_IMPORTED_KEY_LENGTH <= len(key) <= MAX_IMPORTED_KEY_LENGTH
            and key.isascii()
            and key.isprintable()
            and " " not in key
            and joined.fullmatch(key) is not None
        )


class Keyspaces:
    """The key formats of every configured keyspace, by name. Pure and
    immutable: a reload makes a new one (``KeyService.format`` is swapped).

    Where one ``KeyFormat`` was used, this is a drop-in: ``generate``
    (in ``default`` unless told), ``is_well_formed`` (any keyspace) and
    ``start``. A key of a keyspace no longer configured is malformed."""

    __slots__ = ("_by_name", "_by_prefix", "imports", "is_well_formed")

    #: Whether ``key`` is well formed in *some* configured keyspace, or
    #: matches an import format. With one keyspace and no import formats
    #: this is that format's own method: no extra cost at all.
    is_well_formed: Callable[[str], bool]

    def __init__(self, prefixes: Mapping[str, str], import_formats: Sequence[str] = ()) -> None:
        """``prefixes``: keyspace name -> prefix; must name ``default``.
        ``import_formats``: the config's ``[keys] import_formats``.
        Raises ValueError for a bad prefix, or one starting another, and
        ``RegexError`` (a ValueError) for a bad import format."""
        if DEFAULT_KEYSPACE not in prefixes:
            raise ValueError("the keyspace 'default' has no prefix")
        self._by_name = {name: KeyFormat(prefix) for name, prefix in prefixes.items()}
        self._by_prefix: dict[str, tuple[str, KeyFormat]] = {}
        for name, fmt in self._by_name.items():
            for other, (other_name, _) in self._by_prefix.items():
                if other.startswith(fmt.prefix) or fmt.prefix.startswith(other):
                    raise ValueError(
                        f"keyspaces {other_name!r} and {name!r}: prefixes "
                        f"{other!r} and {fmt.prefix!r} overlap"
                    )
            self._by_prefix[fmt.prefix] = (name, fmt)
        if len(self._by_name) == 1:
            own = self._by_name[DEFAULT_KEYSPACE].is_well_formed
        else:
            own = self._any_well_formed
        self.imports = ImportFormats(tuple(import_formats))
        if self.imports:
            foreign = self.imports.matches
            # Own format first: the common key pays one call more, no regex.
            self.is_well_formed = lambda key: own(key) or foreign(key)
        else:
            self.is_well_formed = own

    @classmethod
    def single(cls, prefix: str) -> Keyspaces:
        """Just the ``default`` keyspace, with ``prefix``."""
        return cls({DEFAULT_KEYSPACE: prefix})

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={f.prefix!r}" for n, f in self._by_name.items())
        if self.imports:
            inner += f", imports={list(self.imports.patterns)!r}"
        return f"Keyspaces({inner})"

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def prefixes(self) -> dict[str, str]:
        """Keyspace name -> prefix (a copy)."""
        return {name: fmt.prefix for name, fmt in self._by_name.items()}

    def format(self, keyspace: str = DEFAULT_KEYSPACE) -> KeyFormat:
        """The format of ``keyspace``; KeyError when it is not configured."""
        return self._by_name[keyspace]

    def prefix(self, keyspace: str = DEFAULT_KEYSPACE) -> str:
        """The prefix of ``keyspace``; KeyError when it is not configured."""
        return self._by_name[keyspace].prefix

    def require(self, keyspace: str, field: str = "keyspace") -> KeyFormat:
        """The format of ``keyspace``, or a 400 on ``field`` naming the
        configured ones (the admin API's answer to an unknown keyspace)."""
        fmt = self._by_name.get(keyspace)
        if fmt is None:
            known = ", ".join(sorted(self._by_name))
            raise ValidationError.single(
                field, f"unknown keyspace {keyspace[:64]!r}; configured: {known}"
            )
        return fmt

    def generate(self, keyspace: str = DEFAULT_KEYSPACE) -> str:
        """A new key in ``keyspace`` (KeyError when it is not configured)."""
        return self._by_name[keyspace].generate()

    def keyspace_of(self, key: str) -> str | None:
        """The keyspace ``key`` is well formed in, or None (malformed, or of
        a keyspace not configured)."""
        found = self._by_prefix.get(key[: key.find("_", 1, _MAX_PREFIX) + 1])
        if found is None or not found[1].is_well_formed(key):
            return None
        return found[0]

    def _any_well_formed(self, key: str) -> bool:
        # find() is -1 without a "_": the slice is then "" (no such prefix).
        found = self._by_prefix.get(key[: key.find("_", 1, _MAX_PREFIX) + 1])
        return found is not None and found[1].is_well_formed(key)

    def start(self, key: str) -> str:
        """``KeyFormat.start`` under the key's own prefix (the prefix and
        four characters), whichever keyspace it is of."""
        return key[: key.find("_", 1, _MAX_PREFIX) + 5]
