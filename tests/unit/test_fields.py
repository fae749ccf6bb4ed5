"""Field formats of docs/contract.md: decoding, NFC, every format, and no value leaks."""

from __future__ import annotations

import random
import re
import unicodedata

import pytest

from gateway.channels.fields import (
    FORMAT_NAMES,
    SAFE_FIELD_NAME,
    TEXT_FORMAT_NAMES,
    TextRule,
    individual_number_check_digit,
    validate_text,
)
from gateway.errors import Violation


def check(
    fmt: str, value: str | bytes, max_length: int | None = None
) -> tuple[str, Violation | None]:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return validate_text("f", raw, TextRule(fmt, max_length))


VALID: list[tuple[str, str, str]] = [
    # (format, input, normalised value)
    ("application_id", "12345678901234567890123", "12345678901234567890123"),
    ("application_id", "00000000000000000000000", "00000000000000000000000"),
    ("boolean", "true", "true"),
    ("boolean", "false", "false"),
    ("boolean", "1", "true"),
    ("boolean", "0", "false"),
    ("pin_signature", "ABC123", "ABC123"),
    ("pin_signature", "A1B2C3D4E5F6G7H8", "A1B2C3D4E5F6G7H8"),
    ("pin_signature", "1ZZZZZ", "1ZZZZZ"),
    ("pin4", "0000", "0000"),
    ("pin4", "9876", "9876"),
    ("individual_number", "983205673214", "983205673214"),
    ("date", "2024-02-29", "2024-02-29"),
    ("date", "1900-01-01", "1900-01-01"),
    ("date", "2027-03-31", "2027-03-31"),
    ("datetime", "2026-05-26T09:30:00+09:00", "2026-05-26T09:30:00+09:00"),
    ("datetime", "2026-05-26T00:30:00Z", "2026-05-26T00:30:00Z"),
    ("datetime", "2026-05-26T09:30+09:00", "2026-05-26T09:30+09:00"),
    ("datetime", "2026-05-26T09:30:00.123456-05:00", "2026-05-26T09:30:00.123456-05:00"),
    ("text", "山田 太郎", "山田 太郎"),
    ("text", "  東京都千代田区1-1  ", "東京都千代田区1-1"),
    ("text", "\u3000髙橋\u3000", "髙橋"),
    ("text", "O'Brien-Smith, Mary", "O'Brien-Smith, Mary"),
    ("text", "x" * 200, "x" * 200),
    ("kana", "ヤマダ タロウ", "ヤマダ タロウ"),
    ("kana", "やまだ\u3000たろう", "やまだ\u3000たろう"),
    ("kana", "ジョン・スミス", "ジョン・スミス"),
    ("kana", "ヴァージニア", "ヴァージニア"),
    ("kana", "ササキ", "ササキ"),
    ("sex", "0", "0"),
    ("count", "1", "1"),
    ("count", "10000000", "10000000"),
    ("sha256", "AB" * 32, "ab" * 32),
    ("sex", "1", "1"),
    ("sex", "2", "2"),
    ("sex", "9", "9"),
    ("phone", "0312345678", "0312345678"),
    ("phone", "03-1234-5678", "03-1234-5678"),
    ("phone", "090-1234-5678", "090-1234-5678"),
    ("phone", "+81-90-1234-5678", "+81-90-1234-5678"),
    ("phone", "+123456789012345", "+123456789012345"),
    ("email", "taro.yamada@example.jp", "taro.yamada@example.jp"),
    ("email", "a+tag@mail.city.example.lg.jp", "a+tag@mail.city.example.lg.jp"),
    ("email", "taro..yamada.@docomo.ne.jp", "taro..yamada.@docomo.ne.jp"),
    ("email", "x@xn--eckwd4c7c.xn--zckzah", "x@xn--eckwd4c7c.xn--zckzah"),
    ("code", "R-2026_0001", "R-2026_0001"),
    ("code", "a", "a"),
    ("code", "Z" * 64, "Z" * 64),
]

