"""Compile the data plane's hot modules with mypyc at install time.

Everything else about the package is declared in pyproject.toml; this file
only adds the extension modules. The modules to compile are listed there too
(``[tool.triogate.native] modules``), one place that the build, the tests
(tests/test_native_build.py) and docs/performance.md read.

Why: the request path is plain, strictly typed Python (mypy ``--strict``
is already a CI gate), which is exactly what mypyc compiles to C: the same
source, no second implementation. Measured in the proxy benchmark it cuts
the server's CPU per request by a quarter to a third (docs/performance.md).

``TRIOGATE_PURE=1`` (any non-empty value) installs the pure-Python package:
no C compiler needed, the same behaviour, slower.

mypyc names a compiled module after its place in the file tree, and the
repository maps ``core/`` to ``triogate`` (package-dir); so the sources are
handed to mypyc through a tree of symlinks shaped like the installed package
(``build/native-src/triogate``), the same trick .ci/typecheck uses for mypy.
The modules are compiled as one group (calls between them stay native) with
its shared library ``triogate/native__mypyc``; each module's extension lands
next to its source in an editable install and in the wheel.

The build environment needs mypy and the runtime dependencies (pyproject's
``build-system.requires``), a pure install too: this file is evaluated
either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tomllib
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
FARM = ROOT / "build" / "native-src"
MANIFEST = ROOT / "core" / "native.json"
# Where each top-level directory of the repository sits in the installed package.
LAYOUT = {"plugins": "plugins", "storage": "storage", "benchmarks": "benchmarks"}
# Those whose modules the compiled ones may import (the benchmarks: never).
PACKAGES = ("plugins", "storage")


def native_modules() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)
    modules: list[str] = config["tool"]["triogate"]["native"]["modules"]
    return modules


def source_farm() -> Path:
    """build/native-src/triogate: symlinks shaped like the installed package."""
    package = FARM / "triogate"
    if FARM.exists():
        shutil.rmtree(FARM)
    package.mkdir(parents=True)
    for entry in (ROOT / "core").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for directory, name in LAYOUT.items():
        (package / name).symlink_to(ROOT / directory)
    return package


def source(name: str) -> Path:
    """Where module ``name`` (``triogate.x.y``) lives in the repository."""
    parts = name.split(".")[1:]
    if parts[0] in LAYOUT:
        return (ROOT / parts[0]).joinpath(*parts[1:]).with_suffix(".py")
    return (ROOT / "core").joinpath(*parts).with_suffix(".py")


def all_sources() -> dict[str, Path]:
    """Every module of the installed package but the benchmarks, by name."""
    found = {}
    for directory, package in (("core", "triogate"), *((d, f"triogate.{d}") for d in PACKAGES)):
        root = ROOT / directory
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if "__pycache__" not in parts:
                found[".".join((package, *parts))] = path
    return found


def write_manifest(modules: list[str]) -> None:
    """core/native.json: the digest of each compiled module's source and of
    every other source of the package, so that a source edited after the
    build is caught (``triogate.runtime.native``) instead of old compiled
    code running silently. The others count too: mypyc builds facts from
    the modules it type-checks into the compiled ones (a ``Final``
    constant's value, a class's fields)."""

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    document = {
        "modules": {name: digest(source(name)) for name in modules},
        "sources": {name: digest(path) for name, path in all_sources().items()},
    }
    MANIFEST.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def remove_compiled(modules: list[str]) -> None:
    """Extensions an earlier build left in an editable tree would still be
    imported before their source: those of the modules listed now, or in
    the last build's manifest (a module since taken off the list), and the
    shared library. Nothing else is touched."""
    names = set(modules)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        names |= set(json.loads(MANIFEST.read_text())["modules"])
    for name in names:
        path = source(name)
        for built in path.parent.glob(path.stem + ".*.so"):
            built.unlink()
    for shared in (ROOT / "core").glob("native__mypyc.*.so"):
        shared.unlink()
    MANIFEST.unlink(missing_ok=True)


def extensions() -> list[object]:
    modules = native_modules()
    remove_compiled(modules)
    if os.environ.get("TRIOGATE_PURE"):
        return []
    from mypyc.build import mypycify

    package = source_farm()
    # Each module's place in the farm is its import name (triogate.x.y -> x/y.py).
    paths = [str(package.joinpath(*name.split(".")[1:]).with_suffix(".py")) for name in modules]
    write_manifest(modules)
    return list(
        mypycify(
            paths,
            # One group: calls between the compiled modules stay native
            # (and inline); its shared library is triogate/native__mypyc.
            separate=[(paths, "triogate.native")],
            opt_level="3",
            target_dir=str(ROOT / "build" / "mypyc"),
        )
    )


setup(ext_modules=extensions())
