"""A damaged data directory (hole 8): the real ``triogate`` executable refuses
it with one sentence on stderr and exit status 1, and ``triogate doctor``
says what is wrong.

One data directory is made by a real ``triogate serve`` (``/setup``, a key)
and copied for each test, which then damages its copy the way an operator or
a disk would: an emptied, deleted, truncated or overwritten ``data.mdb``, a
deleted or foreign ``secrets`` file, a read-only directory. Also: a first
start on nothing still just works, a store from before the data-directory
marker still starts (and gets its marker), and ``check-config`` prints the
checksum of what it validated.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest

from tests.helpers_process import clean_env, run_cli, serving, triogate_command, write_config

SETUP = {"name": "root", "email": "root@example.com"}
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


@dataclass
class Made:
    data: Path  # the pristine data directory: copy it, never touch it
    admin_key: str
    key: str


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    root = tmp_path_factory.mktemp("made")
    data = root / "data"
    with serving(write_config(root / "made.toml", data)) as server, server.client() as c:
        r = c.post("/setup", json=SETUP)
        assert r.status_code == 201, r.text
        admin_key = r.json()["key"]
        r = c.post("/keys", json={"name": "k", "owner": "acme"}, headers=_bearer(admin_key))
        assert r.status_code == 201, r.text
        key = r.json()["key"]
        assert server.stop() == 0, server.stderr()
    return Made(data, admin_key, key)


@pytest.fixture
def copy(made: Made, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(made.data, data, symlinks=True)
    (data / "lmdb" / "lock.mdb").unlink(missing_ok=True)
    return data


def _serve_refused(data: Path, tmp_path: Path, *, env: dict[str, str] | None = None) -> str:
    """``triogate serve`` on ``data`` must exit 1 at once with one line on
    stderr, which is returned."""
    config = write_config(tmp_path / "serve.toml", data)
    done = run_cli("serve", "-c", str(config), env=env)
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    return _one_sentence(done.stderr)


def _one_sentence(stderr: str) -> str:
    """The refusal: one line, ``triogate: ...``; anything else on stderr may
    only be the start-up's INFO log lines (``serve`` logs before it opens
    the data directory)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    said = [line for line in lines if line.startswith("triogate: ")]
    assert len(said) == 1, stderr
    assert all(line in said or " INFO " in line for line in lines), stderr
    return said[0]


