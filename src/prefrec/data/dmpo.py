"""The DMPO pairwise-ranking format: alpaca JSON records read into :class:`PairwiseExample`.

A record is ``{"instruction", "input", "output"}``. The instruction names the user's
history and two candidates as ``<Title:...>`` tags; the output orders the two candidates:

- ``*_sft_ranking.json`` and ML-1M's ``*_eval_ranking.json``: ``output`` is one string,
  the positive-first ordering (the rejected ordering is built here);
- ``*_dpo_ranking_{k}.json`` and Amazon's ``*_eval_ranking.json``: ``output`` is
  ``[preferred, dispreferred]``.

The released files are ``json.dumps(records)`` with default settings (ASCII-escaped, no
indent, no final newline); :func:`write_dmpo` writes the same, so read -> write
reproduces each of them byte for byte. Every malformed record raises a
:class:`~prefrec.errors.DataError` naming the file, the record index and the field;
nothing is dropped silently.

:func:`prefrec.data.reading.read_json_array` decodes the file (the one reading path).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from prefrec.data.prompts import pairwise_completion, title_tag
from prefrec.data.reading import json_type, read_json_array
from prefrec.data.schema import PairwiseExample
from prefrec.data.titles import (
    history_user_key,
    normalize_title,
    normalize_title_tags,
    parse_title_tags,
)
from prefrec.errors import DataError
from prefrec.io import atomic_write_text

# The sentence that separates the history from the two candidates in every DMPO
# instruction (prompts.pairwise_instruction writes it for every domain).
CANDIDATES_MARKER = ". Rank the likelihood of the user "
OUTPUT_FORMATS = ("str", "list")
_STANDARD_FIELDS = ("instruction", "input", "output")

ErrorAt = Callable[[str | None, str], DataError]


def error_at(path: str | Path | None, index: int | None) -> ErrorAt:
    """A factory of DataErrors for one record: ``error_at(p, 3)("output", "...")``."""
    return lambda field, message: DataError(path, index, field, message)


# --------------------------------------------------------------------------- parsing


def split_pairwise_instruction(instruction: str) -> tuple[list[str], list[str]]:
    """The history titles and the candidate titles of a DMPO instruction (unchecked)."""
    head, marker, tail = instruction.rpartition(CANDIDATES_MARKER)
    if not marker:
        raise ValueError(f"no {CANDIDATES_MARKER.strip()!r} sentence after the history")
    return parse_title_tags(head), parse_title_tags(tail)


def pairwise_example(
    instruction: str,
    chosen: str,
    rejected: str | None,
    err: ErrorAt,
    fields: tuple[str, str, str] = ("instruction", "output", "output"),
) -> PairwiseExample:
    """Validate one pairwise prompt with its completions and build the example.

    ``rejected=None`` means only the positive-first ordering is given (string output);
    the negative-first one is built with :func:`prompts.pairwise_completion`. ``fields``
    names the prompt, chosen and rejected fields in error messages. ``meta`` is empty;
    readers add theirs.
    """
    prompt_field, chosen_field, rejected_field = fields
    try:
        history, candidates = split_pairwise_instruction(instruction)
    except ValueError as e:
        raise err(prompt_field, str(e)) from None
    if not history:
        raise err(prompt_field, "empty history: no <Title:...> tag before the candidates")
    if len(candidates) != 2:
        raise err(prompt_field, f"expected two candidate <Title:...> tags, found {len(candidates)}")
    first, second = candidates
    if not first.strip() or not second.strip():
        raise err(prompt_field, "empty candidate title: <Title:> names nothing")
    if first == second:
        raise err(prompt_field, f"the two candidates are the same title {first!r}")
    positive_title, negative_title = _completion_order(chosen, (first, second), err, chosen_field)
    if rejected is None:
        rejected = pairwise_completion(negative_title, positive_title)
    elif _completion_order(rejected, (first, second), err, rejected_field) != (
        negative_title,
        positive_title,
    ):
        raise err(
            rejected_field,
            f"dispreferred completion must rank {negative_title!r} first, as the reverse of "
            "the preferred one",
        )
    return PairwiseExample(
        history=tuple(history),
        candidates=(first, second),
        positive=0 if positive_title == first else 1,
        prompt=instruction,
        chosen=chosen,
        rejected=rejected,
        user=history_user_key(history),
    )


def swap_candidate_order(example: PairwiseExample) -> PairwiseExample:
    """The same pair with the prompt listing the two candidates the other way round.

    Only the candidate sentence changes; the completions (which rank titles, not
    positions) stay, so ``chosen`` still ranks the positive first. Used to cancel the
    model's preference for the listed-first title (score both orders) and to train on both.
    """
    head, marker, tail = example.prompt.rpartition(CANDIDATES_MARKER)
    if not marker:
        raise ValueError(f"no {CANDIDATES_MARKER.strip()!r} sentence in the prompt")
    first, second = (title_tag(t) for t in example.candidates)
    if tail.count(first) != 1 or tail.count(second) != 1:
        raise ValueError("the candidate sentence must name each candidate once")
    placeholder = "\0"
    tail = tail.replace(first, placeholder).replace(second, first).replace(placeholder, second)
    return PairwiseExample(
        history=example.history,
        candidates=(example.candidates[1], example.candidates[0]),
        positive=1 - example.positive,
        prompt=head + marker + tail,
        chosen=example.chosen,
        rejected=example.rejected,
        user=example.user,
        meta={**example.meta, "candidates_swapped": not example.meta.get("candidates_swapped")},
    )


def with_normalized_titles(example: PairwiseExample) -> PairwiseExample:
    """``example`` with every title passed through :func:`normalize_title`, in the prompt
    and the completions alike (removes the ML-1M train/eval year drift; see there).

    Raises ``ValueError`` when the two candidates become the same title (a remake pair).
    """
    candidates = tuple(normalize_title(t) for t in example.candidates)
    if candidates[0] == candidates[1]:
        raise ValueError(f"both candidates normalise to {candidates[0]!r}")
    return PairwiseExample(
        history=tuple(normalize_title(t) for t in example.history),
        candidates=(candidates[0], candidates[1]),
        positive=example.positive,
        prompt=normalize_title_tags(example.prompt),
        chosen=normalize_title_tags(example.chosen),
        rejected=normalize_title_tags(example.rejected),
        user=example.user,
        meta=example.meta,
    )


def require_pairwise(examples: Sequence[Any], path: str | Path, option: str) -> list[PairwiseExample]:
    """``examples`` when all are pairwise, else a one-line error naming ``path`` and the
    ``option`` that needs pairwise data."""
    if not all(isinstance(ex, PairwiseExample) for ex in examples):
        raise DataError(path, None, None, f"{option} applies to pairwise (DMPO) data only")
    return list(examples)


def with_both_orders(examples: Sequence[PairwiseExample]) -> list[PairwiseExample]:
    """``examples`` followed by their candidate-swapped copies (:func:`swap_candidate_order`).

    The copies' user key gets a `` (swapped)`` suffix so that regrouping by user keeps
    the two orders in separate preference groups.
    """
    swapped = [
        dataclasses.replace(swap_candidate_order(ex), user=f"{ex.user} (swapped)")
        for ex in examples
    ]
    return [*examples, *swapped]


def _completion_order(
    completion: str, candidates: tuple[str, str], err: ErrorAt, field: str
) -> tuple[str, str]:
    """The two titles a completion ranks, checked against the prompt's candidates."""
    tags = parse_title_tags(completion)
    if len(tags) != 2:
        raise err(field, f"expected two <Title:...> tags in the completion, found {len(tags)}")
    for tag in tags:
        if tag not in candidates:
            raise err(
                field,
                f"candidate not in prompt: {tag!r} (the prompt's candidates are "
                f"{candidates[0]!r} and {candidates[1]!r})",
            )
    if tags[0] == tags[1]:
        raise err(field, f"the completion names {tags[0]!r} twice")
    return tags[0], tags[1]


