"""``triogate keys export`` / ``keys import`` of an export file, on real LMDB
data directories through the CLI's own ``main``: a round trip carries every
record and index byte for byte, a second import changes nothing, a dry run
writes nothing, other secrets and malformed files are refused with the line
and field at fault, and nothing ever prints a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import lmdb
import msgspec
import pytest

from triogate.control.keyexport_models import MIRRORS, RECORD_TYPES
from triogate.runtime.cli import main
from triogate.storage import codec

JSON = dict[str, Any]
#: Every table an import writes (the audit log aside: it gains entries).
TABLES = (
    b"keys",
    b"key_digests",
    b"key_owners",
    b"key_sha256",
    b"usage",
    b"identities",
    b"identity_external_ids",
    b"identity_keys",
    b"plans",
    b"plan_members",
    b"roles",
    b"role_names",
    b"role_members",
)


def cli(
    capsys: pytest.CaptureFixture[str], *args: str, stdin: str | None = None
) -> tuple[int, str, str]:
    if stdin is not None:
        import io
        import sys

        old, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        rc = main(list(args))
    finally:
        if stdin is not None:
            sys.stdin = old
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


def ok(capsys: pytest.CaptureFixture[str], *args: str, stdin: str | None = None) -> str:
    rc, out, err = cli(capsys, *args, stdin=stdin)
    assert rc == 0, (args, out, err)
    return out


def jok(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    return json.loads(ok(capsys, *args, "--json"))


def tables(data: Path, names: tuple[bytes, ...] = TABLES) -> dict[bytes, dict[bytes, bytes]]:
    env = lmdb.open(str(data / "lmdb"), readonly=True, lock=False, max_dbs=64)
    out: dict[bytes, dict[bytes, bytes]] = {}
    try:
        with env.begin() as txn:
            for name in names:
                try:
                    db = env.open_db(name, txn=txn, create=False)
                except lmdb.NotFoundError:
                    out[name] = {}
                    continue
                out[name] = dict(txn.cursor(db=db))
    finally:
        env.close()
    return out


_DECODERS = {
    b"keys": codec.key,
    b"usage": codec.usage,
    b"identities": codec.identity,
    b"plans": codec.plan,
    b"roles": codec.role,
}


def decoded(data: Path) -> dict[bytes, dict[bytes, Any]]:
    """The tables with their records decoded (a record re-encoded from the
    file may spell a number differently: 0 for 0.0, the same value)."""
    return {
        name: {k: _DECODERS[name].decode(v) if name in _DECODERS else v for k, v in rows.items()}
        for name, rows in tables(data).items()
    }


def audit_count(data: Path) -> int:
    return len(tables(data, (b"audit",))[b"audit"])


def populate(capsys: pytest.CaptureFixture[str], data: Path) -> JSON:
    """A source data directory with one of everything an export carries."""
    d = ("--data-dir", str(data))
    plan = jok(
        capsys,
        "plans",
        "create",
        *d,
        "--name",
        "gold",
        "--scope",
        "read",
        "--rate-limit",
        "p=100/60",
        "--credits",
        "1000",
    )
    role = jok(capsys, "roles", "create", *d, "--name", "writer", "--scope", "write")
    ident = jok(
        capsys,
        "identities",
        "create",
        *d,
        "--external-id",
        "cust-1",
        "--name",
        "Acme",
        "--metadata",
        '{"tier": "gold"}',
        "--plan",
        plan["id"],
        "--credits",
        "50",
    )
    main_key = jok(
        capsys,
        "keys",
        "create",
        *d,
        "--name",
        "main",
        "--owner",
        "alice",
        "--scope",
        "read",
        "--credits",
        "10",
        "--rate-limit",
        "burst=5/1",
        "--identity",
        ident["id"],
        "--plan",
        plan["id"],
        "--role",
        "writer",
        "--expires-at",
        "2099-01-01T00:00:00Z",
    )
    rotated = jok(capsys, "keys", "create", *d, "--name", "old", "--owner", "bob")
    rotation = jok(capsys, "keys", "rotate", *d, rotated["id"], "--grace-seconds", "3600")
    revoked = jok(capsys, "keys", "create", *d, "--name", "gone", "--owner", "carol")
    ok(capsys, "keys", "revoke", *d, revoked["id"])
    disabled = jok(capsys, "keys", "create", *d, "--name", "off", "--owner", "dan", "--disable")
    # A balance spent: the usage record (credits left) goes along.
    ok(capsys, "keys", "validate", *d, "--spend", "3", stdin=main_key["key"] + "\n")
    return {
        "plan": plan,
        "role": role,
        "identity": ident,
        "main": main_key,
        "rotation": rotation,
        "revoked": revoked,
        "disabled": disabled,
    }


def fresh_with_secrets_of(source: Path, target: Path) -> Path:
    target.mkdir()
    shutil.copy(source / "secrets", target / "secrets")
    return target


# ---- the format ----------------------------------------------------------------


def test_the_mirrors_cover_every_field_of_every_record() -> None:
    """A field added to a stored record is exported and imported with no
    change to the exporter: the mirrors are made from the records."""
    assert RECORD_TYPES and set(MIRRORS) == set(RECORD_TYPES)
    for kind, record_type in RECORD_TYPES.items():
        entry = MIRRORS[kind]
        assert entry.__struct_fields__ == record_type.__struct_fields__, kind
        assert entry.__struct_defaults__ == record_type.__struct_defaults__, kind


def test_round_trip_carries_every_record_and_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    made = populate(capsys, src)
    file = tmp_path / "keys.jsonl"
    out = ok(capsys, "keys", "export", "--data-dir", str(src), str(file))
    assert "keys.jsonl" in out and "key 5" in out
    text = file.read_text()
    # No plaintext key anywhere in the file.
    for k in (made["main"]["key"], made["rotation"]["new"]["key"]):
        assert k not in text
    assert file.stat().st_mode & 0o777 == 0o600
    header = json.loads(text.splitlines()[0])
    assert header["format"] == "triogate.keys" and header["version"] == 1
    counts = header["counts"]
    assert (counts["plan"], counts["role"], counts["identity"], counts["key"]) == (1, 1, 1, 5)
    assert counts["usage"] == len(tables(src)[b"usage"]) > 0

    fresh_with_secrets_of(src, dst)
    report = jok(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    assert (report["created"], report["updated"], report["unchanged"]) == (8, 0, 0)
    assert report["usage_written"] == header["counts"]["usage"] > 0
    assert decoded(dst) == decoded(src)
    # Exported again from the copy: the same records, line for line.
    again = tmp_path / "again.jsonl"
    ok(capsys, "keys", "export", "--data-dir", str(dst), str(again))
    assert again.read_text().splitlines()[1:] == text.splitlines()[1:]
    # The imported main key still carries its live state: 10 - 3 credits.
    usage = jok(capsys, "keys", "usage", "--data-dir", str(dst), made["main"]["id"])
    assert usage["credits_remaining"] == 7
    # Its plaintext validates in the copy (digests carried, secrets the same).
    verdict = json.loads(
        ok(
            capsys,
            "keys",
            "validate",
            "--data-dir",
            str(dst),
            "--json",
            stdin=made["main"]["key"] + "\n",
        )
    )
    assert verdict["valid"] is True and verdict["owner"] == "alice"


def test_a_second_import_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    populate(capsys, src)
    file = tmp_path / "keys.jsonl"
    ok(capsys, "keys", "export", "--data-dir", str(src), str(file))
    fresh_with_secrets_of(src, dst)
    ok(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    before, audits = tables(dst), audit_count(dst)
    out = ok(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    assert "0 created, 0 updated, 8 unchanged" in out
    assert "nothing changed" in out
    assert tables(dst) == before
    assert audit_count(dst) == audits  # no audit entry for nothing


def test_a_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    populate(capsys, src)
    file = tmp_path / "keys.jsonl"
    ok(capsys, "keys", "export", "--data-dir", str(src), str(file))
    fresh_with_secrets_of(src, dst)
    out = ok(capsys, "keys", "import", "--dry-run", "--data-dir", str(dst), str(file))
    assert out.startswith("dry run, nothing written:")
    assert "8 would be created" in out and "created  key" in out
    # Not even the store (marked with the secrets) is made.
    assert sorted(p.name for p in dst.iterdir()) == ["secrets"]
    # On a data directory with a store: no record, index or audit entry.
    ok(capsys, "roles", "create", "--data-dir", str(dst), "--name", "other", "--json")
    before, audits = tables(dst), audit_count(dst)
    out = ok(capsys, "keys", "import", "--dry-run", "--data-dir", str(dst), str(file))
    assert "8 would be created" in out
    assert tables(dst) == before and audit_count(dst) == audits


def test_an_import_is_audited(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    made = populate(capsys, src)
    file = tmp_path / "keys.jsonl"
    ok(capsys, "keys", "export", "--data-dir", str(src), str(file))
    fresh_with_secrets_of(src, dst)
    ok(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    page = jok(capsys, "audit", "list", "--data-dir", str(dst), "--action", "key.import")
    assert len(page["items"]) == 5
    assert {e["details"]["via"] for e in page["items"]} == {"export-file"}
    assert made["main"]["id"] in {e["target_id"] for e in page["items"]}
    plans = jok(capsys, "audit", "list", "--data-dir", str(dst), "--action", "plan.import")
    assert [e["details"]["outcome"] for e in plans["items"]] == ["created"]


def test_a_changed_record_is_updated_and_its_balance_restarts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file is the declared state: an edited key replaces the stored
    one; its changed credits get a newer credits version (the balance
    restarts from them, as a PATCH does); a second import is unchanged."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    made = populate(capsys, src)
    file = tmp_path / "keys.jsonl"
    ok(capsys, "keys", "export", "--data-dir", str(src), str(file))
    fresh_with_secrets_of(src, dst)
    ok(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    lines = file.read_text().splitlines()
    for i, line in enumerate(lines):
        doc = json.loads(line)
        if doc.get("id") == made["main"]["id"] and doc["type"] == "key":
            doc["record"]["name"] = "renamed"
            doc["record"]["credits"]["remaining"] = 99
            lines[i] = json.dumps(doc)
    file.write_text("\n".join(lines) + "\n")
    report = jok(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    assert (report["created"], report["updated"], report["unchanged"]) == (0, 1, 7)
    assert [c["id"] for c in report["changes"] if c["outcome"] == "updated"] == [made["main"]["id"]]
    key = jok(capsys, "keys", "get", "--data-dir", str(dst), made["main"]["id"])
    assert key["name"] == "renamed"
    usage = jok(capsys, "keys", "usage", "--data-dir", str(dst), made["main"]["id"])
    assert usage["credits_remaining"] == 99
    again = jok(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    assert (again["created"], again["updated"], again["unchanged"]) == (0, 0, 8)


def test_through_standard_output_and_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    populate(capsys, src)
    text = ok(capsys, "keys", "export", "--data-dir", str(src), "-")
    fresh_with_secrets_of(src, dst)
    out = ok(capsys, "keys", "import", "--data-dir", str(dst), "-", stdin=text)
    assert "standard input: 8 created" in out


def test_an_existing_file_is_not_overwritten_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    populate(capsys, src)
    file = tmp_path / "keys.jsonl"
    file.write_text("precious\n")
    rc, _, err = cli(capsys, "keys", "export", "--data-dir", str(src), str(file))
    assert rc == 1 and "--force" in err
    assert file.read_text() == "precious\n"
    ok(capsys, "keys", "export", "--data-dir", str(src), str(file), "--force")
    assert file.read_text().startswith('{"format":"triogate.keys"')


# ---- refusals --------------------------------------------------------------------


def test_other_secrets_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, other = tmp_path / "src", tmp_path / "other"
    populate(capsys, src)
    file = tmp_path / "keys.jsonl"
    ok(capsys, "keys", "export", "--data-dir", str(src), str(file))
    ok(capsys, "roles", "list", "--data-dir", str(other))  # a data dir with its own secrets
    rc, _, err = cli(capsys, "keys", "import", "--data-dir", str(other), str(file))
    assert rc == 1
    assert "exported with other secrets" in err and "HMAC secret version 1 differs" in err
    assert "nothing was imported" in err
    assert not tables(other)[b"keys"]


def test_a_data_dir_without_secrets_is_refused_before_it_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Opening it would generate new secrets and mark the store with them,
    and the right secrets copied in later would be refused for good."""
    src, new = tmp_path / "src", tmp_path / "new"
    populate(capsys, src)
    file = tmp_path / "keys.jsonl"
    ok(capsys, "keys", "export", "--data-dir", str(src), str(file))
    rc, _, err = cli(capsys, "keys", "import", "--data-dir", str(new), str(file))
    assert rc == 1 and "has no secrets file" in err and "Copy the source" in err
    assert not new.exists()


