"""Readers for raw interaction logs: MovieLens-100K/1M, generic CSV, Amazon reviews.

Every reader returns :class:`~prefrec.data.schema.Interactions` (events plus item titles)
and raises :class:`~prefrec.errors.DataError` naming the file, the 1-based line and the
field on the first bad record. Nothing is dropped silently: the only lines skipped are
blank ones, which hold no record. An item without a title is allowed (its title falls
back to its id, see :meth:`Interactions.title`); :func:`items_without_title` counts them
and the readers log that count as a warning.

Encodings: MovieLens item files are latin-1 (as GroupLens ships them); everything else is
read as strict UTF-8, line by line, so a bad byte is reported with its line number. Files
ending in ``.gz`` are decompressed on the fly.
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
from collections.abc import Iterator
from pathlib import Path

from prefrec.data.reading import decode_json
from prefrec.data.schema import Interaction, Interactions
from prefrec.errors import DataError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- line access


def _lines(
    path: Path, encoding: str = "utf-8", skip_blank: bool = True
) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` with the line ending removed; blank lines hold no
    record and are skipped unless ``skip_blank`` is false (CSV: a quoted field may span them).

    Decoding happens per line so that a non-UTF-8 byte becomes a DataError on its line.
    """
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as err:
                raise DataError(
                    path,
                    number,
                    None,
                    f"not valid {encoding.upper()} ({err.reason} at byte {err.start})",
                ) from None
            text = text.rstrip("\r\n")
            if text.strip() or not skip_blank:
                yield number, text


