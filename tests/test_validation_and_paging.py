from typing import Annotated

import msgspec
import pytest

from triogate.control.ids import new_id
from triogate.control.paging import decode_cursor, encode_cursor, take_page
from triogate.errors import ValidationError
from triogate.storage import Credits, RateLimit
from triogate.validation import convert_all, decode_json_object


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    n: Annotated[int, msgspec.Meta(ge=1)]


class Outer(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(max_length=3)]
    tags: list[Annotated[str, msgspec.Meta(max_length=2)]] = []
    inner: list[Inner] = []
    by_name: dict[str, Inner] = {}
    credits: Credits | None = None
    limits: list[RateLimit] = []


def errors_of(raw: object, tp: type = Outer, strict: bool = True) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        convert_all(raw, tp, strict=strict)
    return [(e.path, e.message) for e in info.value.errors]


def test_every_error_is_reported_with_its_path() -> None:
    errs = errors_of(
        {
            "name": "toolong",
            "tags": ["ok", "bad!"],
            "inner": [{"n": 0}, {"n": "x"}, {"n": 1, "z": 1}],
            "by_name": {"a": {"n": -1}},
            "credits": {"remaining": -1},
            "limits": [{"name": "a"}],
            "extra": True,
        }
    )
    paths = [p for p, _ in errs]
    assert paths == [
        "extra",
        "name",
        "tags[1]",
        "inner[0].n",
        "inner[1].n",
        "inner[2].z",
        "by_name.a.n",
        "credits.remaining",
        "limits[0].limit",
        "limits[0].period_seconds",
    ]
    assert ("extra", "unknown field") in errs
    assert ("limits[0].limit", "required field is missing") in errs


def test_missing_required_and_non_object() -> None:
    assert errors_of({}) == [("name", "required field is missing")]
    assert errors_of([1, 2])[0][0] == "$"


def test_valid_input_converts() -> None:
    out = convert_all({"name": "abc", "inner": [{"n": 2}], "credits": None}, Outer)
    assert out == Outer(name="abc", inner=[Inner(2)], credits=None)


def test_query_strings_convert_when_not_strict() -> None:
    assert convert_all({"n": "5"}, Inner, strict=False) == Inner(5)
    assert errors_of({"n": "5"}, Inner) == [("n", "Expected `int`, got `str`")]


@pytest.mark.parametrize("body", [b"{", b"[1]", b'"s"', b"\xff\xfe", b"nul"])
def test_decode_json_object_rejects(body: bytes) -> None:
    with pytest.raises(ValidationError):
        decode_json_object(body)


def test_decode_json_object_empty_is_empty_object() -> None:
    assert decode_json_object(b"  ") == {}


def test_cursor_roundtrip_and_rejects() -> None:
    key_id = new_id("key")
    assert decode_cursor(encode_cursor(key_id), "key") == key_id.encode()
    assert decode_cursor(None, "key") is None
    for bad in ["", "!!!", encode_cursor("key_short"), encode_cursor(new_id("aud"))]:
        with pytest.raises(ValidationError):
            decode_cursor(bad, "key")


def test_take_page_limits_and_cursors() -> None:
    rows = [(f"id{i:02d}", i) for i in range(10, 0, -1)]  # newest first
    items, cursor = take_page(rows, limit=3, keep=lambda r: True, view=lambda r: r)
    assert items == [10, 9, 8]
    assert cursor == encode_cursor("id08")
    items, cursor = take_page(rows, limit=5, keep=lambda r: r % 2 == 0, view=lambda r: r)
    assert items == [10, 8, 6, 4, 2]
    assert cursor is None
    # A filter that matches little stops at the scan budget and hands a cursor on.
    items, cursor = take_page(rows, limit=5, keep=lambda r: r == 1, view=lambda r: r, scan_budget=4)
    assert items == []
    assert cursor == encode_cursor("id07")
