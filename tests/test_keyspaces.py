"""Keyspaces: ``[keyspaces.NAME] prefix`` in the config (``[keys] prefix`` is
``default``), and the key formats of every keyspace (``Keyspaces``)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tests.conftest import make_config, make_secrets
from triogate.config import Config, parse_config
from triogate.control.keyformat import KeyFormat, Keyspaces
from triogate.errors import ConfigError, ValidationError
from triogate.runtime.gateway import Gateway
from triogate.runtime.reload import Applies, Swap
from triogate.storage import MemoryStore


def load(keyspaces: dict[str, Any], **keys: Any) -> Config:
    raw: dict[str, Any] = {"keyspaces": keyspaces}
    if keys:
        raw["keys"] = keys
    return parse_config(raw, environ={})


def errors_of(keyspaces: dict[str, Any], **keys: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load(keyspaces, **keys)
    return {e.path: e.message for e in info.value.errors}


# ---- the config ---------------------------------------------------------------------


def test_default_is_keys_prefix_and_others_follow() -> None:
    config = load({"test": {"prefix": "test_"}, "live": {"prefix": "live_"}}, prefix="acme_")
    assert config.keyspace_prefixes == {"default": "acme_", "test": "test_", "live": "live_"}
    assert list(config.keyspace_prefixes) == ["default", "test", "live"]
    assert parse_config({}, environ={}).keyspace_prefixes == {"default": "tg_"}


def test_a_default_table_is_refused() -> None:
    errors = errors_of({"default": {"prefix": "dflt_"}})
    assert "keyspaces.default" in errors and "[keys] prefix" in errors["keyspaces.default"]


@pytest.mark.parametrize(
    ("keyspaces", "path", "words"),
    [
        ({"a": {"prefix": "tg_"}}, "keyspaces.a.prefix", "keyspace 'default'"),
        ({"a": {"prefix": "x_"}, "b": {"prefix": "x_"}}, "keyspaces.b.prefix", "keyspace 'a'"),
        ({"a": {"prefix": "tgadm_"}}, "keyspaces.a.prefix", "admin keys"),
        ({"a": {"prefix": "Test_"}}, "keyspaces.a.prefix", "lowercase letter"),
        ({"a": {"prefix": "te_st_"}}, "keyspaces.a.prefix", "lowercase letter"),
        ({"a": {"prefix": "a" * 17 + "_"}}, "keyspaces.a.prefix", "lowercase letter"),
        ({"a": {}}, "keyspaces.a.prefix", "required"),
        ({"a": {"prefix": "a_", "extra": 1}}, "keyspaces.a.extra", "unknown"),
        ({"a": "a_"}, "keyspaces.a", "Expected `object`"),
        ({"9lives": {"prefix": "nine_"}}, "keyspaces.9lives", "keyspace name"),
        ({"has space": {"prefix": "sp_"}}, "keyspaces.has space", "keyspace name"),
        ({"x" * 65: {"prefix": "long_"}}, "keyspaces." + "x" * 65, "keyspace name"),
    ],
)
def test_bad_keyspaces_are_config_errors(keyspaces: dict[str, Any], path: str, words: str) -> None:
    errors = errors_of(keyspaces)
    assert path in errors, errors
    assert words.lower() in errors[path].lower(), errors[path]


def test_every_keyspace_error_is_reported_at_once() -> None:
    # (The cross-field rules run once every value decodes, as for routes.)
    errors = errors_of({"default": {"prefix": "d_"}, "a": {"prefix": "tg_"}, "b": {"prefix": "b_"}})
    assert set(errors) == {"keyspaces.default", "keyspaces.a.prefix"}


def test_too_many_keyspaces_are_refused() -> None:
    many = {f"k{i}": {"prefix": f"k{i}_"} for i in range(65)}
    assert "keyspaces" in errors_of(many)
    assert len(load(dict(list(many.items())[:64])).keyspace_prefixes) == 65


def test_keyspaces_from_the_environment() -> None:
    config = parse_config({}, environ={"TRIOGATE_KEYSPACES__TEST__PREFIX": "test_"})
    assert config.keyspace_prefixes == {"default": "tg_", "test": "test_"}


# ---- the formats ----------------------------------------------------------------------

SPACES = Keyspaces({"default": "tg_", "test": "test_", "live": "live_"})


@pytest.mark.parametrize("name", ["default", "test", "live"])
def test_each_keyspace_generates_its_own_keys(name: str) -> None:
    key = SPACES.generate(name)
    assert key.startswith(SPACES.prefix(name))
    assert SPACES.is_well_formed(key)
    assert SPACES.keyspace_of(key) == name
    assert KeyFormat(SPACES.prefix(name)).is_well_formed(key)
    assert SPACES.start(key) == key[: len(SPACES.prefix(name)) + 4]


def test_a_key_of_another_gateway_prefix_is_malformed() -> None:
    for key in (KeyFormat("other_").generate(), KeyFormat("tgadm_").generate()):
        assert not SPACES.is_well_formed(key)
        assert SPACES.keyspace_of(key) is None


@pytest.mark.parametrize(
    "key",
    [
        "",
        "_",
        "tg_",
        "test_",
        "nounderscore" * 5,
        "_" * 55,
        "test_" + "a" * 49,  # right length, wrong checksum
        "TEST_" + "a" * 49,
    ],
)
def test_malformed_keys_are_refused(key: str) -> None:
    assert not SPACES.is_well_formed(key)
    assert SPACES.keyspace_of(key) is None


def test_a_typo_moving_a_key_to_another_keyspace_fails_its_checksum() -> None:
    key = SPACES.generate("test")
    moved = "live" + key[4:]  # same length: test_ and live_
    assert not SPACES.is_well_formed(moved)


def test_one_keyspace_uses_the_format_itself() -> None:
    single = Keyspaces.single("tg_")
    key = single.generate()
    assert single.is_well_formed(key) and single.keyspace_of(key) == "default"
    assert not single.is_well_formed(SPACES.generate("test"))
    assert list(single) == ["default"] and len(single) == 1 and "default" in single


def test_unknown_keyspace_is_a_400_on_the_field() -> None:
    assert SPACES.require("test").prefix == "test_"
    with pytest.raises(ValidationError) as info:
        SPACES.require("nope")
    assert info.value.errors[0].path == "keyspace"
    assert "default, live, test" in info.value.errors[0].message
    with pytest.raises(KeyError):
        SPACES.generate("nope")


@pytest.mark.parametrize(
    "prefixes",
    [{"test": "test_"}, {"default": "tg_", "a": "tg_"}, {"default": "Bad"}],
)
def test_bad_keyspace_sets_are_refused(prefixes: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Keyspaces(prefixes)


# ---- the key service and reload -------------------------------------------------------


def test_the_gateway_takes_every_keyspace_and_a_reload_swaps_them(tmp_path: Any) -> None:
    base = make_config(tmp_path)
    config = msgspec.structs.replace(base, keyspaces=load({"test": {"prefix": "test_"}}).keyspaces)
    gw = Gateway(config, MemoryStore(), make_secrets())
    try:
        test_key = gw.keys.format.generate("test")
        assert gw.keys.format.is_well_formed(test_key)
        grown = msgspec.structs.replace(
            config, keyspaces=load({"live": {"prefix": "live_"}}).keyspaces
        )
        swap = Swap(gw.pipeline, gw.pipeline, (), grown, frozenset({Applies.KEYS}))
        gw.use_keyspaces(swap)
        assert not gw.keys.format.is_well_formed(test_key)  # removed: malformed now
        assert gw.keys.format.is_well_formed(gw.keys.format.generate("live"))
        # A reload that changed no keyspace leaves the formats alone.
        same = gw.keys.format
        gw.use_keyspaces(Swap(gw.pipeline, gw.pipeline, (), config, frozenset()))
        assert gw.keys.format is same
    finally:
        gw.pipeline.close()