def _exported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, list[str]]:
    src = tmp_path / "src"
    populate(capsys, src)
    file = tmp_path / "keys.jsonl"
    ok(capsys, "keys", "export", "--data-dir", str(src), str(file))
    fresh_with_secrets_of(src, tmp_path / "dst")
    return file, file.read_text().splitlines()


def _key_line(lines: list[str]) -> int:
    return next(i for i, line in enumerate(lines) if json.loads(line).get("type") == "key")


def _set(line: str, path: tuple[str, ...], value: Any) -> str:
    doc = json.loads(line)
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda ls, k: [*ls[:k], "{not json", *ls[k + 1 :]], "line {n}: $"),
        (
            lambda ls, k: [*ls[:k], _set(ls[k], ("record", "digest_version"), "one"), *ls[k + 1 :]],
            "line {n}: $.record.digest_version: Expected `int`, got `str`",
        ),
        (
            lambda ls, k: [*ls[:k], _set(ls[k], ("record", "surprise"), 1), *ls[k + 1 :]],
            "line {n}: $.record: Object contains unknown field `surprise`",
        ),
        (
            lambda ls, k: [*ls[:k], _set(ls[k], ("type",), "gadget"), *ls[k + 1 :]],
            "line {n}: $.type",
        ),
        (
            lambda ls, k: [*ls[:k], _set(ls[k], ("id",), "key_other"), *ls[k + 1 :]],
            "line {n}: $.id",
        ),
        (
            lambda ls, k: [_set(ls[0], ("version",), 9), *ls[1:]],
            "line 1: $.version: format triogate.keys version 9",
        ),
        (
            lambda ls, k: [_set(ls[0], ("secrets",), "none"), *ls[1:]],
            "line 1: $.secrets",
        ),
    ],
)
def test_a_malformed_file_is_refused_at_its_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any, expected: str
) -> None:
    file, lines = _exported(tmp_path, capsys)
    k = _key_line(lines)
    file.write_text("\n".join(damage(lines, k)) + "\n")
    dst = tmp_path / "dst"
    rc, _, err = cli(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    assert rc == 1
    assert expected.format(n=k + 1) in err, err
    assert not (dst / "lmdb").exists()  # refused before the data directory is opened


def test_conflicts_refuse_the_whole_file_by_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A digest held by another key here, a reference to nothing, a record
    twice: every problem named, by line, and nothing written."""
    file, lines = _exported(tmp_path, capsys)
    dst = tmp_path / "dst"
    k = _key_line(lines)
    other = _set(
        _set(lines[k], ("id",), "key_01M8ZZZZZZZZZZZZZZZZZZZZZZ"),
        ("record", "id"),
        "key_01M8ZZZZZZZZZZZZZZZZZZZZZZ",
    )
    dangling = _set(lines[k + 1], ("record", "plan_id"), "pln_01M8ZZZZZZZZZZZZZZZZZZZZZZ")
    file.write_text("\n".join([*lines[: k + 1], dangling, *lines[k + 2 :], other, lines[k]]) + "\n")
    rc, _, err = cli(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    assert rc == 1 and err.startswith("CONFLICT: nothing was imported:")
    n = len(lines)
    assert f"line {k + 2}: key" in err and "names plan pln_01M8ZZZZZZZZZZZZZZZZZZZZZZ" in err
    assert f"line {n + 1}: key key_01M8ZZZZZZZZZZZZZZZZZZZZZZ: its digest is on line {k + 1}" in err
    assert f"line {n + 2}: key" in err and "its key is on line" in err
    assert not tables(dst)[b"keys"]
    # A digest another key of the data directory holds: refused too.
    file.write_text("\n".join(lines) + "\n")
    ok(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    file.write_text("\n".join([lines[0], other]) + "\n")
    rc, _, err = cli(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    assert rc == 1 and "line 2: key key_01M8ZZZZZZZZZZZZZZZZZZZZZZ: its digest belongs to" in err


def test_the_item_import_is_unchanged_and_has_no_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d"
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"key": "tg_" + "a" * 40, "name": "n", "owner": "o"}) + "\n")
    rc, _, err = cli(capsys, "keys", "import", "--dry-run", "--data-dir", str(data), str(items))
    assert rc == 1 and "--dry-run: only for a `triogate keys export` file" in err
    rc, out, err = cli(capsys, "keys", "import", "--data-dir", str(data), str(items))
    assert out.startswith("migrated ") or "failed" in out, (out, err)


def test_a_report_is_json_with_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file, _ = _exported(tmp_path, capsys)
    report = jok(capsys, "keys", "import", "--data-dir", str(tmp_path / "dst"), str(file))
    assert msgspec.json.decode(json.dumps(report)) == report
    assert {c["type"] for c in report["changes"]} == {"plan", "role", "identity", "key"}


def test_a_key_known_only_by_its_sha256_goes_along(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key imported by its SHA-256 and not used yet keeps that digest
    (version 0) and its own index: it validates in the new data directory,
    where its first use moves it under the HMAC."""
    import hashlib

    src, dst = tmp_path / "src", tmp_path / "dst"
    from triogate.control.keyformat import KeyFormat

    plaintext = KeyFormat("tg_").generate()
    items = tmp_path / "items.jsonl"
    digest = hashlib.sha256(plaintext.encode()).hexdigest()
    items.write_text(json.dumps({"sha256": digest, "name": "old", "owner": "o"}) + "\n")
    ok(capsys, "keys", "import", "--data-dir", str(src), str(items))
    assert len(tables(src)[b"key_sha256"]) == 1
    file = tmp_path / "keys.jsonl"
    ok(capsys, "keys", "export", "--data-dir", str(src), str(file))
    fresh_with_secrets_of(src, dst)
    ok(capsys, "keys", "import", "--data-dir", str(dst), str(file))
    assert tables(dst)[b"key_sha256"] == tables(src)[b"key_sha256"]
    assert not tables(dst)[b"key_digests"]
    verdict = json.loads(
        ok(capsys, "keys", "validate", "--data-dir", str(dst), "--json", stdin=plaintext)
    )
    assert verdict["valid"] is True
