"""docs/resilience.md keeps up with the retry, circuit-breaker and health-check
settings, and its example config is valid.

Fails when a field of ``RetryConfig``, ``CircuitBreakerConfig`` or
``HealthCheckConfig`` has no row (``| `field` | type | default | description |``)
in its settings table, when a row names a field that does not exist, when a
documented default differs from the real one, or when the page's example (its
first ```toml block) does not load: it is parsed with ``parse_config`` and
built into a ``Pipeline`` exactly as ``triogate check-config`` does.

Defaults are written as TOML values in backticks (`3`, `[502, 503, 504]`,
`"/health"`, `true`); ``none`` (no backticks) stands for ``None``, which TOML
cannot spell, and ``required`` for a field without a default.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

import triogate.plugins.contract
from tests.doc_tables import REQUIRED, documented_default, real_default, same_default
from triogate.config import HealthCheckConfig, parse_config
from triogate.dataplane.pipeline import Pipeline
from triogate.dataplane.plugin_loader import discover
from triogate.errors import ConfigError
from triogate.plugins.circuit_breaker import CircuitBreakerConfig
from triogate.plugins.retry import RetryConfig

DOCS = Path(__file__).resolve().parent.parent / "docs" / "resilience.md"

# Each Struct's settings table is the first table under this heading.
SECTIONS: dict[type[msgspec.Struct], str] = {
    RetryConfig: "### `retry` settings",
    CircuitBreakerConfig: "### `circuit-breaker` settings",
    HealthCheckConfig: "### `[upstreams.NAME.health_check]` settings",
}

_ROW_RE = re.compile(r"^\|\s*`([A-Za-z_][A-Za-z0-9_]*)`\s*\|")
_TOML_BLOCK_RE = re.compile(r"^```toml\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _docs() -> str:
    assert DOCS.is_file(), f"{DOCS} is missing"
    return DOCS.read_text(encoding="utf-8")


def _rows(text: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first table under ``heading``: field name -> cells."""
    lines = text.splitlines()
    assert heading in lines, f"docs/resilience.md has no heading {heading!r}"
    rows: dict[str, list[str]] = {}
    in_table = False
    for line in lines[lines.index(heading) + 1 :]:
        if line.startswith("#"):
            break
        if not line.startswith("|"):
            if in_table:
                break  # the table ended
            continue
        in_table = True
        m = _ROW_RE.match(line)
        if m is None:
            continue  # the header and the separator
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, (
            f"{heading}: expected | field | type | default | description |: {line}"
        )
        assert m.group(1) not in rows, f"{heading}: `{m.group(1)}` has two rows"
        rows[m.group(1)] = cells
    return rows


STRUCTS = list(SECTIONS)


@pytest.mark.parametrize("struct", STRUCTS, ids=lambda s: s.__name__)
def test_every_field_has_a_row(struct: type[msgspec.Struct]) -> None:
    rows = _rows(_docs(), SECTIONS[struct])
    fields = [f.name for f in msgspec.structs.fields(struct)]
    missing = [name for name in fields if name not in rows]
    assert not missing, (
        f"docs/resilience.md, {SECTIONS[struct]}: no row for {missing} "
        f'(add "| `field` | type | default | description |")'
    )
    unknown = sorted(set(rows) - set(fields))
    assert not unknown, f"{SECTIONS[struct]}: rows for fields {struct.__name__} lacks: {unknown}"


@pytest.mark.parametrize("struct", STRUCTS, ids=lambda s: s.__name__)
def test_documented_defaults_are_the_real_ones(struct: type[msgspec.Struct]) -> None:
    rows = _rows(_docs(), SECTIONS[struct])
    wrong = []
    for field in msgspec.structs.fields(struct):
        if field.name not in rows:
            continue  # test_every_field_has_a_row reports it
        _, _, cell, description = rows[field.name]
        assert description, f"{struct.__name__}.{field.name}: the description cell is empty"
        documented = documented_default(cell)
        real = real_default(field)
        if not same_default(documented, real):
            shown = "required" if real is REQUIRED else repr(real)
            wrong.append(f"{field.name}: documented {cell}, real {shown}")
    assert not wrong, f"docs/resilience.md, {SECTIONS[struct]}: " + "; ".join(wrong)


def test_the_row_parser_catches_a_wrong_default() -> None:
    """The checks above are only as good as the parsing: a doctored row fails."""
    assert same_default(documented_default("`[502, 503, 504]`"), [502, 503, 504])
    assert not same_default(documented_default("`[502, 503]`"), [502, 503, 504])
    assert not same_default(documented_default("`1`"), True)
    assert same_default(documented_default("`10`"), 10.0)
    assert not same_default(documented_default("`0.5`"), 0.2)
    assert same_default(documented_default("none"), None)
    assert not same_default(documented_default("`0`"), None)
    assert same_default(documented_default('`"/health"`'), "/health")


# ---- the example ---------------------------------------------------------------


def _example_raw() -> dict[str, Any]:
    m = _TOML_BLOCK_RE.search(_docs())
    assert m is not None, "docs/resilience.md has no ```toml block"
    return tomllib.loads(m.group(1))


def test_the_example_config_is_valid() -> None:
    try:
        config = parse_config(_example_raw(), source="docs/resilience.md", environ={})
        pipeline = Pipeline.build(config, discover(), triogate.plugins.contract.PluginEnv())
    except ConfigError as exc:
        pytest.fail(f"the example in docs/resilience.md does not load:\n{exc}")
    try:
        assert pipeline.upstreams, "the example has no upstream"
    finally:
        pipeline.close()


def test_the_example_uses_every_setting() -> None:
    """Every field of the three Structs is set somewhere in the example, so
    the example shows how each one is written."""
    raw = _example_raw()
    plugin_tables = [raw.get("plugins", {})] + [r.get("plugins", {}) for r in raw["routes"]]
    used: dict[type[msgspec.Struct], set[str]] = {
        RetryConfig: {k for t in plugin_tables for k in t.get("retry", {})},
        CircuitBreakerConfig: {k for t in plugin_tables for k in t.get("circuit-breaker", {})},
        HealthCheckConfig: {
            k for u in raw["upstreams"].values() for k in u.get("health_check", {})
        },
    }
    for struct, keys in used.items():
        unused = [f.name for f in msgspec.structs.fields(struct) if f.name not in keys]
        assert not unused, f"the example never sets {struct.__name__} fields {unused}"


def test_the_first_route_sets_a_targets_breaker() -> None:
    """What the page says about breaker settings, checked on its example: the
    first route with circuit-breaker on an upstream configures its targets."""
    raw = _example_raw()
    config = parse_config(raw, environ={})
    pipeline = Pipeline.build(config, discover(), triogate.plugins.contract.PluginEnv())
    try:
        for name, upstream in pipeline.upstreams.items():
            first = next(
                (
                    r
                    for r in config.routes
                    if r.upstream == name and "circuit-breaker" in {**config.plugins, **r.plugins}
                ),
                None,
            )
            if first is None:
                assert all(p.breaker is None for p in upstream.pools), name
                continue
            table = {**config.plugins, **first.plugins}["circuit-breaker"]
            settings_only = {k: v for k, v in table.items() if k not in ("before", "after")}
            expected = msgspec.convert(settings_only, CircuitBreakerConfig)
            for pool in upstream.pools:
                assert pool.breaker is not None, (name, pool.url)
                settings = pool.breaker.settings
                for field in msgspec.structs.fields(settings):
                    assert getattr(settings, field.name) == getattr(expected, field.name), (
                        name,
                        field.name,
                    )
    finally:
        pipeline.close()
