"""Key import (``control.keyimport``) over the in-memory store: the import
formats, each kind of item, idempotent re-import, conflicts, the SHA-256
index and its re-index at first use, and the CLI's file reading."""

from __future__ import annotations

import hashlib
import secrets
import string
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.conftest import FakeClock, make_config, make_secrets
from triogate.config import parse_config
from triogate.control.audit import Actor
from triogate.control.keyformat import ImportFormats, Keyspaces
from triogate.control.keyimport import KeyImporter, foreign_start
from triogate.control.keyimport_models import ImportResult
from triogate.control.keysha256 import RECHECK_SECONDS, SHA256_VERSION, Sha256Index
from triogate.control.models import CreateKeyRequest, RotateKeyRequest
from triogate.errors import ConfigError, KeyVerdict, ValidationError
from triogate.policy.userregex import RegexError
from triogate.runtime.cli_import import read_items
from triogate.runtime.gateway import Gateway
from triogate.storage import MemoryStore, Table, codec

ACTOR = Actor("adm_test", "127.0.0.1")
FORMAT = "^sk_live_[A-Za-z0-9]{24}$"
_ALNUM = string.ascii_letters + string.digits


def foreign() -> str:
    return "sk_live_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def gw(clock: FakeClock, tmp_path: Path) -> Gateway:
    gateway = Gateway(make_config(tmp_path), MemoryStore(), make_secrets(), clock=clock)
    gateway.keys.format = Keyspaces({"default": "tg_", "test": "test_"}, [FORMAT])
    return gateway


async def run(gw: Gateway, items: list[Any]) -> ImportResult:
    return await KeyImporter(gw.keys).run(items, ACTOR)


def item(**kw: Any) -> dict[str, Any]:
    return {"name": "svc", "owner": "acme", **kw}


def table(gw: Gateway, t: Table) -> dict[bytes, bytes]:
    store = gw.store
    assert isinstance(store, MemoryStore)
    return dict(store._tables[t].data)


# ---- the formats ------------------------------------------------------------------


def test_without_import_formats_the_check_is_the_formats_own() -> None:
    ks = Keyspaces({"default": "tg_"})
    assert ks.is_well_formed == ks.format().is_well_formed
    assert not ks.imports and not ks.imports.matches(foreign())


def test_import_formats_accept_whole_matches_of_bounded_printable_keys() -> None:
    ks = Keyspaces({"default": "tg_"}, [FORMAT, "acme-[0-9a-f]{32}"])
    assert ks.is_well_formed(ks.generate()) and ks.is_well_formed(foreign())
    assert ks.is_well_formed("acme-" + "0" * 32)
    assert not ks.is_well_formed("xacme-" + "0" * 32)  # whole key, even unanchored
    assert not ks.is_well_formed(foreign() + "x")
    assert not ks.is_well_formed("tg_garbage")
    assert ks.keyspace_of(foreign()) is None  # no keyspace's own format
    wide = ImportFormats((".*",))
    assert wide.matches("a" * 16) and not wide.matches("a" * 15)
    assert not wide.matches("a" * 513) and not wide.matches("é" * 20)
    assert not wide.matches("a b" * 8) and not wide.matches("a\tb" * 8)
    with pytest.raises(RegexError):
        ImportFormats(("(?<=a)b",))


def test_bad_import_formats_are_config_errors() -> None:
    def errors(formats: Any) -> dict[str, str]:
        with pytest.raises(ConfigError) as info:
            parse_config({"keys": {"import_formats": formats}}, environ={})
        return {e.path: e.message for e in info.value.errors}

    found = errors([FORMAT, "(", "(?<=a)b"])
    assert set(found) == {"keys.import_formats[1]", "keys.import_formats[2]"}
    assert "RE2" in found["keys.import_formats[1]"]
    assert "keys.import_formats" in errors(["a"] * 33)
    assert "keys.import_formats[0]" in errors(["a" * 513])
    assert "keys.import_formats[0]" in errors([""])
    config = parse_config({"keys": {"import_formats": [FORMAT]}}, environ={})
    assert config.keys.import_formats == [FORMAT]


