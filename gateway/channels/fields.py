"""Field formats: decode, NFC-normalise and validate one text field (docs/contract.md, "Channels").

Pure code, no I/O. A bad value never raises: :func:`validate_text` answers a
:class:`~gateway.errors.Violation` whose message names the rule only. No message,
exception text or repr produced here contains the value (PINs, 個人番号, names).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime

from gateway.errors import Violation

__all__ = [
    "FORMAT_NAMES",
    "SAFE_FIELD_NAME",
    "TEXT_FORMAT_NAMES",
    "TextRule",
    "individual_number_check_digit",
    "validate_text",
]

# \Z, not $: "$" would also match before a trailing newline.
SAFE_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")

# Rule ids (Violation.rule).
ENCODING = "encoding"
EMPTY = "empty"
FORMAT = "format"
CHECK_DIGIT = "check_digit"
CONTROL_CHARACTER = "control_character"
MAX_LENGTH = "max_length"


class _Bad(Exception):
    """Internal: one broken rule. Carries the rule and a value-free message only."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(rule)
        self.rule = rule
        self.message = message


_Check = Callable[[str, int], str]


@dataclass(frozen=True)
class _Spec:
    check: _Check
    default_max: int  # in characters after NFC
    length_rule: str  # rule answered when the raw bytes are far too long
    length_message: str


# --- fixed formats ------------------------------------------------------------------

_APPLICATION_ID = re.compile(r"[0-9]{23}")
_PIN4 = re.compile(r"[0-9]{4}")
_PIN_SIGNATURE = re.compile(r"[A-Z0-9]{6,16}")
_INDIVIDUAL_NUMBER = re.compile(r"[0-9]{12}")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATETIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?"
    r"(?:Z|[+-][0-9]{2}:[0-9]{2})"
)
_PHONE = re.compile(r"\+?[0-9]+(?:-[0-9]+)*")
_CODE = re.compile(r"[A-Za-z0-9_-]+")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")
_EMAIL_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# 氏名フリガナ: hiragana (incl. ゔ, small kana, ゝゞ), katakana (incl. ヴ, ヵヶ, ヷ-ヺ,
# ヽヾ), the middle dot ・, the prolonged sound mark ー, ASCII and ideographic spaces.
# Half-width katakana are refused (NFC keeps them half-width).
_KANA = re.compile(r"[\u3041-\u3096\u309D\u309E\u30A1-\u30FA\u30FB\u30FC\u30FD\u30FE \u3000]+")
# Unicode categories refused in free text: controls (incl. tab/newline), format
# characters (bidi overrides, zero-width, BOM), line/paragraph separators, surrogates.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})

_MSG_APPLICATION_ID = "must be exactly 23 ASCII digits"
_MSG_BOOLEAN = "must be one of true, false, 1 or 0"
_MSG_PIN_SIGNATURE = (
    "must be 6 to 16 characters of A-Z and 0-9 with at least one letter and one digit"
)
_MSG_PIN4 = "must be exactly 4 ASCII digits"
_MSG_INDIVIDUAL_NUMBER = "must be exactly 12 ASCII digits"
_MSG_CHECK_DIGIT = "check digit does not match (総務省令第85号 第5条)"
_MSG_DATE = "must be an existing calendar date written YYYY-MM-DD"
_MSG_DATETIME = (
    "must be an ISO 8601 date-time with an explicit UTC offset (YYYY-MM-DDThh:mm[:ss]±hh:mm or Z)"
)
_MSG_SEX = "must be a JIS X 0303 sex code: 0, 1, 2 or 9"
_MSG_PHONE = "must be 10 to 15 ASCII digits, optionally a leading + and hyphens between digits"
_MSG_EMAIL = "must be an e-mail address local@domain of at most 254 ASCII characters"
_MSG_CODE = "must contain only ASCII letters, digits, hyphens and underscores"
_MSG_KANA = "must contain only kana, the prolonged sound mark, the middle dot and spaces"
_MSG_EMPTY = "must not be empty"
_MSG_CONTROL = "must not contain control or invisible formatting characters"


def _max_length_message(limit: int) -> str:
    return f"must be at most {limit} characters"


def _fixed(pattern: re.Pattern[str], message: str) -> _Check:
    def check(value: str, _limit: int) -> str:
        if pattern.fullmatch(value) is None:
            raise _Bad(FORMAT, message)
        return value

    return check


def _check_boolean(value: str, _limit: int) -> str:
    if value in ("true", "1"):
        return "true"
    if value in ("false", "0"):
        return "false"
    raise _Bad(FORMAT, _MSG_BOOLEAN)


