"""docs/configuration.md documents every setting of the config file, with its
real default, and its examples load.

The settings are found by walking the config types: every ``msgspec.Struct``
reachable from ``triogate.config.Config`` through its fields (and through
``dict`` values, ``list`` items and ``X | None``), each with its TOML path:
``[server]``, ``[keys.default_rate_limit]``, ``[upstreams.NAME.health_check]``,
``[[routes]]``, ``[api_versions."V"]``... (``Config`` itself is "Top level").

Fails when:

* a Struct has no section: a Markdown heading containing its TOML path;
* a field has no row ``| `field` | type | default | description |`` in its
  section (the text up to the next heading), or a row names no field;
* a documented default differs from the real one. Defaults are TOML values
  in backticks (`10.0`, `"tg_"`, `[]`), ``none`` for ``None`` (TOML has no
  null) and ``required``; a table whose settings all have their defaults is
  `{}`;
* a ```toml block does not load with ``parse_config`` and the plugin
  pipeline (as ``triogate check-config`` does), unless its first line is
  ``# fragment``;
* the complete example leaves a setting out, an environment override shown
  on the page does not work, or a restart-only setting of ``core/reload.py``
  is not in the reload section.
"""

from __future__ import annotations

import re
import shlex
import tomllib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.doc_tables import REQUIRED, documented_default, real_default, same_default
from triogate.config import Config, parse_config
from triogate.dataplane.pipeline import Pipeline
from triogate.dataplane.plugin_loader import discover
from triogate.errors import ConfigError
from triogate.plugins.contract import PluginEnv
from triogate.runtime.reload import RELOAD_TABLE, Applies

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
ROOT_HEADING = "Top level"
# The placeholder for a table's keys in its TOML path (default: NAME).
KEY_PLACEHOLDERS = {"api_versions": '"V"'}
COMPLETE_EXAMPLE_HEADING = "A complete example"
ENV_HEADING = "Environment overrides"
RELOAD_HEADING = "Reload or restart"

_HEADING_RE = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_ROW_RE = re.compile(r"^\|\s*`([A-Za-z_][A-Za-z0-9_]*)`\s*\|")
_TOML_BLOCK_RE = re.compile(r"^```toml\n(.*?)^```", re.DOTALL | re.MULTILINE)
_CODE_BLOCK_RE = re.compile(r"^```[a-z]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
_CODE_SPAN_RE = re.compile(r"`([^`\n]+)`")
_ENV_RE = re.compile(r"^(TRIOGATE_[A-Za-z0-9_]+__[A-Za-z0-9_]+)=(.*)$")

# ---- the config types ------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One Struct of the config and where it lives in the file."""

    struct: type[msgspec.Struct]
    heading: str  # what its Markdown heading contains: "[server]", "[[routes]]", ...
    steps: tuple[str, ...]  # path into the TOML document; "*": any key, "[]": every item


def _toml_header(steps: tuple[str, ...]) -> str:
    if not steps:
        return ROOT_HEADING
    parts: list[str] = []
    for i, step in enumerate(steps):
        if step == "*":
            parts.append(KEY_PLACEHOLDERS.get(steps[i - 1], "NAME"))
        elif step != "[]":
            parts.append(step)
    dotted = ".".join(parts)
    return f"[[{dotted}]]" if steps[-1] == "[]" else f"[{dotted}]"


def _walk(tp: Any, steps: tuple[str, ...], out: dict[str, Section]) -> None:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        _walk(typing.get_args(tp)[0], steps, out)
    elif origin in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):
            _walk(member, steps, out)
    elif origin is dict:
        _walk(typing.get_args(tp)[1], (*steps, "*"), out)
    elif origin is list:
        _walk(typing.get_args(tp)[0], (*steps, "[]"), out)
    elif isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        header = _toml_header(steps)
        if header in out:
            return
        out[header] = Section(tp, header, steps)
        for field in msgspec.structs.fields(tp):
            _walk(field.type, (*steps, field.name), out)


def _sections() -> dict[str, Section]:
    out: dict[str, Section] = {}
    _walk(Config, (), out)
    return out


SECTIONS = _sections()


# ---- the page ----------------------------------------------------------------------


def _docs() -> str:
    assert DOCS.is_file(), f"{DOCS} is missing"
    return DOCS.read_text(encoding="utf-8")


def _headings(lines: list[str]) -> list[tuple[int, int, str]]:
    """(line index, level, title) of every heading outside code blocks."""
    out = []
    fenced = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING_RE.match(line)
        if m:
            out.append((i, len(m.group(1)), m.group(2)))
    return out