def _doctor(data: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("doctor", "--data-dir", str(data))


def _meta_pages_used(data: Path) -> tuple[int, int]:
    """(page size, pages in use) as LMDB itself reports them."""
    env = lmdb.open(str(data / "lmdb"), readonly=True, lock=False, max_dbs=16)
    try:
        return env.stat()["psize"], env.info()["last_pgno"] + 1
    finally:
        env.close()


# ---- the store goes missing or is damaged ----------------------------------------------


def test_an_emptied_data_mdb_is_refused_not_a_fresh_store(copy: Path, tmp_path: Path) -> None:
    (copy / "lmdb" / "data.mdb").write_bytes(b"")
    line = _serve_refused(copy, tmp_path)
    assert "empty or missing" in line and "restore" in line, line
    # Not silently a new store: nothing was created in its place.
    assert (copy / "lmdb" / "data.mdb").stat().st_size == 0
    assert _doctor(copy).returncode == 1


def test_a_deleted_store_is_refused(copy: Path, tmp_path: Path) -> None:
    shutil.rmtree(copy / "lmdb")
    assert "empty or missing" in _serve_refused(copy, tmp_path)
    assert not (copy / "lmdb").exists()


def test_a_truncated_data_mdb_is_one_sentence_not_a_sigbus(copy: Path, tmp_path: Path) -> None:
    path = copy / "lmdb" / "data.mdb"
    size = path.stat().st_size
    os.truncate(path, size // 2)
    line = _serve_refused(copy, tmp_path)
    assert "is truncated" in line and f"the file has {size // 2}" in line, line
    doctor = _doctor(copy)
    assert doctor.returncode == 1 and "is truncated" in doctor.stdout, doctor.stdout


@pytest.mark.parametrize("page", [0, 1])
def test_garbage_over_a_meta_page_is_refused(copy: Path, tmp_path: Path, page: int) -> None:
    psize, _ = _meta_pages_used(copy)
    with open(copy / "lmdb" / "data.mdb", "r+b") as f:
        f.seek(page * psize)
        f.write(b"\xa5" * psize)
    line = _serve_refused(copy, tmp_path)
    which = "first" if page == 0 else "second"
    assert f"its {which} meta page is not an LMDB meta page" in line, line
    assert _doctor(copy).returncode == 1


def test_overwritten_data_pages_are_refused_at_start_and_found_by_doctor(
    copy: Path, tmp_path: Path
) -> None:
    psize, used = _meta_pages_used(copy)
    with open(copy / "lmdb" / "data.mdb", "r+b") as f:
        f.seek(3 * psize)
        f.write(b"\x00" * (used - 3) * psize)
    line = _serve_refused(copy, tmp_path)
    assert "is damaged" in line and "restore it from a backup" in line, line
    doctor = _doctor(copy)
    assert doctor.returncode == 1, doctor.stdout
    assert "error    records:" in doctor.stdout, doctor.stdout


def test_doctor_survives_garbage_that_crashes_lmdb(copy: Path) -> None:
    # Random bytes over every data page: LMDB may report it or die on it
    # (the walk runs in a child process); doctor reports either way.
    psize, used = _meta_pages_used(copy)
    garbage = hashlib.shake_256(b"garbage").digest((used - 2) * psize)
    with open(copy / "lmdb" / "data.mdb", "r+b") as f:
        f.seek(2 * psize)
        f.write(garbage)
    doctor = _doctor(copy)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "Traceback" not in doctor.stdout + doctor.stderr
    assert "damaged: " in doctor.stdout


# ---- the secrets go missing or are not the store's ---------------------------------------


def test_deleted_secrets_are_refused_not_regenerated(copy: Path, tmp_path: Path) -> None:
    (copy / "secrets").unlink()
    line = _serve_refused(copy, tmp_path)
    assert "holds a store but not its secrets" in line, line
    assert not (copy / "secrets").exists(), "a new secrets file was made"
    # Every command that opens the data directory refuses the same way.
    for args in (["keys", "list"], ["keys", "create", "--name", "n", "--owner", "o"]):
        done = run_cli(*args, "--data-dir", str(copy))
        assert done.returncode == 1, done
        assert "holds a store but not its secrets" in _one_sentence(done.stderr)
    done = run_cli("secrets", "rotate-hmac", "--data-dir", str(copy))
    assert done.returncode == 1 and "not its secrets" in _one_sentence(done.stderr)
    assert not (copy / "secrets").exists()
    doctor = _doctor(copy)
    assert doctor.returncode == 1 and "restore the secrets file" in doctor.stdout


def test_secrets_of_another_store_are_refused(copy: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert run_cli("keys", "list", "--data-dir", str(other)).returncode == 0
    shutil.copy2(other / "secrets", copy / "secrets")
    line = _serve_refused(copy, tmp_path)
    assert "are not the ones the store" in line and "differs" in line, line
    env_secrets = {
        "TRIOGATE_HMAC_SECRET": "1:" + "x" * 40,
        "TRIOGATE_ENCRYPTION_KEYS": "1:QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=",
    }
    assert "from environment" in _serve_refused(copy, tmp_path, env=env_secrets)
    doctor = _doctor(copy)
    assert doctor.returncode == 1 and "not this store's" in doctor.stdout, doctor.stdout


def test_secrets_with_an_emptied_store_are_refused_even_without_the_witness_file(
    copy: Path, tmp_path: Path
) -> None:
    # The witness (store.json) says a store lived here; without it, an
    # empty store with a secrets file is a provisioned first start.
    (copy / "lmdb" / "data.mdb").write_bytes(b"")
    _serve_refused(copy, tmp_path)
    (copy / "store.json").unlink()
    with serving(write_config(tmp_path / "again.toml", copy)) as server, server.client() as c:
        assert c.post("/setup", json=SETUP).status_code == 201
        assert server.stop() == 0


# ---- a read-only directory -----------------------------------------------------------


def _no_dac_override() -> None:
    """In the child, before exec: as root, drop the capabilities that let root
    write anywhere, so file modes apply to it as to anyone."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def read_only(copy: Path) -> Iterator[Path]:
    paths = [copy, copy / "lmdb", *copy.rglob("*")]
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in paths}
    for p in paths:
        p.chmod(0o500 if p.is_dir() else 0o400)
    try:
        yield copy
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def test_a_read_only_data_directory_is_one_sentence(read_only: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "ro.toml", read_only)
    for args in (["serve", "-c", str(config)], ["keys", "list", "--data-dir", str(read_only)]):
        done = subprocess.run(
            [*triogate_command(), *args],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=30,
            stdin=subprocess.DEVNULL,
            preexec_fn=_no_dac_override,
        )
        assert done.returncode == 1, done
        assert "is not writable by this user" in _one_sentence(done.stderr), done.stderr


# ---- what must keep working ------------------------------------------------------------


def test_a_first_start_on_nothing_makes_secrets_store_and_marker(tmp_path: Path) -> None:
    data = tmp_path / "deep" / "data"
    with serving(write_config(tmp_path / "fresh.toml", data)) as server, server.client() as c:
        assert c.post("/setup", json=SETUP).status_code == 201
        assert server.stop() == 0, server.stderr()
    assert (data / "secrets").is_file() and (data / "store.json").is_file()
    assert stat.S_IMODE((data / "lmdb").stat().st_mode) == 0o700
    doctor = _doctor(data)
    assert doctor.returncode == 0, doctor.stdout
    assert "the secrets match" in doctor.stdout and "healthy" in doctor.stdout
    # And a second start verifies the marker and goes on.
    with serving(write_config(tmp_path / "fresh.toml", data)) as server:
        assert server.stop() == 0, server.stderr()


def test_doctor_on_a_good_directory(made: Made, copy: Path) -> None:
    doctor = _doctor(copy)
    assert doctor.returncode == 0, doctor.stdout
    out = doctor.stdout
    assert "error " not in out, out
    for line in ("keys: 1 record, all decode", "admins: 1 record", "sealed: 2 sealed fields open"):
        assert line in out, out
    assert "key_digests: consistent with keys" in out
    done = run_cli("doctor", "--data-dir", str(copy), "--json")
    assert done.returncode == 0 and '"level": "ok"' in done.stdout


def _strip_marker(data: Path) -> None:
    """Make ``data`` look like a data directory from before the marker."""
    env = lmdb.open(str(data / "lmdb"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            assert txn.delete(b"datadir", db=env.open_db(b"meta", txn=txn))
    finally:
        env.close()
    (data / "store.json").unlink()


def test_a_store_from_before_the_marker_starts_and_gets_one(
    made: Made, copy: Path, tmp_path: Path
) -> None:
    _strip_marker(copy)
    doctor = _doctor(copy)
    assert doctor.returncode == 0 and "a store from before markers" in doctor.stdout
    with serving(write_config(tmp_path / "old.toml", copy)) as server, server.client() as c:
        r = c.post("/keys/validate", json={"key": made.key}, headers=_bearer(made.admin_key))
        assert r.status_code == 200 and r.json()["valid"] is True, r.text
        assert server.stop() == 0, server.stderr()
    assert (copy / "store.json").is_file()
    assert "the secrets match" in _doctor(copy).stdout
    # From now on it is protected like any other.
    (copy / "secrets").unlink()
    assert "not its secrets" in _serve_refused(copy, tmp_path)


def test_a_store_from_before_the_marker_with_foreign_secrets_is_refused(
    copy: Path, tmp_path: Path
) -> None:
    _strip_marker(copy)
    other = tmp_path / "other"
    assert run_cli("keys", "list", "--data-dir", str(other)).returncode == 0
    shutil.copy2(other / "secrets", copy / "secrets")
    line = _serve_refused(copy, tmp_path)
    assert "does not open" in line, line


# ---- check-config ---------------------------------------------------------------------


def test_check_config_prints_the_checksum_of_what_it_validated(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", tmp_path / "data")
    done = run_cli("check-config", str(config))
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256(config.read_bytes()).hexdigest()
    assert done.stdout.strip().endswith(f"sha256:{digest}"), done.stdout