def _check_pin_signature(value: str, _limit: int) -> str:
    if (
        _PIN_SIGNATURE.fullmatch(value) is None
        or not any("A" <= c <= "Z" for c in value)
        or not any("0" <= c <= "9" for c in value)
    ):
        raise _Bad(FORMAT, _MSG_PIN_SIGNATURE)
    return value


def _check_individual_number(value: str, _limit: int) -> str:
    if _INDIVIDUAL_NUMBER.fullmatch(value) is None:
        raise _Bad(FORMAT, _MSG_INDIVIDUAL_NUMBER)
    if individual_number_check_digit(value[:11]) != ord(value[11]) - ord("0"):
        raise _Bad(CHECK_DIGIT, _MSG_CHECK_DIGIT)
    return value


def _check_date(value: str, _limit: int) -> str:
    if _DATE.fullmatch(value) is None:
        raise _Bad(FORMAT, _MSG_DATE)
    try:
        date.fromisoformat(value)
    except ValueError:
        raise _Bad(FORMAT, _MSG_DATE) from None
    return value


def _check_datetime(value: str, _limit: int) -> str:
    if _DATETIME.fullmatch(value) is None:
        raise _Bad(FORMAT, _MSG_DATETIME)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _Bad(FORMAT, _MSG_DATETIME) from None
    if parsed.utcoffset() is None:  # pragma: no cover - the pattern requires an offset
        raise _Bad(FORMAT, _MSG_DATETIME)
    return value


def _check_sex(value: str, _limit: int) -> str:
    if value not in ("0", "1", "2", "9"):
        raise _Bad(FORMAT, _MSG_SEX)
    return value


def _check_phone(value: str, _limit: int) -> str:
    if _PHONE.fullmatch(value) is None:
        raise _Bad(FORMAT, _MSG_PHONE)
    digits = sum(1 for c in value if "0" <= c <= "9")
    if not 10 <= digits <= 15:
        raise _Bad(FORMAT, _MSG_PHONE)
    return value


def _check_email(value: str, limit: int) -> str:
    if len(value) > limit:
        raise _Bad(MAX_LENGTH, _max_length_message(limit))
    local, at, domain = value.partition("@")
    if not at or _EMAIL_LOCAL.fullmatch(local) is None:
        # Dots are allowed anywhere in the local part: legacy Japanese mobile-carrier
        # addresses (a..b@, a.@) break RFC 5322 yet are in use.
        raise _Bad(FORMAT, _MSG_EMAIL)
    labels = domain.split(".")
    if (
        len(labels) < 2
        or any(_EMAIL_LABEL.fullmatch(label) is None for label in labels)
        or labels[-1].isdigit()  # labels are ASCII here; a numeric TLD is an IP address
    ):
        raise _Bad(FORMAT, _MSG_EMAIL)
    return value


def _check_code(value: str, limit: int) -> str:
    if _CODE.fullmatch(value) is None:
        raise _Bad(FORMAT, _MSG_CODE)
    if len(value) > limit:
        raise _Bad(MAX_LENGTH, _max_length_message(limit))
    return value


def _check_text(value: str, limit: int) -> str:
    if any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in value):
        raise _Bad(CONTROL_CHARACTER, _MSG_CONTROL)
    value = value.strip()
    if not value:
        raise _Bad(EMPTY, _MSG_EMPTY)
    if len(value) > limit:
        raise _Bad(MAX_LENGTH, _max_length_message(limit))
    return value


def _check_kana(value: str, limit: int) -> str:
    if _KANA.fullmatch(value) is None:
        raise _Bad(FORMAT, _MSG_KANA)
    return _check_text(value, limit)


_MSG_COUNT = "must be a whole number from 1 to 10000000 without leading zeros"
_MSG_SHA256 = "must be 64 hexadecimal digits (a SHA-256 digest)"
_COUNT = re.compile(r"[1-9][0-9]{0,6}|10000000")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _check_sha256(value: str, _limit: int) -> str:
    if _SHA256.fullmatch(value) is None:
        raise _Bad(FORMAT, _MSG_SHA256)
    return value.lower()


def _spec(check: _Check, default_max: int, message: str) -> _Spec:
    """A fixed format: its length is part of the format."""
    return _Spec(check, default_max, FORMAT, message)


def _sized(check: _Check, default_max: int) -> _Spec:
    """A variable-length format bounded by TextRule.max_length."""
    return _Spec(check, default_max, MAX_LENGTH, "")