INVALID: list[tuple[str, str | bytes, str]] = [
    # (format, input, rule)
    ("application_id", "", "empty"),
    ("application_id", "1234567890123456789012", "format"),
    ("application_id", "123456789012345678901234", "format"),
    ("application_id", "1234567890123456789012a", "format"),
    ("application_id", "１２３４５６７８９０１２３４５６７８９０１２３", "format"),
    ("application_id", "12345678901234567890123\n", "format"),
    ("application_id", " 12345678901234567890123", "format"),
    ("application_id", "٠١٢٣٤٥٦٧٨٩٠١٢٣٤٥٦٧٨٩٠١٢", "format"),
    ("boolean", "", "empty"),
    ("boolean", "True", "format"),
    ("boolean", "yes", "format"),
    ("boolean", "2", "format"),
    ("boolean", "true ", "format"),
    ("pin_signature", "ABCDEF", "format"),
    ("pin_signature", "123456", "format"),
    ("pin_signature", "AB12", "format"),
    ("pin_signature", "A1B2C3D4E5F6G7H8I", "format"),
    ("pin_signature", "abc123", "format"),
    ("pin_signature", "ABC-123", "format"),
    ("pin_signature", "ＡＢＣ１２３", "format"),
    ("pin_signature", "ABC 123", "format"),
    ("pin4", "", "empty"),
    ("pin4", "123", "format"),
    ("pin4", "12345", "format"),
    ("pin4", "12a4", "format"),
    ("pin4", "１２３４", "format"),
    ("pin4", "²³¹⁴", "format"),
    ("pin4", "1234\n", "format"),
    ("individual_number", "983205673215", "check_digit"),
    ("individual_number", "98320567321", "format"),
    ("individual_number", "9832056732144", "format"),
    ("individual_number", "9832-0567-3214", "format"),
    ("individual_number", "９８３２０５６７３２１４", "format"),
    ("individual_number", "", "empty"),
    ("date", "2023-02-29", "format"),
    ("date", "2023-02-30", "format"),
    ("date", "2023-13-01", "format"),
    ("date", "0000-01-01", "format"),
    ("date", "20230101", "format"),
    ("date", "2023-1-1", "format"),
    ("date", "2023-W01-1", "format"),
    ("date", "2023/01/01", "format"),
    ("date", "２０２３-０１-０１", "format"),
    ("date", "2023-01-01T00:00:00", "format"),
    ("datetime", "2026-05-26T09:30:00", "format"),
    ("datetime", "2026-05-26 09:30:00+09:00", "format"),
    ("datetime", "2026-05-26T24:00:00+09:00", "format"),
    ("datetime", "2026-02-30T09:30:00+09:00", "format"),
    ("datetime", "2026-05-26T09:30:00+24:00", "format"),
    ("datetime", "2026-05-26T09:30:00+0900", "format"),
    ("datetime", "2026-05-26", "format"),
    ("datetime", "2026-05-26T09:30:00z", "format"),
    ("text", "", "empty"),
    ("text", "   \u3000 ", "empty"),
    ("text", "山田\n太郎", "control_character"),
    ("text", "山田\t太郎", "control_character"),
    ("text", "山田\x00", "control_character"),
    ("text", "abc\u202edef", "control_character"),
    ("text", "\ufeff山田", "control_character"),
    ("text", "a\u2028b", "control_character"),
    ("text", "x" * 201, "max_length"),
    ("text", b"\xff\xfe", "encoding"),
    ("kana", "山田", "format"),
    ("kana", "yamada", "format"),
    ("kana", "ﾔﾏﾀﾞ", "format"),
    ("kana", "ヤマダ1", "format"),
    ("kana", "ヤマダ\n", "format"),
    ("kana", "\u3000 ", "empty"),
    ("kana", "ア" * 201, "max_length"),
    ("sex", "3", "format"),
    ("sex", "male", "format"),
    ("sex", "１", "format"),
    ("sex", "", "empty"),
    ("phone", "031234567", "format"),
    ("phone", "1234567890123456", "format"),
    ("phone", "03--1234-5678", "format"),
    ("phone", "-0312345678", "format"),
    ("phone", "0312345678-", "format"),
    ("phone", "03 1234 5678", "format"),
    ("phone", "(03)1234-5678", "format"),
    ("phone", "++810312345678", "format"),
    ("phone", "０３１２３４５６７８", "format"),
    ("email", "no-at-sign.example.jp", "format"),
    ("email", "a@b@example.jp", "format"),
    ("email", "a b@example.jp", "format"),
    ("email", "@example.jp", "format"),
    ("email", "taro@", "format"),
    ("email", "taro@localhost", "format"),
    ("email", "taro@-bad.example.jp", "format"),
    ("email", "taro@example..jp", "format"),
    ("email", "taro@192.168.0.1", "format"),
    ("email", "山田@example.jp", "format"),
    ("email", "taro@例え.jp", "format"),
    ("email", "x" * 65 + "@example.jp", "format"),
    ("email", "a@" + ("b" * 60 + ".") * 5 + "jp", "max_length"),
    ("code", "R 1", "format"),
    ("code", "R/1", "format"),
    ("code", "Ｒ１", "format"),
    ("code", "Z" * 65, "max_length"),
    ("code", "", "empty"),
    ("count", "0", "format"),
    ("count", "007", "format"),
    ("count", "10000001", "format"),
    ("count", "-1", "format"),
    ("sha256", "ab" * 31, "format"),
    ("sha256", "g" * 64, "format"),
]