def test_foreign_start_shows_the_readable_prefix_and_little_more() -> None:
    assert foreign_start("sk_live_ABCDEFGHIJKLMNOPQRSTUVWX") == "sk_live_ABCD"
    assert foreign_start("acme-0123456789abcdef0123") == "acme-012"
    assert foreign_start("0123456789abcdef") == "01"


# ---- importing --------------------------------------------------------------------


async def test_a_mixed_batch_imports_the_good_items(gw: Gateway) -> None:
    own, test_key, alien, hidden = gw.keys.format.generate(), "", foreign(), foreign()
    test_key = gw.keys.format.generate("test")
    result = await run(
        gw,
        [
            item(key=own, scopes=["users:read"]),
            item(key=test_key),
            item(key=alien, credits={"remaining": 5}),
            item(sha256=sha(hidden), start="sk_live_"),
            item(key="nope_" + "x" * 20),  # foreign, matching no format
            "not an object",
            item(),  # neither key nor sha256
            item(key=foreign(), sha256=sha("x")),  # both
            item(sha256="zz" * 32),
            item(key=foreign(), keyspace="nope"),
            item(key=own[:-1] + ("A" if own[-1] != "A" else "B")),  # bad checksum
            item(key=foreign(), identity_id="idn_01J000000000000000000000AA"),
            item(key=foreign(), bogus=1),
            item(key=gw.keys.format.generate(), keyspace="test"),  # default's format
            item(sha256=sha("y"), start="x" * 17),
            item(key=foreign(), start="sk_live_"),
        ],
    )
    assert [m.index for m in result.migrated] == [0, 1, 2, 3]
    assert not any(m.existing for m in result.migrated)
    failed = {f.index: f for f in result.failed}
    assert sorted(failed) == list(range(4, 16))
    assert {f.code for f in result.failed} == {"VALIDATION_ERROR"}
    paths = {i: [e.path for e in f.errors or []] for i, f in failed.items()}
    assert paths[4] == ["key"] and paths[5] == ["$"] and paths[6] == ["key"]
    assert paths[8] == ["sha256"] and paths[9] == ["keyspace"] and paths[10] == ["key"]
    assert paths[11] == ["identity_id"] and paths[12] == ["bogus"]
    assert paths[13] == ["keyspace"] and paths[14] == ["start"] and paths[15] == ["start"]
    assert "import_formats" in failed[4].detail

    ids = [m.id for m in result.migrated]
    views = [gw.keys.get(i) for i in ids]
    assert views[0].keyspace == "default" and views[0].scopes == ["users:read"]
    assert views[1].keyspace == "test"  # from its prefix
    assert views[2].start == alien[:12] and views[2].credits is not None
    assert views[3].start == "sk_live_"
    for key, key_id in ((own, ids[0]), (test_key, ids[1]), (alien, ids[2])):
        record, verdict, stale = gw.keys.validate_nowait(key)
        assert record is not None and record.id == key_id and verdict is None and not stale

    # Nothing of a plaintext is stored; one key.import audit entry per key.
    blob = b"".join(k + v for t in Table for k, v in table(gw, t).items())
    assert not any(k.encode() in blob for k in (own, test_key, alien, hidden))
    actions = [codec.audit.decode(v) for v in table(gw, Table.AUDIT).values()]
    imports = [a for a in actions if a.action == "key.import"]
    assert sorted(a.target_id or "" for a in imports) == sorted(ids)
    kinds = {a.target_id: a.details["kind"] for a in imports}
    assert kinds[ids[3]] == "sha256" and kinds[ids[2]] == "key"


async def test_batch_bounds(gw: Gateway) -> None:
    with pytest.raises(ValidationError):
        await run(gw, [])
    with pytest.raises(ValidationError):
        await run(gw, [item(key=foreign()) for _ in range(1001)])
    result = await run(gw, [item(key=foreign()) for _ in range(1000)])
    assert len(result.migrated) == 1000 and not result.failed


async def test_expiry_must_be_in_the_future_on_the_services_clock(
    gw: Gateway, clock: FakeClock
) -> None:
    clock.advance(10 * 365 * 86400)  # the service's clock, past the wall clock's
    result = await run(gw, [item(key=foreign(), expires_at="2030-01-01T00:00:00Z")])
    assert result.failed[0].errors and result.failed[0].errors[0].path == "expires_at"


