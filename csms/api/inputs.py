"""What an operator sends, made safe once for every route: path segments, query values and JSON bodies.

Handlers and the database only ever see text that is valid Unicode without NUL characters (PostgreSQL
refuses NUL, and a lone surrogate cannot be encoded to send or store), integers that fit a 64-bit column,
finite numbers, date-times that convert to UTC and leave room for arithmetic, and JSON no deeper than
:data:`MAX_JSON_DEPTH`. Anything else is a 4xx with a JSON error body here, before any handler runs.
"""
from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from urllib.parse import unquote, urlsplit

from csms.api.errors import ApiError, bad_request, unprocessable
from csms.ocpp16 import parse_datetime

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: OCPP 1.6 ids (transactionId, reservationId, chargingProfileId) are 32-bit integers.
INT32_MAX = 2**31 - 1
#: Deeper than any body a route takes (OCPP payloads nest about 6 levels), far below Python's recursion limit.
MAX_JSON_DEPTH = 64
#: Date-times an operator may give: a day short of Python's first and a year short of its last, so that
#: handlers can add a window (a 31-day preview) or compare without overflowing.
EARLIEST = datetime(1, 1, 2, tzinfo=timezone.utc)
LATEST = datetime(9999, 1, 1, tzinfo=timezone.utc)
#: Plain decimals only: int() would also take "1_000", spaces and non-ASCII digits, and spend its time
#: on a 5,000-digit number.
_INTEGER = re.compile(r"[+-]?[0-9]{1,19}")


class Invalid(ValueError):
    """A value that cannot be used; the message says what was expected."""


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored or sent as text, or None when it can."""
    if "\x00" in value:
        return "contains a NUL character"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode (a lone surrogate)"
    return None


def to_text(raw: bytes | str) -> str:
    """Percent-decoded or raw bytes as text, refusing what is not UTF-8 or holds a NUL."""
    try:
        value = raw.decode("utf-8") if isinstance(raw, bytes) else unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise Invalid("is not UTF-8") from None
    problem = text_problem(value)
    if problem:
        raise Invalid(problem)
    return value


def to_integer(text: str, minimum: int | None = None, maximum: int | None = None) -> int:
    low = INT64_MIN if minimum is None else minimum
    high = INT64_MAX if maximum is None else maximum
    if not _INTEGER.fullmatch(text):
        raise Invalid(f"an integer in [{low}, {high}]")
    value = int(text)
    if not low <= value <= high:
        raise Invalid(f"an integer in [{low}, {high}]")
    return value


def to_boolean(text: str) -> bool:
    value = text.lower()
    if value not in ("true", "false", "1", "0"):
        raise Invalid("true or false")
    return value in ("true", "1")


#: The end of a date-time's time that says where its clock is: Z, or an offset (+01:00, -0500, +01).
_OFFSET = re.compile(r"(?:Z|[+-]\d\d(?::?\d\d(?::?\d\d(?:\.\d+)?)?)?)$")


def has_offset(text: str) -> bool:
    """Whether ``text`` is a date and a time (``T`` between them) whose time ends with Z or an offset."""
    _, separator, time = text.strip().upper().partition("T")
    return bool(separator) and _OFFSET.search(time) is not None


def to_datetime(text: str) -> datetime:
    """An ISO 8601 date-time with its offset (or ``Z``) as an aware UTC datetime within [EARLIEST, LATEST).

    Unlike a station's (read as UTC without one, as OCPP 1.6 asks for UTC), an operator's date-time
    without an offset, or a date alone, is refused: it may mean local time, and an hour's error in a
    filter or an expiry passes unnoticed."""
    try:
        value = parse_datetime(text)
    except ValueError:
        raise Invalid("an ISO 8601 date-time such as 2030-01-31T12:00:00Z") from None
    if not has_offset(text):
        raise Invalid("an ISO 8601 date-time with its offset or Z, such as 2030-01-31T12:00:00Z")
    if not EARLIEST <= value < LATEST:
        raise Invalid(f"a date-time from {EARLIEST:%Y-%m-%d} to {LATEST:%Y-%m-%d} (UTC)")
    return value


def is_datetime(text: str) -> bool:
    """fastjsonschema's ``date-time`` format for route bodies: what :func:`to_datetime` takes."""
    try:
        to_datetime(text)
    except Invalid:
        return False
    return "T" in text or "t" in text