def test_tables_cover_every_text_format() -> None:
    """The valid and invalid tables each exercise every text format."""
    assert {row[0] for row in VALID} == TEXT_FORMAT_NAMES
    assert {row[0] for row in INVALID} == TEXT_FORMAT_NAMES


def test_format_names() -> None:
    """FORMAT_NAMES holds the text formats plus the two file formats."""
    assert TEXT_FORMAT_NAMES | {"jpeg_photo", "opaque_file"} == FORMAT_NAMES


@pytest.mark.parametrize(("fmt", "value", "expected"), VALID)
def test_valid_values_are_accepted_and_normalised(fmt: str, value: str, expected: str) -> None:
    """A well-formed value is accepted and returned normalised."""
    assert check(fmt, value) == (expected, None)


@pytest.mark.parametrize(("fmt", "value", "rule"), INVALID)
def test_invalid_values_are_refused_with_rule(fmt: str, value: str | bytes, rule: str) -> None:
    """A malformed value yields ("", Violation) naming the field and the broken rule."""
    normalised, violation = check(fmt, value)
    assert normalised == ""
    assert violation is not None
    assert (violation.field, violation.rule) == ("f", rule)
    assert violation.message


@pytest.mark.parametrize("fmt", sorted(TEXT_FORMAT_NAMES))
def test_invalid_utf8_is_refused_for_every_format(fmt: str) -> None:
    """Bytes that are not strict UTF-8 (incl. encoded surrogates, overlongs) give rule encoding."""
    for raw in (b"\x80", b"12\xff34", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe3\x81"):
        normalised, violation = validate_text("f", raw, TextRule(fmt))
        assert normalised == ""
        assert violation is not None and violation.rule == "encoding"


def test_nfc_composes_decomposed_kana() -> None:
    """A decomposed が (か + U+3099) is returned composed."""
    decomposed = "か\u3099"
    value, violation = check("text", decomposed)
    assert violation is None
    assert value == "が" and len(value) == 1
    value, violation = check("kana", "カ\u3099ス")
    assert (value, violation) == ("ガス", None)


def test_nfc_keeps_half_width_katakana_in_text() -> None:
    """NFC (not NFKC) leaves half-width katakana as they are in free text."""
    assert check("text", "ｶﾞｽ") == ("ｶﾞｽ", None)


def test_nfc_composes_latin_and_counts_length_after_nfc() -> None:
    """Length is counted in characters after NFC: 200 decomposed é fit a 200 limit."""
    decomposed = "e\u0301" * 200
    value, violation = check("text", decomposed)
    assert violation is None
    assert value == "é" * 200
    assert unicodedata.is_normalized("NFC", value)


def test_max_length_can_be_configured_for_variable_formats() -> None:
    """TextRule.max_length overrides the default for text, kana, email and code."""
    assert check("text", "山田太郎", max_length=4) == ("山田太郎", None)
    _, violation = check("text", "山田太郎五", max_length=4)
    assert violation is not None and violation.rule == "max_length"
    assert "4" in violation.message
    _, violation = check("code", "ABCDE", max_length=4)
    assert violation is not None and violation.rule == "max_length"
    _, violation = check("kana", "アイウエオ", max_length=4)
    assert violation is not None and violation.rule == "max_length"
    _, violation = check("email", "ab@c.jp", max_length=6)
    assert violation is not None and violation.rule == "max_length"


def test_huge_input_is_refused_before_decoding() -> None:
    """Megabytes of input are refused by length (even if not valid UTF-8) without decoding."""
    _, violation = validate_text("f", b"\xff" * 5_000_000, TextRule("text"))
    assert violation is not None and violation.rule == "max_length"
    _, violation = validate_text("f", b"1" * 5_000_000, TextRule("pin4"))
    assert violation is not None and violation.rule == "format"


@pytest.mark.parametrize("max_length", [0, -1])
def test_text_rule_refuses_non_positive_max_length(max_length: int) -> None:
    """max_length must be at least 1."""
    with pytest.raises(ValueError):
        TextRule("text", max_length)


def test_max_length_on_fixed_format_is_an_extra_bound() -> None:
    """A max_length on a fixed format never loosens it and refuses longer values."""
    assert check("pin4", "1234", max_length=30) == ("1234", None)
    _, violation = check("pin4", "12345", max_length=30)
    assert violation is not None and violation.rule == "format"
    _, violation = check("application_id", "1" * 23, max_length=10)
    assert violation is not None and violation.rule == "max_length"


@pytest.mark.parametrize("fmt", ["jpeg_photo", "opaque_file", "nonsense", ""])
def test_text_rule_refuses_non_text_formats(fmt: str) -> None:
    """TextRule only takes text formats."""
    with pytest.raises(ValueError):
        TextRule(fmt)


def test_check_digit_of_design_example() -> None:
    """The contract's example 983205673214 has check digit 4 and validates."""
    assert individual_number_check_digit("98320567321") == 4
    assert check("individual_number", "983205673214") == ("983205673214", None)


def test_wrong_check_digit_is_refused() -> None:
    """Every last digit but the right one is refused by rule check_digit."""
    for last in "012356789":
        _, violation = check("individual_number", "98320567321" + last)
        assert violation is not None and violation.rule == "check_digit"


def test_check_digit_by_hand() -> None:
    """Hand-computed cases: r ≤ 1 gives 0, otherwise 11 − r."""
    assert individual_number_check_digit("00000000000") == 0  # r = 0
    # P_1 = 5 with Q_1 = 2: r = 10 -> 1.
    assert individual_number_check_digit("00000000005") == 1
    # P_7 = 1 with Q_7 = 2: r = 2 -> 9.
    assert individual_number_check_digit("00001000000") == 9
    # P_11 = 1 with Q_11 = 6: r = 6 -> 5.
    assert individual_number_check_digit("10000000000") == 5


@pytest.mark.parametrize(
    "bad", ["", "9832056732", "983205673214", "９８３２０５６７３２１", "abcdefghijk"]
)
def test_check_digit_function_refuses_bad_input_without_value(bad: str) -> None:
    """individual_number_check_digit raises ValueError whose text does not contain the input."""
    with pytest.raises(ValueError) as info:
        individual_number_check_digit(bad)
    if bad:
        assert bad not in str(info.value)


def test_exactly_one_check_digit_validates_for_random_prefixes() -> None:
    """For 1,000 random 11-digit prefixes exactly one of the ten last digits validates."""
    rng = random.Random(20260526)
    for _ in range(1000):
        prefix = "".join(rng.choice("0123456789") for _ in range(11))
        ok = [d for d in "0123456789" if check("individual_number", prefix + d)[1] is None]
        assert ok == [str(individual_number_check_digit(prefix))]


PLANTED = "PLANTED-123456789012"
PLANTED_DIGITS = "123456789012"


def planted_inputs(fmt: str) -> list[bytes]:
    """Distinctive invalid values for ``fmt``, each carrying the planted marker."""
    inputs = [
        PLANTED,
        PLANTED + "\n",
        PLANTED + "\x00",
        PLANTED + "@@",
        PLANTED * 20,
        "x" * 300 + PLANTED,
        "ア" * 300 + PLANTED,
    ]
    raw = [s.encode() for s in inputs]
    raw.append(PLANTED.encode() + b"\xff")
    raw.append(PLANTED.encode() * 2000)
    if fmt == "individual_number":
        raw.append(b"123456789012")  # wrong check digit, digits only
    if fmt == "application_id":
        raw.append(b"12345678901234567890123X")
    return raw


def _contains_secret(text: str) -> bool:
    if PLANTED in text or "PLANTED" in text:
        return True
    # No run of 4+ of the planted digits in order, e.g. "1234" or "9012".
    return any(PLANTED_DIGITS[i : i + 4] in text for i in range(len(PLANTED_DIGITS) - 3))


@pytest.mark.parametrize("fmt", sorted(TEXT_FORMAT_NAMES))
def test_violation_never_contains_the_value(fmt: str) -> None:
    """For every format, a planted invalid value never appears in message, str or repr."""
    refused = 0
    for raw in planted_inputs(fmt):
        normalised, violation = validate_text("secret_field", raw, TextRule(fmt))
        if violation is None:  # e.g. the bare marker is a valid "text" value
            assert fmt in ("text", "code")
            continue
        refused += 1
        assert normalised == ""
        for text in (violation.message, str(violation), repr(violation), str(violation.as_dict())):
            assert not _contains_secret(text), (fmt, violation.rule)
    assert refused >= 7


def test_text_rule_repr_has_no_value() -> None:
    """TextRule holds no value: its repr only shows the format and limit."""
    assert re.fullmatch(r"TextRule\(format='text', max_length=None\)", repr(TextRule("text")))


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("application_id", True),
        ("pin_user_cert", True),
        ("a", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("1abc", False),
        ("_abc", False),
        ("Abc", False),
        ("ab-c", False),
        ("ab c", False),
        ("abc\n", False),
        ("", False),
    ],
)
def test_safe_field_name(name: str, ok: bool) -> None:
    """SAFE_FIELD_NAME accepts lower-case snake-case names up to 64 characters only."""
    assert (SAFE_FIELD_NAME.match(name) is not None) is ok