def parse_dmpo_record(record: Any, path: str | Path | None, index: int) -> PairwiseExample:
    """One alpaca record as a :class:`PairwiseExample` with round-trip ``meta``."""
    err = error_at(path, index)
    if not isinstance(record, dict):
        raise err(None, f"expected an object, got {json_type(record)}")
    for name in ("instruction", "output"):
        if name not in record:
            raise err(name, "missing field")
    instruction, output = record["instruction"], record["output"]
    if not isinstance(instruction, str):
        raise err("instruction", f"expected a string, got {json_type(instruction)}")
    if "input" in record and not isinstance(record["input"], str):
        raise err("input", f"expected a string, got {json_type(record['input'])}")
    if isinstance(output, str):
        example = pairwise_example(instruction, output, None, err)
    elif isinstance(output, list):
        if len(output) != 2:
            raise err(
                "output",
                f"expected [preferred, dispreferred] (2 strings), got a list of {len(output)}",
            )
        for i, completion in enumerate(output):
            if not isinstance(completion, str):
                raise err(f"output[{i}]", f"expected a string, got {json_type(completion)}")
        example = pairwise_example(
            instruction, output[0], output[1], err, ("instruction", "output[0]", "output[1]")
        )
    else:
        raise err("output", f"expected a string or a list of two strings, got {json_type(output)}")
    meta: dict[str, Any] = {
        "source": str(path) if path is not None else None,
        "index": index,
        "input": record.get("input"),
        "output_type": "str" if isinstance(output, str) else "list",
    }
    extra = {k: v for k, v in record.items() if k not in _STANDARD_FIELDS}
    if extra:
        meta["extra"] = extra
    # dmpo_record writes the standard fields first, then the extra ones; keep any other order.
    if list(record) != [k for k in _STANDARD_FIELDS if k in record] + list(extra):
        meta["field_order"] = list(record)
    example.meta.update(meta)
    return example


