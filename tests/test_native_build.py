"""The data plane as installed: compiled with mypyc (setup.py), never stale.

What compiling must not change is covered by the whole suite, which runs on
the compiled modules (tests/conftest.py refuses a pure or stale build unless
``TRIOGATE_PURE`` is set); here: that the build is what pyproject lists, that
an edited source is caught, and the class options mypyc would have dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import msgspec
import pytest

from triogate.dataplane.admission import ActorSnapshot, Admission
from triogate.policy.limits import Decision, Limit, Reservation
from triogate.runtime import native
from triogate.runtime.native import NativeStatus, check_native, native_status, stale_modules

ROOT = Path(__file__).resolve().parent.parent
PURE = bool(os.environ.get("TRIOGATE_PURE"))


def listed() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        modules: list[str] = tomllib.load(f)["tool"]["triogate"]["native"]["modules"]
    return modules


def test_every_listed_module_runs_compiled() -> None:
    status = native_status()
    if PURE:
        assert status.compiled == ()
        return
    assert status.compiled == tuple(sorted(listed()))
    assert status.stale == ()
    for name in listed():
        module = __import__(name, fromlist=["_"])
        assert module.__file__ is not None and module.__file__.endswith(".so"), name


def test_a_changed_source_is_stale() -> None:
    sources = {"a": b"x = 1\n", "b": b"y = 2\n", "c": b"z = 3\n"}
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in sources.items()}
    assert stale_modules(digests, ("a", "b", "c"), sources.get) == ()
    edited = {**sources, "b": b"y = 3\n"}
    assert stale_modules(digests, ("a", "b", "c"), edited.get) == ("b",)
    # A source gone, or a module the build did not record: stale too.
    assert stale_modules(digests, ("a", "c"), {"a": sources["a"]}.get) == ("c",)
    assert stale_modules({"a": digests["a"]}, ("a", "b"), sources.get) == ("b",)


def test_check_native_names_the_stale_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = tmp_path / "native.json"
    digests = {name: "0" * 64 for name in listed()}  # no source has this digest
    manifest.write_text(msgspec.json.encode({"modules": digests}).decode())
    monkeypatch.setattr(native, "MANIFEST", manifest)
    if PURE:
        # Nothing is compiled, so nothing can be stale, whatever the digests.
        assert check_native() == NativeStatus((), ())
        return
    with pytest.raises(RuntimeError) as caught:
        check_native()
    assert "triogate.dataplane.connection" in str(caught.value)
    assert "pip install -e ." in str(caught.value)
    # An uncompiled module the build read changed: mypyc may have built
    # facts from it into the compiled ones (a Final constant's value).
    manifest.write_text(
        msgspec.json.encode(
            {"modules": {}, "sources": {"triogate.policy.refill": "0" * 64}}
        ).decode()
    )
    with pytest.raises(RuntimeError) as caught:
        check_native()
    assert "triogate.policy.refill" in str(caught.value)
    # No manifest at all: every compiled module is unaccounted for.
    monkeypatch.setattr(native, "MANIFEST", tmp_path / "missing.json")
    assert set(native_status().stale) >= {"triogate.dataplane.pipeline"}


def test_serve_logs_what_runs_compiled(tmp_path: Path) -> None:
    """``triogate serve`` says at start whether its data plane is compiled."""
    conf = tmp_path / "triogate.toml"
    conf.write_text(
        f'[server]\nproxy_listen = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\n'
        f"data_dir = {json.dumps(str(tmp_path / 'data'))}\n"
    )
    expected = "pure Python" if PURE else f"{len(listed())} data-plane modules compiled with mypyc"
    server = subprocess.Popen(
        [sys.executable, "-m", "triogate", "serve", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # A server that hangs silent is killed, which ends the reads below.
    watchdog = threading.Timer(30, server.kill)
    watchdog.start()
    try:
        assert server.stderr is not None
        seen = []
        while True:
            line = server.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "data plane:" in line:
                break
        assert any(f"data plane: {expected}" in line for line in seen), seen
    finally:
        watchdog.cancel()
        server.terminate()
        server.wait(10)


def test_the_struct_options_survive() -> None:
    """mypyc drops a Struct's class options in a compiled module, which is
    why these live in uncompiled ones: a Limit must hash (it keys caches)."""
    limit = Limit("l", 10, 1.0)
    assert hash(limit) == hash(Limit("l", 10, 1.0))
    for struct, frozen in (
        (Limit, True),
        (Decision, True),
        (Reservation, True),
        (ActorSnapshot, True),
        (Admission, False),
    ):
        assert struct.__struct_config__.frozen is frozen, struct
    assert Limit.__struct_config__.gc is False
