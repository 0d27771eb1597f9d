"""The one entry point for example files: detect, load, save and convert between formats.

Formats:

- ``"dmpo"``: pairwise ranking, alpaca JSON (:mod:`prefrec.data.dmpo`);
- ``"sdpo"``: candidate selection, S-DPO JSON (:mod:`prefrec.data.sdpo`);
- ``"trl"``: TRL's preference rows ``{prompt, chosen, rejected}``, one per negative, as
  JSON Lines. Read back only when the prompts are DMPO pairwise prompts (a selection
  prompt's rows do not say where each candidate stood).

Anything read can be written in every format: selection examples become pairwise ones
(:func:`selection_to_pairwise`), and pairwise examples whose rows of one user share the
positive become selection ones (:func:`pairwise_to_selection`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from prefrec.data.dmpo import error_at, pairwise_example, parse_dmpo_records, write_dmpo
from prefrec.data.prompts import (
    DOMAINS,
    Domain,
    pairwise_completion,
    pairwise_instruction,
    selection_instruction,
)
from prefrec.data.reading import json_type, read_records
from prefrec.data.schema import PairwiseExample, SelectionExample, trl_rows
from prefrec.data.sdpo import parse_sdpo_records, write_sdpo
from prefrec.errors import DataError, PrefrecError
from prefrec.io import atomic_write_jsonl

FORMATS = ("dmpo", "sdpo", "trl")
Examples = list[PairwiseExample] | list[SelectionExample]


# --------------------------------------------------------------------------- reading


def _format_of(records: Sequence[Any], path: str | Path) -> str:
    """The format of decoded records, judged from the first record's fields."""
    first = records[0]
    if not isinstance(first, dict):
        raise DataError(path, 0, None, f"expected an object, got {json_type(first)}")
    if "instruction" in first:
        return "dmpo"
    if "itemList" in first or "trueSelection" in first:
        return "sdpo"
    if {"prompt", "chosen", "rejected"} <= first.keys():
        return "trl"
    raise DataError(
        path,
        0,
        None,
        f"unrecognised fields {sorted(first)}: expected DMPO (instruction, output), "
        "S-DPO (historyList, itemList, trueSelection) or TRL (prompt, chosen, rejected)",
    )


def detect_format(path: str | Path) -> str:
    """``"dmpo"``, ``"sdpo"`` or ``"trl"``, from the fields of the file's first record."""
    return _format_of(read_records(path), path)


def parse_trl_records(records: Sequence[Any], path: str | Path | None) -> list[PairwiseExample]:
    """TRL rows whose prompts are DMPO pairwise prompts, as pairwise examples."""
    examples = []
    for index, row in enumerate(records):
        err = error_at(path, index)
        if not isinstance(row, dict):
            raise err(None, f"expected an object, got {json_type(row)}")
        for name in ("prompt", "chosen", "rejected"):
            if name not in row:
                raise err(name, "missing field")
            if not isinstance(row[name], str):
                raise err(name, f"expected a string, got {json_type(row[name])}")
        example = pairwise_example(
            row["prompt"], row["chosen"], row["rejected"], err, ("prompt", "chosen", "rejected")
        )
        example.meta.update(
            {"source": str(path), "index": index, "input": "", "output_type": "list"}
        )
        examples.append(example)
    return examples


def load_examples(path: str | Path) -> Examples:
    """Read any supported file: pairwise examples (DMPO, TRL) or selection examples (S-DPO).

    Decoding goes through :mod:`prefrec.data.reading`, so a file without records is an
    error, never "no examples".
    """
    records = read_records(path)
    fmt = _format_of(records, path)
    if fmt == "dmpo":
        return parse_dmpo_records(records, path)
    if fmt == "sdpo":
        return parse_sdpo_records(records, path)
    return parse_trl_records(records, path)


# --------------------------------------------------------------------------- conversion