def parse_dmpo_records(records: Sequence[Any], path: str | Path | None) -> list[PairwiseExample]:
    """Every record of a decoded DMPO file, in order (the first bad one raises)."""
    return [parse_dmpo_record(r, path, i) for i, r in enumerate(records)]


def read_dmpo(path: str | Path) -> list[PairwiseExample]:
    """Read a DMPO ``sft``, ``dpo_ranking_k`` or ``eval`` ranking file."""
    return parse_dmpo_records(read_json_array(path), path)


# --------------------------------------------------------------------------- writing


def dmpo_record(example: PairwiseExample, output_format: str | None = None) -> dict[str, Any]:
    """The alpaca record of one example.

    ``output_format`` is ``"str"`` (positive-first completion only, as in the SFT files)
    or ``"list"`` (``[chosen, rejected]``); by default the format the example was read
    from, and ``"list"`` for examples built from raw data.
    """
    fmt = output_format or example.meta.get("output_type", "list")
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown DMPO output format {fmt!r}; choose from {OUTPUT_FORMATS}")
    input_text = example.meta.get("input", "")
    record: dict[str, Any] = {"instruction": example.prompt}
    if input_text is not None:
        record["input"] = input_text
    record["output"] = example.chosen if fmt == "str" else [example.chosen, example.rejected]
    record.update(example.meta.get("extra", {}))
    order = example.meta.get("field_order")
    if order is not None and set(order) == set(record):
        record = {k: record[k] for k in order}
    return record


def write_dmpo(
    examples: Iterable[PairwiseExample], path: str | Path, output_format: str | None = None
) -> None:
    """Write examples as a DMPO alpaca JSON file, atomically, in the released files' style."""
    records = [dmpo_record(ex, output_format) for ex in examples]
    atomic_write_text(path, json.dumps(records))
