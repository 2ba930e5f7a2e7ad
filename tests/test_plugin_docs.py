"""docs/plugins.md keeps up with the plugin contract and the built-in plugins.

Fails when a phase of the contract is not documented (in the guide, or in the
contract module's docstring), when a built-in plugin or one of its settings
is missing from the guide's reference, or when a built-in setting has no
``Meta(description=...)`` (the reference is written from those).
"""

from __future__ import annotations

import re
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import msgspec
import pytest

import triogate.plugins.contract as contract
from triogate.dataplane.plugin_loader import ENTRY_POINT_GROUP
from triogate.plugins.contract import PHASES, Plugin

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
BUILTIN_MODULE_PREFIX = "triogate.plugins."

_HEADING_RE = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_CODE_SPAN_RE = re.compile(r"`([^`\n]+)`")


def _builtin_entry_points() -> list[EntryPoint]:
    eps = [
        ep
        for ep in entry_points(group=ENTRY_POINT_GROUP)
        if ep.module.startswith(BUILTIN_MODULE_PREFIX)
    ]
    return sorted(eps, key=lambda ep: ep.name)


BUILTINS = _builtin_entry_points()


def _plugin(ep: EntryPoint) -> type[Plugin[Any]]:
    cls = ep.load()
    assert isinstance(cls, type) and issubclass(cls, Plugin), ep.value
    return cls


def _config_properties(cls: type[Plugin[Any]]) -> dict[str, dict[str, Any]]:
    """The JSON Schema properties of a plugin's Config (its fields)."""
    schema = msgspec.json.schema(cls.Config)
    if "$ref" in schema:
        schema = schema["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    properties: dict[str, dict[str, Any]] = schema.get("properties", {})
    return properties


def _docs() -> str:
    assert DOCS.is_file(), f"{DOCS} is missing"
    return DOCS.read_text(encoding="utf-8")


def _headings(text: str) -> list[tuple[int, int, str]]:
    """(line index, level, title) of every Markdown heading outside code blocks."""
    out = []
    fenced = False
    for i, line in enumerate(text.splitlines()):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING_RE.match(line)
        if m:
            out.append((i, len(m.group(1)), m.group(2)))
    return out


def _code_spans(text: str) -> set[str]:
    return {m.strip() for m in _CODE_SPAN_RE.findall(text)}


def _section(text: str, name: str) -> str | None:
    """The section under the heading that names ``name`` in a code span
    (``### `key-auth` ``), up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    heads = _headings(text)
    for n, (start, level, title) in enumerate(heads):
        if name in _code_spans(title):
            end = next((i for i, lv, _ in heads[n + 1 :] if lv <= level), len(lines))
            return "\n".join(lines[start + 1 : end])
    return None


def test_builtins_are_found() -> None:
    # Guards the tests below against passing on an empty list (e.g. triogate
    # not installed, so its entry points are missing).
    assert len(BUILTINS) >= 7, [ep.name for ep in BUILTINS]


# ---- phases ------------------------------------------------------------------


@pytest.mark.parametrize("phase", PHASES)
def test_phase_is_documented_in_the_guide(phase: str) -> None:
    text = _docs()
    in_heading = any(re.search(rf"\b{phase}\b", title) for _, _, title in _headings(text))
    in_code = any(span == phase or span.startswith(f"{phase}(") for span in _code_spans(text))
    assert in_heading or in_code, (
        f"docs/plugins.md does not document the {phase!r} phase "
        f"(no heading or code span like `{phase}` / `{phase}(...)`)"
    )


@pytest.mark.parametrize("phase", PHASES)
def test_phase_is_explained_in_the_contract_docstring(phase: str) -> None:
    doc = contract.__doc__ or ""
    # A definition-list entry: ``access(ctx)`` then an indented explanation.
    m = re.search(rf"^``{phase}\([^`]*\)``\n((?:[ \t]+\S.*\n?)+)", doc, re.MULTILINE)
    assert m is not None, (
        f"triogate.plugins.contract's docstring has no ``{phase}(...)`` entry "
        "followed by an indented explanation"
    )
    explanation = " ".join(m.group(1).split())
    assert len(explanation.split()) >= 5, f"the {phase!r} explanation is too short"


# ---- built-in plugins ----------------------------------------------------------


@pytest.mark.parametrize("ep", BUILTINS, ids=lambda ep: ep.name)
def test_builtin_plugin_is_in_the_reference(ep: EntryPoint) -> None:
    section = _section(_docs(), ep.name)
    assert section is not None, (
        f"docs/plugins.md has no heading naming the built-in plugin `{ep.name}` ({ep.value})"
    )
    spans = _code_spans(section)
    missing = [field for field in _config_properties(_plugin(ep)) if field not in spans]
    assert not missing, (
        f"the `{ep.name}` section of docs/plugins.md does not list the settings {missing}"
    )


@pytest.mark.parametrize("ep", BUILTINS, ids=lambda ep: ep.name)
def test_builtin_config_fields_have_descriptions(ep: EntryPoint) -> None:
    # The description must be on the field itself: for ``X | None`` that
    # means ``Annotated[X | None, Meta(description=...)]`` (a Meta on ``X``
    # alone puts it inside the schema's ``anyOf``, not on the field).
    cls = _plugin(ep)
    undocumented = [
        f"{ep.name}.{field}"
        for field, prop in _config_properties(cls).items()
        if not str(prop.get("description", "")).strip()
    ]
    assert not undocumented, (
        f"{cls.Config.__module__}.{cls.Config.__qualname__}: fields without "
        f"Meta(description=...): {', '.join(undocumented)}"
    )


# ---- the API's names -------------------------------------------------------------


def _documented(name: str) -> bool:
    """``name`` appears in the guide in a code span (alone, or as the start
    of one: `ctx.route`, `check_nowait(key, ...)`, `env.keys`)."""
    spans = _code_spans(_docs())
    return any(re.search(rf"(^|[.\s(]){re.escape(name)}($|[.\s(=,)])", span) for span in spans)


@pytest.mark.parametrize("name", sorted(contract.__all__))
def test_public_name_of_the_contract_is_documented(name: str) -> None:
    assert _documented(name), f"docs/plugins.md does not mention `{name}` (contract.__all__)"


def _context_attributes() -> list[str]:
    public = [n for n in contract.Context.__slots__ if not n.startswith("_")]
    public += [
        n
        for n, v in vars(contract.Context).items()
        if not n.startswith("_") and (callable(v) or isinstance(v, property))
    ]
    return sorted(set(public))


@pytest.mark.parametrize("attribute", _context_attributes())
def test_context_attribute_is_documented(attribute: str) -> None:
    assert _documented(f"ctx.{attribute}"), (
        f"docs/plugins.md's context table does not list `ctx.{attribute}`"
    )


def _protocol_members() -> list[str]:
    members = [f"RouteView.{f}" for f in contract.RouteView.__dataclass_fields__]
    for proto in (contract.KeyValidator, contract.Limiter, contract.UpstreamView):
        members += [f"{proto.__name__}.{n}" for n in vars(proto) if not n.startswith("_")]
    members += [f"PluginEnv.{f}" for f in contract.PluginEnv.__dataclass_fields__]
    return sorted(members)


@pytest.mark.parametrize("member", _protocol_members())
def test_service_and_view_members_are_documented(member: str) -> None:
    name = member.partition(".")[2]
    assert _documented(name) or _documented(f"env.{name}"), (
        f"docs/plugins.md does not document {member}"
    )