def _section_text(text: str, marker: str) -> str:
    """The text under the one heading containing ``marker``, up to the next heading."""
    lines = text.splitlines()
    heads = _headings(lines)
    found = [n for n, (_, _, title) in enumerate(heads) if marker in title]
    assert found, f"docs/configuration.md has no heading containing {marker!r}"
    assert len(found) == 1, (
        f"docs/configuration.md: several headings contain {marker!r}: "
        f"{[heads[n][2] for n in found]}"
    )
    start = heads[found[0]][0]
    end = heads[found[0] + 1][0] if found[0] + 1 < len(heads) else len(lines)
    return "\n".join(lines[start + 1 : end])


def _rows(section: Section) -> dict[str, list[str]]:
    """The table rows of a Struct's section: setting name -> its four cells."""
    rows: dict[str, list[str]] = {}
    for line in _section_text(_docs(), section.heading).splitlines():
        m = _ROW_RE.match(line)
        if m is None:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, (
            f"{section.heading}: expected | setting | type | default | description |: {line}"
        )
        assert m.group(1) not in rows, f"{section.heading}: `{m.group(1)}` has two rows"
        rows[m.group(1)] = cells
    return rows


# ---- defaults ----------------------------------------------------------------------


# ---- the settings tables ---------------------------------------------------------------


def test_every_config_struct_is_found() -> None:
    # Guards the parametrized tests below against walking nothing.
    expected = {
        ROOT_HEADING,
        "[server]",
        "[keys]",
        "[keys.default_rate_limit]",
        "[storage]",
        "[upstreams.NAME]",
        "[upstreams.NAME.health_check]",
        "[[routes]]",
        '[api_versions."V"]',
    }
    assert expected <= set(SECTIONS), sorted(SECTIONS)
    if "log" in {f.name for f in msgspec.structs.fields(Config)}:
        assert "[log]" in SECTIONS


@pytest.mark.parametrize("section", SECTIONS.values(), ids=lambda s: s.heading)
def test_every_setting_has_a_row(section: Section) -> None:
    rows = _rows(section)
    fields = [f.name for f in msgspec.structs.fields(section.struct)]
    missing = [name for name in fields if name not in rows]
    assert not missing, (
        f"docs/configuration.md, section {section.heading} ({section.struct.__name__}): "
        f'no row for {missing} (add "| `setting` | type | default | description |")'
    )
    unknown = sorted(set(rows) - set(fields))
    assert not unknown, (
        f"docs/configuration.md, section {section.heading}: rows for settings "
        f"{section.struct.__name__} does not have: {unknown}"
    )


@pytest.mark.parametrize("section", SECTIONS.values(), ids=lambda s: s.heading)
def test_documented_defaults_are_the_real_ones(section: Section) -> None:
    rows = _rows(section)
    wrong = []
    for field in msgspec.structs.fields(section.struct):
        if field.name not in rows:
            continue  # test_every_setting_has_a_row reports it
        _, type_cell, cell, description = rows[field.name]
        assert type_cell, f"{section.heading} {field.name}: the type cell is empty"
        assert description, f"{section.heading} {field.name}: the description cell is empty"
        real = real_default(field)
        if not same_default(documented_default(cell), real):
            shown = "required" if real is REQUIRED else repr(real)
            wrong.append(f"{field.name}: documented {cell}, real {shown}")
    assert not wrong, f"docs/configuration.md, section {section.heading}: " + "; ".join(wrong)


def test_the_default_parser_catches_a_wrong_default() -> None:
    """The checks above are only as good as the parsing: doctored cells fail."""
    assert same_default(documented_default("`10`"), 10.0)
    assert not same_default(documented_default("`10`"), 10.5)
    assert not same_default(documented_default("`1`"), True)
    assert not same_default(documented_default('`"tg"`'), "tg_")
    assert same_default(documented_default("none"), None)
    assert not same_default(documented_default("`0`"), None)
    assert not same_default(documented_default("required"), 1)
    assert same_default(documented_default("`{}`"), Config().server)
    assert not same_default(documented_default("`[]`"), [200])


# ---- the examples ------------------------------------------------------------------------


def _toml_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every ```toml block."""
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in _TOML_BLOCK_RE.finditer(text)]


def _is_fragment(block: str) -> bool:
    first = block.lstrip("\n").splitlines()[0] if block.strip() else ""
    return first.strip().lower() == "# fragment"


def _load(block: str, where: str) -> Config:
    """Load a block as ``triogate check-config`` does: parsed, then every
    route compiled and every plugin loaded, validated and bound."""
    try:
        raw = tomllib.loads(block)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{where} is not valid TOML: {exc}")
    try:
        config = parse_config(raw, source=where, environ={})
        Pipeline.build(config, discover(), PluginEnv()).close()
    except ConfigError as exc:
        pytest.fail(f"{where} does not load:\n{exc}")
    return config


BLOCKS = _toml_blocks(_docs()) if DOCS.is_file() else []


def test_the_page_has_examples() -> None:
    assert any(not _is_fragment(block) for _, block in BLOCKS), "no complete ```toml block"