def convert(spec, raw: str):
    """A path or query value as its declared kind (``spec`` is a :class:`csms.api.router.Param`)."""
    if spec.kind == "integer":
        value = to_integer(raw, spec.minimum, spec.maximum)
    elif spec.kind == "boolean":
        value = to_boolean(raw)
    elif spec.kind == "date-time":
        value = to_datetime(raw)
    else:
        value = raw
    if spec.enum is not None and value not in spec.enum:
        raise Invalid(f"one of {', '.join(map(str, spec.enum))}")
    return value


# -- JSON bodies ----------------------------------------------------------------------------------------


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_number(text: str) -> float | int:
    """A JSON number with a fraction or an exponent: a float, or an int when it is a whole number.

    JSON Schema (2020-12, the OpenAPI document's dialect) counts 1.0 as an integer, so the route's check
    takes it for an integer field; the OCPP schemas (draft 4) do not, nor does a database's integer
    column. Decoded as 1, it is the integer both the check and the code after it see."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} is too large")
    return int(value) if value.is_integer() else value


def parse_json(content: bytes):
    """The decoded body, or 400 invalid_json / json_too_deep, or 422 for a value no route can use."""
    try:
        value = json.loads(content, parse_constant=_refuse_constant, parse_float=_finite_number)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the hooks above
        raise bad_request(f"The request body is not valid JSON: {exc}", "invalid_json") from None
    check_json(value)
    return value


def _too_deep() -> ApiError:
    return bad_request(f"The request body nests deeper than {MAX_JSON_DEPTH} levels", "json_too_deep",
                       limit=MAX_JSON_DEPTH)


def check_json(value) -> None:
    """Walk a decoded body without recursion: depth, text, and numbers a column can hold."""
    stack = [(value, 0, "body")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, dict):
            if depth >= MAX_JSON_DEPTH:
                raise _too_deep()
            for key, child in item.items():
                _check_scalar(key, f"{where} key {key!r}")
                stack.append((child, depth + 1, f"{where}.{key}"))
        elif isinstance(item, list):
            if depth >= MAX_JSON_DEPTH:
                raise _too_deep()
            stack.extend((child, depth + 1, f"{where}[{index}]") for index, child in enumerate(item))
        else:
            _check_scalar(item, where)


def _check_scalar(item, where: str) -> None:
    problem = None
    if isinstance(item, str):
        problem = text_problem(item)
    elif isinstance(item, (int, float)) and not isinstance(item, bool) and not INT64_MIN <= item <= INT64_MAX:
        problem = "is outside the 64-bit integer range"
    if problem:
        # The value itself may be what cannot be shown (a surrogate): only its place is named.
        raise unprocessable(f"Invalid request body: {where.replace('body.', '', 1)} {problem}")


def check_window(body: dict, first: str, last: str) -> None:
    """422 ``reversed_time_window`` when the body gives both ends of a time window and ``first`` (a
    date-time the route's check has passed) is later than ``last``: a station would be sent a window
    holding nothing."""
    if first in body and last in body and to_datetime(body[first]) > to_datetime(body[last]):
        raise unprocessable(f"{first} ({body[first]}) is later than {last} ({body[last]})", "reversed_time_window")


#: The URL schemes a station is given for a file to fetch or upload (firmware, diagnostics, logs).
URL_SCHEMES = ("http", "https", "ftp", "ftps", "sftp")


def check_location(location: str) -> str:
    """A URL with a scheme stations use and a host; otherwise 422 invalid_location (nothing is sent)."""
    parts = urlsplit(location)
    try:
        host = parts.hostname
    except ValueError:
        host = None
    if parts.scheme.lower() not in URL_SCHEMES or not host or any(c.isspace() for c in location):
        raise unprocessable(f"location {location!r} is not a URL (expected {', '.join(URL_SCHEMES)})",
                            "invalid_location")
    return location