async def test_reimport_is_idempotent_and_other_fields_conflict(gw: Gateway) -> None:
    own, alien, hidden = gw.keys.format.generate(), foreign(), foreign()
    items = [
        item(key=own, metadata={"a": 1, "b": 2}),
        item(key=alien),
        item(sha256=sha(hidden)),
    ]
    first = await run(gw, items)
    ids = [m.id for m in first.migrated]
    audits = len(table(gw, Table.AUDIT))

    # The same items (metadata keys in another order, hex in capitals).
    again = [
        item(key=own, metadata={"b": 2, "a": 1}),
        item(key=alien),
        item(sha256=sha(hidden).upper()),
    ]
    second = await run(gw, again)
    assert [m.id for m in second.migrated] == ids
    assert all(m.existing for m in second.migrated) and not second.failed
    assert len(table(gw, Table.AUDIT)) == audits  # a no-op logs nothing

    # Other fields: CONFLICT, and nothing changes.
    third = await run(gw, [item(key=own, name="other"), item(sha256=sha(hidden), owner="x")])
    assert [f.code for f in third.failed] == ["CONFLICT", "CONFLICT"]
    assert ids[0] in third.failed[0].detail and "other fields" in third.failed[0].detail
    assert gw.keys.get(ids[0]).name == "svc"

    # The same key twice in one batch: one key.
    twice = foreign()
    result = await run(gw, [item(key=twice), item(key=twice), item(key=twice, name="b")])
    assert result.migrated[0].id == result.migrated[1].id and result.migrated[1].existing
    assert result.failed[0].index == 2 and result.failed[0].code == "CONFLICT"

    # A revoked key stays revoked: its re-import answers its id.
    await gw.keys.revoke(ids[1], ACTOR)
    result = await run(gw, [item(key=alien)])
    assert result.migrated[0].id == ids[1] and result.migrated[0].existing
    assert gw.keys.validate_nowait(alien)[1] is KeyVerdict.KEY_REVOKED


async def test_a_key_made_here_is_a_conflict(gw: Gateway) -> None:
    created = await gw.keys.create(
        msgspec.convert(item(), CreateKeyRequest),
        ACTOR,
    )
    result = await run(gw, [item(key=created.key)])
    assert result.failed[0].code == "CONFLICT" and "made here" in result.failed[0].detail


async def test_a_sha256_key_is_found_then_reindexed_under_the_hmac(gw: Gateway) -> None:
    hidden = foreign()
    result = await run(gw, [item(sha256=sha(hidden), credits={"remaining": 3})])
    key_id = result.migrated[0].id
    record = codec.key.decode(table(gw, Table.KEYS)[key_id.encode()])
    assert record.digest_version == SHA256_VERSION and record.digest.hex() == sha(hidden)
    assert table(gw, Table.KEY_SHA256) == {record.digest: key_id.encode()}
    assert record.digest not in table(gw, Table.KEY_DIGESTS)

    found, stale = gw.keys.lookup_nowait(hidden)
    assert found is not None and found.id == key_id and stale
    assert gw.keys.lookup_nowait(foreign()) == (None, False)
    await gw.keys.reindex(hidden, key_id)

    assert table(gw, Table.KEY_SHA256) == {}
    record = codec.key.decode(table(gw, Table.KEYS)[key_id.encode()])
    assert record.digest_version == gw.secrets.hmac.current
    assert table(gw, Table.KEY_DIGESTS)[record.digest] == key_id.encode()
    found, stale = gw.keys.lookup_nowait(hidden)
    assert found is not None and found.id == key_id and not stale

    # Re-imported after its first use: still recognised, by its SHA-256 or plaintext.
    result = await run(gw, [item(sha256=sha(hidden), credits={"remaining": 3})])
    assert result.migrated[0].id == key_id and result.migrated[0].existing
    result = await run(gw, [item(key=hidden, credits={"remaining": 3})])
    assert result.migrated[0].id == key_id and result.migrated[0].existing