_SPECS: dict[str, _Spec] = {
    "application_id": _spec(_fixed(_APPLICATION_ID, _MSG_APPLICATION_ID), 23, _MSG_APPLICATION_ID),
    "boolean": _spec(_check_boolean, 5, _MSG_BOOLEAN),
    "pin_signature": _spec(_check_pin_signature, 16, _MSG_PIN_SIGNATURE),
    "pin4": _spec(_fixed(_PIN4, _MSG_PIN4), 4, _MSG_PIN4),
    "individual_number": _spec(_check_individual_number, 12, _MSG_INDIVIDUAL_NUMBER),
    "date": _spec(_check_date, 10, _MSG_DATE),
    "datetime": _spec(_check_datetime, 40, _MSG_DATETIME),
    "sex": _spec(_check_sex, 1, _MSG_SEX),
    "phone": _spec(_check_phone, 30, _MSG_PHONE),
    "text": _sized(_check_text, 200),
    "kana": _sized(_check_kana, 200),
    "email": _sized(_check_email, 254),
    "code": _sized(_check_code, 64),
    "count": _spec(_fixed(_COUNT, _MSG_COUNT), 8, _MSG_COUNT),
    "sha256": _spec(_check_sha256, 64, _MSG_SHA256),
}

TEXT_FORMAT_NAMES: frozenset[str] = frozenset(_SPECS)
"""Formats :class:`TextRule` accepts."""

FORMAT_NAMES: frozenset[str] = TEXT_FORMAT_NAMES | {"jpeg_photo", "opaque_file"}
"""Every supported field format; ``jpeg_photo`` and ``opaque_file`` are not text."""


@dataclass(frozen=True)
class TextRule:
    """How one text field is validated.

    ``max_length`` counts characters after NFC and defaults per format (text and kana
    200, email 254, code 64). For the fixed formats (PINs, dates, ...) the format
    itself bounds the length; a ``max_length`` set there is an extra upper bound.
    """

    format: str
    max_length: int | None = None

    def __post_init__(self) -> None:
        spec = _SPECS.get(self.format)
        if spec is None:
            raise ValueError(f"unknown text format {self.format!r}")
        if self.max_length is not None:
            if isinstance(self.max_length, bool) or not isinstance(self.max_length, int):
                raise TypeError("max_length must be an int")
            if self.max_length < 1:
                raise ValueError("max_length must be at least 1")

    @property
    def limit(self) -> int:
        """The effective maximum length in characters."""
        return self.max_length if self.max_length is not None else _SPECS[self.format].default_max


def validate_text(field: str, raw: bytes, rule: TextRule) -> tuple[str, Violation | None]:
    """Decode ``raw`` as strict UTF-8, NFC-normalise and validate it against ``rule``.

    Returns ``(normalised value, None)`` or ``("", Violation)``; never raises for bad input.
    """
    spec = _SPECS[rule.format]
    limit = rule.limit
    # Bound the work before decoding: NFC composes at most 4 code points (8 bytes)
    # into one character, so anything longer than this cannot fit after NFC.
    if len(raw) > 16 * limit + 64:
        message = spec.length_message or _max_length_message(limit)
        return "", Violation(field, spec.length_rule, message)
    try:
        decoded = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return "", Violation(field, ENCODING, "must be valid UTF-8")
    value = unicodedata.normalize("NFC", decoded)
    if not value:
        return "", Violation(field, EMPTY, _MSG_EMPTY)
    try:
        checked = spec.check(value, limit)
    except _Bad as bad:
        return "", Violation(field, bad.rule, bad.message)
    if len(checked) > limit:  # only reachable for a fixed format given a small max_length
        return "", Violation(field, MAX_LENGTH, _max_length_message(limit))
    return checked, None


# 総務省令第85号 第5条: weights Q_n for n = 1..11, P_n being the n-th digit from the right.
_WEIGHTS = tuple(n + 1 if n <= 6 else n - 5 for n in range(1, 12))


def individual_number_check_digit(first11: str) -> int:
    """The check digit (検査用数字) of a 個人番号 from its first 11 digits.

    r = Σ P_n·Q_n mod 11; the check digit is 0 if r ≤ 1 else 11 − r.
    Raises ValueError (without the value) unless given exactly 11 ASCII digits.
    """
    if len(first11) != 11 or not all("0" <= c <= "9" for c in first11):
        raise ValueError("expected exactly 11 ASCII digits")
    total = sum((ord(c) - ord("0")) * q for c, q in zip(reversed(first11), _WEIGHTS, strict=True))
    r = total % 11
    return 0 if r <= 1 else 11 - r
