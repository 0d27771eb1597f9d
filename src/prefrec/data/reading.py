"""The one path by which user JSON is decoded: example files, ``rank --input`` requests
and raw review lines all come through here.

Python's ``json`` module lets several kinds of bad input through or out as the wrong
exception, so each is turned into one :class:`~prefrec.errors.DataError` naming the file,
the record and, where it can be told, the field:

- invalid UTF-8 (the byte offset, and the record when the rest of the file decodes);
- syntax errors and truncated files (line and column);
- ``NaN`` / ``Infinity`` / ``-Infinity``: not JSON, though ``json.loads`` accepts them;
- strings holding a lone surrogate (``"\\ud800"``), which no UTF-8 file can be written with;
- integers too long for Python to convert (over 4300 digits: ``ValueError``);
- nesting deeper than :data:`MAX_DEPTH`: no record of any supported format nests beyond a
  few levels, and deep nesting otherwise ends in a ``RecursionError`` somewhere (in the
  decoder at ~1000 levels, in a writer or a walk before that);
- an empty dataset: a file that holds no records is refused rather than read as "no
  examples", so an audit or a training run never passes on nothing.

Records are numbered from 0 in both layouts: the position in the JSON list, or among
the non-blank lines of a ``.jsonl`` file.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefrec.errors import DataError

MAX_DEPTH = 64  # containers inside a record; supported records use at most 3
_SURROGATE = re.compile("[\ud800-\udfff]")
_LONE_SURROGATE = "a string holds the lone surrogate"


class _NonFinite:
    """What ``NaN``/``Infinity`` decode to, so the walk can find the record holding one."""

    def __init__(self, name: str) -> None:
        self.name = name


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- the walk


def _fault(value: Any, depth: int) -> str | None:
    """Why one decoded value cannot be accepted, or None."""
    if depth > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, _NonFinite):
        return f"{value.name} is not valid JSON (write null or a number)"
    if isinstance(value, str):
        match = _SURROGATE.search(value)
        if match:
            return f"{_LONE_SURROGATE} \\u{ord(match.group()):04x} (not valid Unicode)"
    return None


def _children(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield key
            yield child
    elif isinstance(value, list):
        yield from value


def record_fault(record: Any) -> tuple[str | None, str] | None:
    """``(field, reason)`` of the first unacceptable value inside one record, or None.

    Iterative, so that it cannot itself run out of stack on the input it guards against.
    ``field`` is the record's top-level key holding the value (None outside an object).
    """
    tops: list[tuple[str | None, Any]] = (
        [(None, k) for k in record] + [(k, v) for k, v in record.items()]
        if isinstance(record, dict)
        else [(None, record)]
    )
    for field, top in tops:
        stack = [(top, 1 if field is not None else 0)]
        while stack:
            value, depth = stack.pop()
            reason = _fault(value, depth)
            if reason is not None:
                return field, reason
            stack.extend((child, depth + 1) for child in _children(value))
    return None


def _check_records(records: list[Any], path: Path, first: int = 0) -> None:
    for index, record in enumerate(records, start=first):
        found = record_fault(record)
        if found is not None:
            field, reason = found
            raise DataError(path, index, field, reason)


# --------------------------------------------------------------------------- decoding


def _syntax_message(err: json.JSONDecodeError, text: str, unit: str) -> str:
    where = (
        f"line {err.lineno} column {err.colno} (char {err.pos})" if "\n" in text.rstrip()
        or unit == "file" else f"column {err.colno}"
    )
    # An unterminated string runs to the end of the text (a raw newline would end it
    # with another error), so it is a truncation too.
    at_end = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")
    truncated = f" (the {unit} ends there: truncated?)" if at_end else ""
    return f"invalid JSON at {where}: {err.msg}{truncated}"


def _number_message(err: ValueError) -> str:
    # "Exceeds the limit (4300 digits) for integer string conversion: value has ..."
    return f"a number too long to read ({str(err).split(':')[0]})"


def _too_deep_message() -> str:
    return (f"nested deeper than Python's JSON decoder allows (~{sys.getrecursionlimit()} "
            f"levels; records nest at most {MAX_DEPTH})")


def decode_json(text: str, path: str | Path, record: int | None = None, unit: str = "line") -> Any:
    """One JSON document (a JSON Lines line, a raw review) as a checked value.

    ``record`` names the document in errors; ``unit`` is what ends at a truncation
    (``"line"`` or ``"file"``).
    """
    try:
        value = json.loads(text.removeprefix("\ufeff"), parse_constant=_NonFinite)
    except json.JSONDecodeError as err:
        raise DataError(path, record, None, _syntax_message(err, text, unit)) from None
    except RecursionError:
        raise DataError(path, record, None, _too_deep_message()) from None
    except ValueError as err:  # an integer of more than sys.get_int_max_str_digits() digits
        raise DataError(path, record, None, _number_message(err)) from None
    found = record_fault(value)
    if found is not None:
        raise DataError(path, record, found[0], found[1])
    return value


def _failing_record(text: str, error: type[Exception]) -> int | None:
    """The index of the top-level list element whose decoding raises ``error`` (deep
    nesting, a huge number), found by decoding the elements one at a time (None: not a
    list, or another error first)."""
    decoder = json.JSONDecoder(parse_constant=_NonFinite)
    space = re.compile(r"[\s,]*")
    pos = space.match(text, 0).end()
    if not text.startswith("[", pos):
        return None
    pos = space.match(text, pos + 1).end()
    index = 0
    while pos < len(text) and text[pos] != "]":
        try:
            _, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
            return index if type(err) is error else None
        pos = space.match(text, pos).end()
        index += 1
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, None, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, None, None, "is a directory, not a file") from None
    except OSError as err:
        raise DataError(path, None, None, f"cannot read file: {err.strerror}") from None


def _undecodable(raw: bytes, path: Path, err: UnicodeDecodeError) -> DataError:
    """The error for invalid UTF-8, naming the record and field when the rest of the file
    is valid JSON (bad bytes decode to lone surrogates with ``surrogateescape``)."""
    record = field = None
    try:
        data = json.loads(raw.decode("utf-8", "surrogateescape"), parse_constant=_NonFinite)
    except (ValueError, RecursionError):  # JSONDecodeError included
        data = None
    for index, value in enumerate(data if isinstance(data, list) else []):
        found = record_fault(value)
        if found is not None and found[1].startswith(_LONE_SURROGATE):
            record, field = index, found[0]
            break
    return DataError(path, record, field,
                     f"not valid UTF-8: byte 0x{raw[err.start]:02x} at byte offset {err.start}")


def read_json_file(path: str | Path) -> Any:
    """One JSON document from a file a user hands over (an adapter's lineage file): the
    checks of :func:`decode_json`, plus a missing file and invalid UTF-8."""
    path = Path(path)
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, None, None, f"not valid UTF-8: byte 0x{raw[err.start]:02x} at "
                        f"byte offset {err.start}") from None
    return decode_json(text, path, unit="file")


def _refuse_empty(records: list[Any], path: Path) -> list[Any]:
    if not records:
        raise DataError(path, None, None, "no records: a dataset needs at least one")
    return records


def read_json_array(path: str | Path) -> list[Any]:
    """The records of a UTF-8 JSON file whose top level is a non-empty list.

    A UTF-8 byte-order mark is accepted. Every failure is a one-line DataError (see the
    module docstring).
    """
    path = Path(path)
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise _undecodable(raw, path, err) from None
    if not text.strip():
        raise DataError(path, None, None, "file is empty; expected a JSON list of records")
    try:
        data = json.loads(text, parse_constant=_NonFinite)
    except json.JSONDecodeError as err:
        raise DataError(path, None, None, _syntax_message(err, text, "file")) from None
    except RecursionError:
        raise DataError(path, _failing_record(text, RecursionError), None,
                        _too_deep_message()) from None
    except ValueError as err:  # an integer of more than sys.get_int_max_str_digits() digits
        raise DataError(path, _failing_record(text, ValueError), None,
                        _number_message(err)) from None
    if not isinstance(data, list):
        raise DataError(path, None, None, f"expected a JSON list of records, got {json_type(data)}")
    _check_records(data, path)
    return _refuse_empty(data, path)


def read_json_lines(path: str | Path) -> list[Any]:
    """The records of a non-empty JSON Lines file (blank lines hold no record)."""
    path = Path(path)
    records: list[Any] = []
    offset = 0
    for number, line in enumerate(_read_bytes(path).split(b"\n")):
        if line.strip():
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, len(records), None, "not valid UTF-8: byte "
                                f"0x{line[err.start]:02x} at byte offset {offset + err.start}"
                                ) from None
            if number == 0:
                text = text.removeprefix("\ufeff")
            records.append(decode_json(text, path, len(records)))
        offset += len(line) + 1
    return _refuse_empty(records, path)


def read_records(path: str | Path) -> list[Any]:
    """The records of an example file: JSON Lines for ``.jsonl``, else a JSON list."""
    path = Path(path)
    return read_json_lines(path) if path.suffix == ".jsonl" else read_json_array(path)