@pytest.mark.parametrize("line, block", BLOCKS, ids=[f"line{n}" for n, _ in BLOCKS])
def test_toml_block_loads(line: int, block: str) -> None:
    if _is_fragment(block):
        tomllib.loads(block)  # a fragment is still TOML
        return
    _load(block, f"docs/configuration.md:{line}")


def _tables_at(node: Any, steps: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Every table of the raw document at ``steps`` ("*": any key, "[]": every item)."""
    if not steps:
        if isinstance(node, dict):
            yield node
        return
    step, rest = steps[0], steps[1:]
    if step == "*" and isinstance(node, dict):
        for child in node.values():
            yield from _tables_at(child, rest)
    elif step == "[]" and isinstance(node, list):
        for child in node:
            yield from _tables_at(child, rest)
    elif isinstance(node, dict) and step in node:
        yield from _tables_at(node[step], rest)


def test_the_complete_example_sets_every_setting() -> None:
    blocks = _toml_blocks(_section_text(_docs(), COMPLETE_EXAMPLE_HEADING))
    assert blocks, f"no ```toml block under {COMPLETE_EXAMPLE_HEADING!r}"
    _, block = blocks[0]
    raw = tomllib.loads(block)
    _load(block, "the complete example")
    unset = []
    for section in SECTIONS.values():
        keys = {k for table in _tables_at(raw, section.steps) for k in table}
        unset += [
            f"{section.heading} {f.name}"
            for f in msgspec.structs.fields(section.struct)
            if f.name not in keys
        ]
    assert not unset, f"the complete example never sets: {unset}"


# ---- environment overrides and reloads ---------------------------------------------------


def _documented_overrides() -> dict[str, str]:
    section = _section_text(_docs(), ENV_HEADING)
    found: dict[str, str] = {}
    for block in _CODE_BLOCK_RE.findall(section):
        for line in block.splitlines():
            m = _ENV_RE.match(line.strip())
            if m:
                (value,) = shlex.split(m.group(2))  # as a shell would pass it
                found[m.group(1)] = value
    return found


def _lookup(config: Any, path: list[str]) -> Any:
    node = config
    for part in path:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def test_documented_environment_overrides_work() -> None:
    overrides = _documented_overrides()
    assert len(overrides) >= 3, f"{ENV_HEADING}: expected examples, found {overrides}"
    try:
        config = parse_config({}, source="environment", environ=overrides)
    except ConfigError as exc:
        pytest.fail(f"the overrides shown in docs/configuration.md do not load:\n{exc}")
    for name, value in overrides.items():
        path = [p.lower() for p in name.removeprefix("TRIOGATE_").split("__")]
        got = _lookup(config, path)
        try:
            expected: Any = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            expected = value
        if isinstance(got, msgspec.Struct):
            got = msgspec.structs.asdict(got)
        assert got == expected, f"{name}={value!r} gave {got!r}"


def _restart_only() -> set[str]:
    return {path for path, how in RELOAD_TABLE.items() if how is Applies.RESTART}


def test_the_reload_section_lists_exactly_the_restart_only_settings() -> None:
    section = _section_text(_docs(), RELOAD_HEADING)
    refused = [line for line in section.splitlines() if "**refused**" in line]
    assert len(refused) == 1, f"{RELOAD_HEADING!r}: expected one table row saying **refused**"
    listed = set(_CODE_SPAN_RE.findall(refused[0].split("**refused**")[0]))
    missing = sorted(_restart_only() - listed)
    assert not missing, (
        f"{RELOAD_HEADING!r}: restart-only settings (triogate.runtime.reload.RELOAD_TABLE) "
        f"not in the refused row: {missing}"
    )
    extra = sorted(listed - _restart_only())
    assert not extra, (
        f"{RELOAD_HEADING!r}: the refused row lists settings a reload changes: {extra}"
    )


@pytest.mark.parametrize(
    "section", [s for s in SECTIONS.values() if len(s.steps) == 1], ids=lambda s: s.heading
)
def test_each_setting_says_reload_or_restart(section: Section) -> None:
    """In the first-level tables ([server], [keys], ...) every description
    ends in "Reload" or "Restart", as core/reload.py decides."""
    rows = _rows(section)
    wrong = []
    for field in msgspec.structs.fields(section.struct):
        if field.name not in rows:
            continue  # test_every_setting_has_a_row reports it
        description = rows[field.name][3].rstrip(" .")
        expected = "Restart" if f"{section.steps[0]}.{field.name}" in _restart_only() else "Reload"
        if not description.endswith(expected):
            wrong.append(f"{field.name} (should end in {expected!r})")
    assert not wrong, f"docs/configuration.md, section {section.heading}: {wrong}"
