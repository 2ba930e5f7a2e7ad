"""Compile the data plane's hot modules with mypyc at install time.

Everything else about the package is declared in pyproject.toml; this file
only adds the extension modules. The modules to compile are listed there too
(``[tool.triogate.native] modules``), one place that the build, the tests
(tests/test_native_build.py) and docs/performance.md read.

Why: the request path is plain, strictly typed Python (mypy ``--strict``
is already a CI gate), which is exactly what mypyc compiles to C: the same
source, no second implementation. Measured in the proxy benchmark it cuts
the server's CPU per request by about a quarter (docs/performance.md).

``TRIOGATE_PURE=1`` (any non-empty value) installs the pure-Python package:
no C compiler needed, the same behaviour, slower.

mypyc names a compiled module after its place in the file tree, and the
repository maps ``core/`` to ``triogate`` (package-dir); so the sources are
handed to mypyc through a tree of symlinks shaped like the installed package
(``build/native-src/triogate``), the same trick .ci/typecheck uses for mypy.
Each module becomes its own extension (``separate=True``): an extension
named ``triogate.dataplane.connection`` lands next to its source in an
editable install and in the wheel, with no shared library to place.
"""

from __future__ import annotations

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


def write_manifest(modules: list[str]) -> None:
    """core/native.json: each compiled module's source digest, so that a
    source edited after the build is caught (``triogate.runtime.native``)
    instead of the old compiled code running silently."""
    digests = {name: hashlib.sha256(source(name).read_bytes()).hexdigest() for name in modules}
    MANIFEST.write_text(json.dumps({"modules": digests}, indent=1, sort_keys=True) + "\n")


def remove_compiled() -> None:
    """Extensions an earlier build left in an editable tree (all of them:
    a module since taken off the list, or a pure install now) would still be
    imported before their source."""
    for directory in ("core", *LAYOUT):
        for built in (ROOT / directory).rglob("*.so"):
            stem = built.name.split(".", 1)[0]
            if built.with_name(stem + ".py").exists() or stem == "native__mypyc":
                built.unlink()
    MANIFEST.unlink(missing_ok=True)


def extensions() -> list[object]:
    modules = native_modules()
    remove_compiled()
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