async def test_validate_reindexes_a_sha256_key(gw: Gateway) -> None:
    hidden = gw.keys.format.generate()
    key_id = (await run(gw, [item(sha256=sha(hidden))])).migrated[0].id
    result = await gw.keys.validate(hidden)
    assert result.valid and result.key_id == key_id
    assert table(gw, Table.KEY_SHA256) == {}


async def test_plaintext_reimport_of_a_sha256_key_reindexes_it(gw: Gateway) -> None:
    hidden, plain = foreign(), foreign()
    key_id = (await run(gw, [item(sha256=sha(hidden))])).migrated[0].id
    # And a plaintext import is recognised later by its SHA-256.
    plain_id = (await run(gw, [item(key=plain)])).migrated[0].id
    result = await run(gw, [item(key=hidden), item(sha256=sha(plain))])
    assert [m.id for m in result.migrated] == [key_id, plain_id]
    assert table(gw, Table.KEY_SHA256) == {}
    found, stale = gw.keys.lookup_nowait(hidden)
    assert found is not None and found.id == key_id and not stale
    assert found.start == hidden[:12]


async def test_a_purged_sha256_key_leaves_no_entry(gw: Gateway, clock: FakeClock) -> None:
    hidden = foreign()
    key_id = (await run(gw, [item(sha256=sha(hidden))])).migrated[0].id
    await gw.keys.rotate(key_id, RotateKeyRequest(grace_seconds=10), ACTOR)
    clock.advance(11)
    await gw.keys.cleanup(ACTOR)
    assert table(gw, Table.KEY_SHA256) == {}
    assert gw.keys.lookup_nowait(hidden) == (None, False)
    # Imported again: a new key (the old one is gone).
    result = await run(gw, [item(sha256=sha(hidden))])
    assert not result.migrated[0].existing and result.migrated[0].id != key_id


async def test_the_sha256_index_looks_only_while_imports_exist(gw: Gateway) -> None:
    now = [100.0]
    index = Sha256Index(gw.store, monotonic=lambda: now[0])
    assert not index.present()  # looked: the table is empty
    hidden = foreign()
    # Another process imports (this index is not told).
    other = Gateway(make_config(Path("unused")), gw.store, gw.secrets, clock=gw.keys._clock)
    other.keys.format = gw.keys.format
    await KeyImporter(other.keys).run([item(sha256=sha(hidden))], ACTOR)
    assert index.find(hidden) == (None, False)  # within RECHECK_SECONDS: not looked
    now[0] += RECHECK_SECONDS
    record, stale = index.find(hidden)
    assert record is not None and stale
    await gw.keys.reindex(hidden, record.id)
    assert index.present()  # until the next look
    now[0] += RECHECK_SECONDS
    assert not index.present()
    index.mark_present()
    assert index.present()


# ---- the CLI's file ---------------------------------------------------------------


def test_read_items_takes_an_array_or_json_lines() -> None:
    assert read_items('[{"a": 1}, 2]') == [{"a": 1}, 2]
    lines = read_items('{"a": 1}\n\n  \nnot json\n{"b": 2}\n')
    assert lines[0] == {"a": 1} and lines[2] == {"b": 2} and len(lines) == 3
    with pytest.raises(ValidationError):
        read_items("[1, 2")
    assert read_items("") == []


async def test_a_full_store_fails_the_chunk_and_nothing_else(gw: Gateway) -> None:
    from triogate.errors import StorageFull

    store = gw.store
    assert isinstance(store, MemoryStore)
    real_write = store.write
    calls = [0]

    async def write(fn: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:  # the second chunk
            raise StorageFull("storage is full (test)")
        return await real_write(fn)

    store.write = write  # type: ignore[method-assign]
    items = [item(key=foreign()) for _ in range(250)]
    result = await run(gw, [*items[:3], "bad", *items[3:]])
    assert {f.code for f in result.failed} == {"VALIDATION_ERROR", "STORAGE_FULL"}
    full = [f.index for f in result.failed if f.code == "STORAGE_FULL"]
    assert full == list(range(100, 200))
    assert len(result.migrated) == 150
