import pytest

from triogate.control.keyformat import BODY_LENGTH, CHECKSUM_LENGTH, KeyFormat

FMT = KeyFormat("tg_")


def test_generated_keys_are_well_formed_and_distinct() -> None:
    keys = {FMT.generate() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("tg_")
        assert len(key) == 3 + BODY_LENGTH + CHECKSUM_LENGTH
        assert FMT.is_well_formed(key)


def test_every_single_character_typo_is_caught() -> None:
    key = FMT.generate()
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    for i in range(3, len(key)):
        replacement = alphabet[(alphabet.index(key[i]) + 1) % 62]
        typo = key[:i] + replacement + key[i + 1 :]
        assert not FMT.is_well_formed(typo), (i, typo)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k[:-1],  # truncated
        lambda k: k + "0",  # too long
        lambda k: "xx_" + k[3:],  # wrong prefix
        lambda k: k[:10] + "-" + k[11:],  # outside base62
        lambda k: k[:10] + "é" + k[11:],
        lambda k: "",
        lambda k: k.upper(),
    ],
)
def test_malformed_keys_are_rejected(mangle: object) -> None:
    key = FMT.generate()
    assert callable(mangle)
    assert not FMT.is_well_formed(mangle(key))


def test_prefixes_do_not_cross() -> None:
    admin = KeyFormat("tgadm_")
    assert not FMT.is_well_formed(admin.generate())
    assert not admin.is_well_formed(FMT.generate())


@pytest.mark.parametrize("prefix", ["", "tg", "TG_", "_", "a" * 17 + "_", "t g_"])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        KeyFormat(prefix)


def test_start_is_a_short_non_secret_hint() -> None:
    key = FMT.generate()
    assert FMT.start(key) == key[:7]
