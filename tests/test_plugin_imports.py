"""The plugin API is the boundary: the built-in plugins import only what a
third-party plugin may (the contract, the message model, the errors, the
pure decision modules), so the contract is proved by the code that uses it
most. Read from the source (every import, those under ``TYPE_CHECKING``
too), not from what happens to be loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"

#: The plugin API itself: the facade, its private parts, the package.
API_MODULES = frozenset({"contract", "__init__"})
API_PREFIX = "_api_"

#: What a built-in plugin may import of triogate (a module or its children).
PLUGIN_MAY_IMPORT = (
    "triogate.plugins.contract",
    "triogate.errors",
    "triogate.http",
    "triogate.policy",
)
#: The API modules may also read the config types (a base module, no I/O).
API_MAY_IMPORT = (*PLUGIN_MAY_IMPORT, "triogate.plugins._api_", "triogate.config")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a plugins/ module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside triogate.plugins
                base = "triogate.plugins"
                module = f"{base}.{node.module}" if node.module else base
                if not node.module:
                    found.extend((node.lineno, f"{base}.{a.name}") for a in node.names)
                    continue
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def _allowed(module: str, prefixes: tuple[str, ...]) -> bool:
    if not module.startswith("triogate"):
        return True  # the standard library and third-party packages (msgspec, trio)
    return any(
        module == p or module.startswith(p if p.endswith("_") else f"{p}.") for p in prefixes
    )


def _modules() -> list[Path]:
    return sorted(PLUGINS.glob("*.py"))


def _is_api(path: Path) -> bool:
    return path.stem in API_MODULES or path.stem.startswith(API_PREFIX)


BUILTINS = [p for p in _modules() if not _is_api(p)]
API = [p for p in _modules() if _is_api(p)]


def test_the_walk_finds_the_modules() -> None:
    names = {p.stem for p in BUILTINS}
    assert {"key_auth", "rate_limit", "retry", "circuit_breaker", "cors"} <= names
    assert "contract" in {p.stem for p in API}


@pytest.mark.parametrize("path", BUILTINS, ids=lambda p: p.stem)
def test_builtin_plugin_imports_only_the_plugin_api(path: Path) -> None:
    bad = [f"line {n}: {m}" for n, m in _imports(path) if not _allowed(m, PLUGIN_MAY_IMPORT)]
    assert not bad, (
        f"plugins/{path.name} imports gateway internals (a plugin may import only "
        f"{', '.join(PLUGIN_MAY_IMPORT)}): {'; '.join(bad)}"
    )


@pytest.mark.parametrize("path", API, ids=lambda p: p.stem)
def test_plugin_api_imports_nothing_with_io(path: Path) -> None:
    bad = [f"line {n}: {m}" for n, m in _imports(path) if not _allowed(m, API_MAY_IMPORT)]
    assert not bad, f"plugins/{path.name} imports gateway internals: {'; '.join(bad)}"


def test_the_rule_catches_an_internal_import(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text(
        "from typing import TYPE_CHECKING\n"
        "import msgspec\n"
        "from triogate.plugins.contract import Plugin\n"
        "from triogate.policy.ratelimit import Limit\n"
        "if TYPE_CHECKING:\n"
        "    from triogate.dataplane.actors import ActorRegistry\n"
        "import triogate.storage\n"
    )
    bad = [m for _, m in _imports(sneaky) if not _allowed(m, PLUGIN_MAY_IMPORT)]
    assert sorted(bad) == ["triogate.dataplane.actors", "triogate.storage"]
    assert not _allowed("triogate.policyx", PLUGIN_MAY_IMPORT)