def _number(value: object, path: Path, line: int, field: str) -> float:
    """A finite float from a number or numeric string, else a DataError."""
    if isinstance(value, bool):
        raise DataError(path, line, field, f"expected a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(path, line, field, f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise DataError(path, line, field, f"expected a finite number, got {value!r}")
    return number


def _timestamp(value: object, path: Path, line: int, field: str) -> int:
    """An integer timestamp; ``"881250949"`` and ``881250949.0`` are accepted, ``1.5`` is not."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    number = _number(value, path, line, field)
    if not number.is_integer():
        raise DataError(path, line, field, f"expected an integer timestamp, got {value!r}")
    return int(number)


def _add_title(
    titles: dict[str, str], first_line: dict[str, int], item: str, title: str, path: Path, line: int
) -> None:
    """Record an item's title; a second, different title for the same item is an error."""
    if item in titles and titles[item] != title:
        raise DataError(
            path,
            line,
            "title",
            f"item {item!r} already has title {titles[item]!r} (line {first_line[item]}), got {title!r}",
        )
    titles.setdefault(item, title)
    first_line.setdefault(item, line)


def items_without_title(interactions: Interactions) -> set[str]:
    """Items that occur in the events but have no title (their title is their id)."""
    return {e.item for e in interactions.events if e.item not in interactions.titles}


def _finish(events: list[Interaction], titles: dict[str, str], source: Path) -> Interactions:
    result = Interactions(events=events, titles=titles, source=str(source))
    missing = items_without_title(result)
    if missing:
        log.warning("%s: %d items have no title; their id is used as title", source, len(missing))
    return result


# --------------------------------------------------------------------------- MovieLens


def _split_exact(text: str, sep: str, n: int, path: Path, line: int) -> list[str]:
    fields = text.split(sep)
    if len(fields) != n:
        name = "tab" if sep == "\t" else repr(sep)
        raise DataError(
            path, line, None, f"expected {n} {name}-separated fields, got {len(fields)}"
        )
    return fields


def _rating_event(fields: list[str], path: Path, line: int) -> Interaction:
    user, item, rating, stamp = (f.strip() for f in fields)
    for name, value in (("user", user), ("item", item)):
        if not value:
            raise DataError(path, line, name, "empty id")
    return Interaction(
        user=user,
        item=item,
        rating=_number(rating, path, line, "rating"),
        timestamp=_timestamp(stamp, path, line, "timestamp"),
    )


def read_movielens_100k(directory: str | Path) -> Interactions:
    """MovieLens-100K: ``u.data`` (user, item, rating, timestamp; tab-separated) and
    ``u.item`` (``|``-separated, latin-1, the title in column 2)."""
    directory = Path(directory)
    data, items = directory / "u.data", directory / "u.item"
    events = [
        _rating_event(_split_exact(text, "\t", 4, data, n), data, n) for n, text in _lines(data)
    ]
    titles: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for n, text in _lines(items, encoding="latin-1"):
        fields = text.split("|")
        if len(fields) < 2:
            raise DataError(items, n, None, f"expected '|'-separated fields, got {len(fields)}")
        _add_title(titles, first_line, fields[0].strip(), fields[1], items, n)
    return _finish(events, titles, data)


def read_movielens_1m(directory: str | Path) -> Interactions:
    """MovieLens-1M: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and
    ``movies.dat`` (``MovieID::Title::Genres``, latin-1)."""
    directory = Path(directory)
    ratings, movies = directory / "ratings.dat", directory / "movies.dat"
    events = [
        _rating_event(_split_exact(text, "::", 4, ratings, n), ratings, n)
        for n, text in _lines(ratings)
    ]
    titles: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for n, text in _lines(movies, encoding="latin-1"):
        fields = text.split("::")
        if len(fields) < 3:
            raise DataError(movies, n, None, f"expected 3 '::'-separated fields, got {len(fields)}")
        # A title could itself contain '::'; the id is first and the genres last.
        _add_title(titles, first_line, fields[0].strip(), "::".join(fields[1:-1]), movies, n)
    return _finish(events, titles, ratings)


# --------------------------------------------------------------------------- CSV


def _csv_rows(
    path: Path, delimiter: str, required: list[str]
) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a headed CSV file as dicts, with the line number each row starts on.

    The header must name every ``required`` column.
    """
    numbers: list[int] = []  # physical line numbers, in the order csv pulls the lines

    def texts() -> Iterator[str]:
        for number, text in _lines(path, skip_blank=False):
            numbers.append(number)
            yield text

    def blank(row: list[str]) -> bool:
        return not any(cell.strip() for cell in row)

    reader = csv.reader(texts(), delimiter=delimiter)
    header = next((row for row in reader if not blank(row)), None)
    if header is None:
        raise DataError(path, None, None, "empty file: expected a header row")
    header = [h.strip() for h in header]
    for column in required:
        if column not in header:
            raise DataError(
                path, numbers[-1], column, f"missing column; the header has {', '.join(header)}"
            )
    while True:
        pulled = len(numbers)
        row = next(reader, None)
        if row is None:
            return
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line holds no record
        line = numbers[pulled]
        if len(row) != len(header):
            raise DataError(
                path, line, None, f"expected {len(header)} fields like the header, got {len(row)}"
            )
        yield line, dict(zip(header, row, strict=True))


def read_interactions_csv(
    path: str | Path,
    titles_path: str | Path | None = None,
    user_col: str = "user",
    item_col: str = "item",
    rating_col: str | None = "rating",
    time_col: str | None = "timestamp",
    title_col: str = "title",
    delimiter: str = ",",
) -> Interactions:
    """A headed CSV (UTF-8) of interactions with configurable column names.

    - ``rating_col=None``: implicit feedback, every event gets rating 1.0.
    - ``time_col=None``: the row's position in the file is its timestamp (file order).
    - Titles come from ``titles_path`` (a CSV with ``item_col`` and ``title_col``) when
      given, else from a ``title_col`` column of the interactions file if it has one.
    """
    path = Path(path)
    wanted = [user_col, item_col] + [c for c in (rating_col, time_col) if c is not None]
    events: list[Interaction] = []
    titles: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for index, (line, row) in enumerate(_csv_rows(path, delimiter, wanted)):
        user, item = row[user_col].strip(), row[item_col].strip()
        for name, value in ((user_col, user), (item_col, item)):
            if not value:
                raise DataError(path, line, name, "empty id")
        rating = 1.0 if rating_col is None else _number(row[rating_col], path, line, rating_col)
        stamp = index if time_col is None else _timestamp(row[time_col], path, line, time_col)
        events.append(Interaction(user, item, rating, stamp))
        if titles_path is None and title_col in row and row[title_col].strip():
            _add_title(titles, first_line, item, row[title_col], path, line)
    if titles_path is not None:
        titles_path = Path(titles_path)
        for line, row in _csv_rows(titles_path, delimiter, [item_col, title_col]):
            if row[title_col].strip():
                _add_title(
                    titles, first_line, row[item_col].strip(), row[title_col], titles_path, line
                )
    return _finish(events, titles, path)


# --------------------------------------------------------------------------- Amazon


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    for number, text in _lines(path):
        record = decode_json(text, path, number)
        if not isinstance(record, dict):
            raise DataError(path, number, None, "expected a JSON object")
        yield number, record


def _field(record: dict, name: str, path: Path, line: int) -> object:
    if name not in record:
        raise DataError(path, line, name, "missing field")
    return record[name]


def _id(record: dict, name: str, path: Path, line: int) -> str:
    value = _field(record, name, path, line)
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
        raise DataError(path, line, name, f"expected a non-empty id, got {value!r}")
    return str(value).strip()


def read_amazon(reviews_path: str | Path, meta_path: str | Path | None = None) -> Interactions:
    """Amazon reviews as JSON lines (``reviewerID``, ``asin``, ``overall``,
    ``unixReviewTime``), with optional metadata JSON lines (``asin``, ``title``).

    Either file may be gzip-compressed (``.gz``). Metadata records without a title are
    allowed; their items keep the asin as title and are counted.
    """
    reviews_path = Path(reviews_path)
    events = []
    for line, record in _json_lines(reviews_path):
        events.append(
            Interaction(
                user=_id(record, "reviewerID", reviews_path, line),
                item=_id(record, "asin", reviews_path, line),
                rating=_number(
                    _field(record, "overall", reviews_path, line), reviews_path, line, "overall"
                ),
                timestamp=_timestamp(
                    _field(record, "unixReviewTime", reviews_path, line),
                    reviews_path,
                    line,
                    "unixReviewTime",
                ),
            )
        )
    titles: dict[str, str] = {}
    first_line: dict[str, int] = {}
    if meta_path is not None:
        meta_path = Path(meta_path)
        for line, record in _json_lines(meta_path):
            asin = _id(record, "asin", meta_path, line)
            title = record.get("title")
            if title is None or (isinstance(title, str) and not title.strip()):
                continue  # allowed: the item keeps its asin as title (counted in _finish)
            if not isinstance(title, str):
                raise DataError(meta_path, line, "title", f"expected a string, got {title!r}")
            _add_title(titles, first_line, asin, title, meta_path, line)
    return _finish(events, titles, reviews_path)
