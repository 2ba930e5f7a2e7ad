"""Which modules run compiled (mypyc), and whether the build is out of date.

The install compiles the data plane's hot modules (setup.py, listed in
pyproject's ``[tool.triogate.native]``) and records in
``triogate/native.json`` the digest of every source of the package: the
compiled modules' own, and the others', since mypyc builds facts from the
modules it type-checks (a ``Final`` constant's value, a class's fields) into
the compiled ones. An extension is imported before the ``.py`` beside it, so
a source edited after the build would silently run old compiled code:
``triogate serve`` refuses to start then, and the test suite refuses to run
(tests/conftest.py), each naming the changed modules and how to rebuild.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec

__all__ = ["NativeStatus", "check_native", "native_status", "stale_modules"]

PACKAGE = Path(__file__).resolve().parent.parent
MANIFEST = PACKAGE / "native.json"
REBUILD = "rebuild with `pip install -e .` (or `TRIOGATE_PURE=1 pip install -e .` for pure Python)"


class NativeStatus(msgspec.Struct, frozen=True):
    """``compiled``: the modules running compiled; ``stale``: the modules
    whose source changed since the build (compiled or not)."""

    compiled: tuple[str, ...]
    stale: tuple[str, ...]

    def describe(self) -> str:
        if not self.compiled:
            return "pure Python (no module compiled)"
        return f"{len(self.compiled)} data-plane modules compiled with mypyc"


def stale_modules(
    digests: Mapping[str, str], names: tuple[str, ...], read: Callable[[str], bytes | None]
) -> tuple[str, ...]:
    """The modules among ``names`` whose source (``read(name)``, None if
    gone) no longer matches the digest recorded at build time; one the build
    did not record is stale too (a compiled module built by something else)."""
    stale = []
    for name in names:
        data = read(name)
        recorded = digests.get(name)
        if recorded is None or data is None or hashlib.sha256(data).hexdigest() != recorded:
            stale.append(name)
    return tuple(stale)


def _locate(name: str) -> tuple[Path | None, bool]:
    """Module ``name``'s source path and whether an extension sits beside it
    (imported before the source: what the import system's file finder does).
    Found through the parent package, not the module's own spec: a module
    that compiled code imported has the shared library's spec."""
    parent, _, stem = name.rpartition(".")
    try:
        spec = importlib.util.find_spec(parent)
    except (ImportError, ValueError):
        return None, False
    for location in (spec.submodule_search_locations or ()) if spec is not None else ():
        directory = Path(location)
        source = directory / f"{stem}.py"
        compiled = any(
            (directory / f"{stem}{suffix}").exists()
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
        )
        if compiled or source.exists():
            return source, compiled
    return None, False


def _read_source(name: str) -> bytes | None:
    source, _ = _locate(name)
    try:
        return None if source is None else source.read_bytes()
    except OSError:
        return None


def native_status() -> NativeStatus:
    """Looked up without importing the modules themselves (their packages
    are imported). An extension the build did not record (a module taken
    off the list, a build that wrote no manifest) counts as stale."""
    try:
        digests: dict[str, str] = json.loads(MANIFEST.read_text())["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        digests = {}
    names = set(digests) | set(_extensions_beside_sources())
    found = tuple(sorted(name for name in names if _locate(name)[1]))
    stale = stale_modules(digests, found, _read_source)
    if found:
        # The sources the build read, compiled or not (gone ones included).
        sources = _recorded_sources()
        changed = stale_modules(sources, tuple(sorted(sources)), _read_source)
        stale = tuple(sorted(set(stale) | set(changed)))
    return NativeStatus(found, stale)


def _recorded_sources() -> dict[str, str]:
    try:
        sources: dict[str, str] = json.loads(MANIFEST.read_text())["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return sources


def _extensions_beside_sources() -> list[str]:
    """Every module of the package with an extension beside its ``.py``
    (the package's directories: ``core/``, ``plugins/``, ``storage/`` in an
    editable install, one tree in a wheel's)."""
    found = []
    for package in ("triogate", "triogate.plugins", "triogate.storage"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or ()) if spec is not None else ():
            root = Path(location)
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                for built in root.rglob(f"*{suffix}"):
                    stem = built.name[: -len(suffix)]
                    if built.with_name(stem + ".py").exists():
                        parts = built.relative_to(root).parent.parts
                        found.append(".".join((package, *parts, stem)))
    return found


def check_native() -> NativeStatus:
    """The status, or RuntimeError naming the out-of-date modules."""
    status = native_status()
    if status.stale:
        raise RuntimeError(
            "the data plane was compiled from older sources of "
            f"{', '.join(status.stale)}; {REBUILD}"
        )
    return status
