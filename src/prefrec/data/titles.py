"""Item titles: finding them in prompt text, normalising them, and keying items and users.

Three ideas live here:

- :func:`parse_title_tags` reads the ``<Title:...>`` markers of the DMPO format back out
  of an instruction or a completion, exactly as written.
- :func:`normalize_title` / :func:`item_key` are the documented, *optional* normalisation
  that removes the MovieLens-1M train/eval drift (training titles ``Tarzan `` and
  ``Sound of Music``; eval titles ``Tarzan (1999)`` and ``Sound of Music, The (1965)``).
  Readers never apply it: files keep their titles byte for byte.
- :func:`history_user_key` gives rows without a user id a stable user key, so that the
  rows of one user (same history) group together.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections.abc import Sequence

# A DMPO tag is written ``" <Title:X> "`` and is followed by another space (next tag or
# "  and  "), by " ." (end of the history / candidate list) or " ," (completion), or ends
# the text. Closing a tag only at ``"> "`` + one of those keeps titles containing ``>``
# (e.g. ``"A > B"``) intact; a lone ``>`` at the very end of the text also closes one,
# so hand-written ``"<Title:A>"`` parses too.
_TITLE_TAG = re.compile(r"<Title:(.*?)>(?= [ .,]| ?$)", re.DOTALL)

# MovieLens titles end in the release year; some carry alternative titles before it:
# "Seven (Se7en) (1995)", "Postino, Il (The Postman) (1994)".
_TRAILING_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_TRAILING_PARENTHESES = re.compile(r"\s*\([^()]*\)\s*$")
# MovieLens moves leading articles to the end: "Sound of Music, The", "Postino, Il".
# The DMPO training files cut them off entirely ("Sound of Music"), so they are stripped,
# not moved to the front.
_TRAILING_ARTICLE = re.compile(
    r",\s*(?:The|A|An|Il|La|Le|Les|L'|Lo|Los|Las|El|Das|Der|Die|Det|Den|Un|Une)\s*$"
)


def parse_title_tags(text: str) -> list[str]:
    """The inner strings of the ``<Title:...>`` markers in ``text``, in order, verbatim.

    >>> parse_title_tags(" <Title:Tarzan > ,  <Title:Gigi (1958)> ")
    ['Tarzan ', 'Gigi (1958)']
    """
    return _TITLE_TAG.findall(text)


def normalize_title(title: str) -> str:
    """A title with the MovieLens-1M train/eval drift removed (optional, never implicit).

    Steps, in order:

    1. HTML entities are unescaped (``&amp;`` -> ``&``).
    2. A trailing release year ``(YYYY)`` is removed, and with it any alternative-title
       parentheses just before it (``Seven (Se7en) (1995)`` -> ``Seven``). Parentheses
       are only removed when a year was, so ``Hollow Man (Double Feature)`` stays whole.
    3. A trailing article moved there by MovieLens (``, The``, ``, A``, ``, An`` and the
       common French/Italian/Spanish/German/Scandinavian ones) is stripped, because the
       DMPO training titles dropped it (``Sound of Music``), so moving it to the front
       would not match.
    4. Runs of whitespace collapse to one space; the ends are stripped.

    >>> normalize_title("Sound of Music, The (1965)"), normalize_title("Tarzan ")
    ('Sound of Music', 'Tarzan')

    On the shipped ML-1M files this maps 923 of the 1031 distinct training titles onto an
    eval title (none match verbatim); the other training titles name movies absent from
    the eval file, or were cut at their first comma upstream ("Girl" for
    "Girl, Interrupted (1999)"), which no normalisation can undo. Removing the year
    merges remakes ("Psycho (1960)" and "Psycho (1998)"), as the training files did.
    """
    title = html.unescape(title)
    without_year = _TRAILING_YEAR.sub("", title)
    if without_year != title:
        title = without_year
        while (shorter := _TRAILING_PARENTHESES.sub("", title)) != title and shorter.strip():
            title = shorter
    title = _TRAILING_ARTICLE.sub("", title)
    return " ".join(title.split())


def normalize_title_tags(text: str) -> str:
    """``text`` with the title inside every ``<Title:...>`` tag normalised.

    >>> normalize_title_tags(" <Title:Sound of Music, The (1965)> ,  <Title:Tarzan > ")
    ' <Title:Sound of Music> ,  <Title:Tarzan> '
    """
    return _TITLE_TAG.sub(lambda m: f"<Title:{normalize_title(m.group(1))}>", text)


def item_key(title: str) -> str:
    """The item identity that baselines and audits use: ``normalize_title(title).casefold()``.

    Two titles name the same item when their keys are equal, so ``"Tarzan "`` (ML-1M
    training files) and ``"tarzan (1999)"`` are one item.
    """
    return normalize_title(title).casefold()


def history_user_key(history: Sequence[str]) -> str:
    """A stable short user key for data without user ids: ``sha1(history)[:12]`` in hex.

    The history is serialised as a JSON list, so ``("a::b",)`` and ``("a", "b")`` differ.
    Rows with the same history get the same key, which is how DMPO ``dpo_ranking_k`` rows
    of one user are regrouped (:func:`prefrec.data.schema.group_pairs_by_user`).
    """
    payload = json.dumps(list(history), ensure_ascii=False).encode("utf-8")
    return hashlib.sha1(payload).hexdigest()[:12]
