"""The S-DPO candidate-selection format: JSON records read into :class:`SelectionExample`.

A record is ``{"historyList": "A::B::C", "itemList": [20 candidates], "trueSelection": T}``.
The files carry no prompt; it is built with :func:`prompts.selection_instruction`.
The released ``lastfm-val.json`` is ``json.dumps(records, indent=4)`` (ASCII-escaped, no
final newline); :func:`write_sdpo` writes the same, so read -> write reproduces it byte
for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from prefrec.data.dmpo import ErrorAt, error_at
from prefrec.data.prompts import selection_instruction
from prefrec.data.reading import json_type, read_json_array
from prefrec.data.schema import SelectionExample
from prefrec.data.titles import history_user_key
from prefrec.errors import DataError
from prefrec.io import atomic_write_text

HISTORY_SEPARATOR = "::"
_STANDARD_FIELDS = ("historyList", "itemList", "trueSelection")


def _history(value: Any, err: ErrorAt) -> tuple[tuple[str, ...], str]:
    """The history titles and how they were stored (``"str"`` joined by ``::`` or ``"list"``)."""
    if isinstance(value, str):
        titles, kind = value.split(HISTORY_SEPARATOR) if value else [], "str"
    elif isinstance(value, list):
        for i, title in enumerate(value):
            if not isinstance(title, str):
                raise err(f"historyList[{i}]", f"expected a string, got {json_type(title)}")
        titles, kind = value, "list"
    else:
        raise err("historyList", f"expected a '::'-joined string or a list, got {json_type(value)}")
    if not titles:
        raise err("historyList", "empty history")
    for i, title in enumerate(titles):
        if not title:
            raise err("historyList", f"empty title at position {i}")
    return tuple(titles), kind


def parse_sdpo_record(record: Any, path: str | Path | None, index: int) -> SelectionExample:
    """One S-DPO record as a :class:`SelectionExample` with round-trip ``meta``."""
    err = error_at(path, index)
    if not isinstance(record, dict):
        raise err(None, f"expected an object, got {json_type(record)}")
    for name in _STANDARD_FIELDS:
        if name not in record:
            raise err(name, "missing field")
    history, history_type = _history(record["historyList"], err)
    items, target = record["itemList"], record["trueSelection"]
    if not isinstance(items, list):
        raise err("itemList", f"expected a list of candidate titles, got {json_type(items)}")
    if len(items) < 2:
        raise err("itemList", f"expected at least two candidates, got {len(items)}")
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise err(f"itemList[{i}]", f"expected a string, got {json_type(item)}")
        if not item.strip():
            raise err(f"itemList[{i}]", "empty title")
        if item in seen:
            raise err("itemList", f"duplicate candidate {item!r} at position {i}")
        seen.add(item)
    if not isinstance(target, str):
        raise err("trueSelection", f"expected a string, got {json_type(target)}")
    if target not in seen:
        raise err("trueSelection", f"{target!r} is not one of the itemList candidates")
    meta: dict[str, Any] = {
        "source": str(path) if path is not None else None,
        "index": index,
        "history_type": history_type,
    }
    extra = {k: v for k, v in record.items() if k not in _STANDARD_FIELDS}
    if extra:
        meta["extra"] = extra
    if list(record) != list(_STANDARD_FIELDS) + list(extra):
        meta["field_order"] = list(record)
    return SelectionExample(
        history=history,
        candidates=tuple(items),
        target=target,
        prompt=selection_instruction(history, items),
        user=history_user_key(history),
        meta=meta,
    )


def parse_sdpo_records(records: Sequence[Any], path: str | Path | None) -> list[SelectionExample]:
    """Every record of a decoded S-DPO file, in order (the first bad one raises)."""
    return [parse_sdpo_record(r, path, i) for i, r in enumerate(records)]


def read_sdpo(path: str | Path) -> list[SelectionExample]:
    """Read an S-DPO candidate-selection file such as ``lastfm-val.json``."""
    return parse_sdpo_records(read_json_array(path), path)


def sdpo_record(example: SelectionExample) -> dict[str, Any]:
    """The S-DPO record of one example (history joined with ``::`` unless read as a list)."""
    if example.meta.get("history_type", "str") == "list":
        history: str | list[str] = list(example.history)
    else:
        bad = [t for t in example.history if HISTORY_SEPARATOR in t]
        if bad:
            # A '::' inside a title would split into two titles on reading.
            raise DataError(
                example.meta.get("source"),
                example.meta.get("index"),
                "historyList",
                f"title {bad[0]!r} contains '::' and cannot be joined into historyList",
            )
        history = HISTORY_SEPARATOR.join(example.history)
    record: dict[str, Any] = {
        "historyList": history,
        "itemList": list(example.candidates),
        "trueSelection": example.target,
    }
    record.update(example.meta.get("extra", {}))
    order = example.meta.get("field_order")
    if order is not None and set(order) == set(record):
        record = {k: record[k] for k in order}
    return record


def write_sdpo(examples: Iterable[SelectionExample], path: str | Path) -> None:
    """Write examples as an S-DPO JSON file, atomically, in the released file's style."""
    atomic_write_text(path, json.dumps([sdpo_record(ex) for ex in examples], indent=4))