def selection_to_pairwise(
    examples: Iterable[SelectionExample],
    rng: random.Random,
    domain: Domain = DOMAINS["music"],
) -> list[PairwiseExample]:
    """Each selection example as pairs: its target against every other candidate.

    A seeded coin (``rng``) places the target first or second in each pair's prompt, so
    position carries no signal. All pairs of the ``j``-th example share the user key
    ``"{user}:{j}"`` (histories may repeat across examples), so
    :func:`~prefrec.data.schema.group_pairs_by_user` gives back one group per example.
    """
    pairs = []
    for j, ex in enumerate(examples):
        for other in ex.candidates:
            if other == ex.target:
                continue
            first, second = (ex.target, other) if rng.random() < 0.5 else (other, ex.target)
            pairs.append(
                PairwiseExample(
                    history=ex.history,
                    candidates=(first, second),
                    positive=0 if first == ex.target else 1,
                    prompt=pairwise_instruction(ex.history, first, second, domain),
                    chosen=pairwise_completion(ex.target, other),
                    rejected=pairwise_completion(other, ex.target),
                    user=f"{ex.user}:{j}",
                )
            )
    return pairs


def pairwise_to_selection(
    examples: Iterable[PairwiseExample], rng: random.Random | None = None
) -> list[SelectionExample]:
    """One selection example per user: the shared positive among that user's negatives.

    Candidates are the positive followed by the user's distinct negatives in row order,
    shuffled by ``rng`` when one is given. A user whose rows disagree on the positive
    cannot become one selection example and raises a DataError naming the row.
    """
    by_user: dict[str, list[PairwiseExample]] = {}
    for ex in examples:
        by_user.setdefault(ex.user, []).append(ex)
    selections = []
    for user, rows in by_user.items():
        positive = rows[0].positive_title
        candidates = [positive]
        for row in rows:
            if row.positive_title != positive:
                raise DataError(
                    row.meta.get("source"),
                    row.meta.get("index"),
                    "output",
                    f"user {user}'s rows disagree on the positive ({positive!r} vs "
                    f"{row.positive_title!r}), so they cannot form one selection example",
                )
            if row.negative_title not in candidates:
                candidates.append(row.negative_title)
        if rng is not None:
            rng.shuffle(candidates)
        history = rows[0].history
        selections.append(
            SelectionExample(
                history=history,
                candidates=tuple(candidates),
                target=positive,
                prompt=selection_instruction(history, candidates),
                user=user,
            )
        )
    return selections


# --------------------------------------------------------------------------- writing


def write_trl_jsonl(
    examples: Sequence[PairwiseExample | SelectionExample], path: str | Path, k: int | None = None
) -> int:
    """Export TRL preference rows (one per negative, at most ``k`` per selection example).

    Returns the number of rows written.
    """
    rows = trl_rows(examples, k)
    atomic_write_jsonl(path, rows)
    return len(rows)


def save_examples(
    examples: Sequence[PairwiseExample | SelectionExample],
    path: str | Path,
    fmt: str,
    *,
    seed: int = 0,
) -> None:
    """Write examples in ``fmt`` (``"dmpo"``, ``"sdpo"`` or ``"trl"``), converting if needed.

    ``seed`` drives the conversions' coin flips and shuffles, so a conversion is
    reproducible.
    """
    if fmt not in FORMATS:
        raise PrefrecError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    examples = list(examples)
    pairwise = all(isinstance(ex, PairwiseExample) for ex in examples)
    selection = all(isinstance(ex, SelectionExample) for ex in examples)
    if not (pairwise or selection):
        raise TypeError("save_examples needs all pairwise or all selection examples")
    if fmt == "trl":
        write_trl_jsonl(examples, path)
    elif fmt == "dmpo":
        write_dmpo(
            examples if pairwise else selection_to_pairwise(examples, random.Random(seed)), path
        )
    else:
        write_sdpo(
            examples if selection else pairwise_to_selection(examples, random.Random(seed)), path
        )
