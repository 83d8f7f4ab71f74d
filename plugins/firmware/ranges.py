"""Byte range requests (RFC 9110 §14) for the firmware file server: what a Range header asks of a file.

Written here rather than taken from ``twisted.web.static.File``, which sends every range asked for
(``bytes=0-,0-,…`` returned the file a thousand times) and answers some headers with a 500.
"""
from __future__ import annotations

import re

_INT_RANGE = re.compile(r"([0-9]+)-([0-9]*)")
_SUFFIX_RANGE = re.compile(r"-([0-9]+)")
#: A position with more digits than this is past the end of any file (and ``int()`` refuses very long
#: digit strings).
_MAX_DIGITS = 18
_PAST_ANY_FILE = 1 << 63


def _position(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else _PAST_ANY_FILE


def _range_specs(value: str, max_ranges: int) -> list[tuple[int | None, int | None]] | None:
    """The range-specs of a ``bytes`` ranges-specifier, as sent: ``(first, last)`` for an int-range
    (``last`` None: to the end), ``(None, length)`` for a suffix-range. None when the header is to
    be ignored: not the grammar, another unit, or more than ``max_ranges`` ranges.
    """
    unit, equals, range_set = value.strip(" \t").partition("=")
    if not equals or unit.lower() != "bytes":
        return None
    # A list (RFC 9110 §5.6.1) may hold empty elements, but "1#" needs at least one that is not.
    elements = [element.strip(" \t") for element in range_set.split(",")]
    elements = [element for element in elements if element]
    if not elements or len(elements) > max_ranges:
        return None
    specs = []
    for element in elements:
        int_range = _INT_RANGE.fullmatch(element)
        if int_range is not None:
            first = _position(int_range.group(1))
            last = _position(int_range.group(2)) if int_range.group(2) else None
            if last is not None and last < first:
                return None  # an invalid int-range makes the whole specifier invalid (§14.1.1)
            specs.append((first, last))
            continue
        suffix = _SUFFIX_RANGE.fullmatch(element)
        if suffix is None:
            return None
        specs.append((None, _position(suffix.group(1))))
    return specs


def _satisfiable(spec: tuple[int | None, int | None], size: int) -> tuple[int, int] | None:
    """``(first, last)`` byte positions of ``spec`` in a file of ``size`` bytes, or None (§14.1.2)."""
    first, last = spec
    if first is None:
        # A suffix longer than the file is the whole file.
        return (max(0, size - last), size - 1) if last > 0 else None
    if first >= size:
        return None
    return first, size - 1 if last is None else min(last, size - 1)


def requested_ranges(value: str, size: int, max_ranges: int) -> list[tuple[int, int]] | None:
    """The ranges of a file of ``size`` bytes to send for a Range header ``value``.

    None: ignore the header and send the whole file (an invalid header, too many ranges, an empty
    file: RFC 9110 §14.2 lets a server ignore Range). ``[]``: nothing asked for is in the file (416).
    Otherwise ``(first, last)`` pairs (inclusive) with overlapping and adjacent ranges merged, in the
    order they were asked for (a merged range where its first part was; §14.6).
    """
    specs = _range_specs(value, max_ranges)
    if specs is None or size == 0:
        return None
    wanted = [(position, order) for order, spec in enumerate(specs)
              if (position := _satisfiable(spec, size)) is not None]
    merged: list[list[int]] = []  # [first, last, order of its first-asked part]
    for (first, last), order in sorted(wanted):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
            merged[-1][2] = min(merged[-1][2], order)
        else:
            merged.append([first, last, order])
    return [(first, last) for first, last, _ in sorted(merged, key=lambda item: item[2])]
