"""Token lengths against a model's context: audit findings, and what training and scoring
say about records that do not fit.

A history of 1437 titles (what ``data build --max-interactions 0`` gave on held-out CSV
data) is some 15,000 tokens, far past a 1024-token ``max_length`` or a small model's
context. The scorer then keeps the last tokens of the prompt (the candidates and the most
recent history) and drops the start; that is a sound choice, but it must be stated, not
silent. A completion that alone does not fit (a 100,000-character title) leaves no room
for any prompt: that record is an error naming its file and index.

Sequences are counted as :func:`prefrec.scoring.tokenize_items` builds them: the
templated prompt with special tokens, then the completion without, then EOS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefrec.data.prompts import model_input
from prefrec.data.schema import PairwiseExample, SelectionExample
from prefrec.errors import DataError, PrefrecError

log = logging.getLogger(__name__)

Example = PairwiseExample | SelectionExample


@dataclass(frozen=True)
class LengthLimit:
    """How to count tokens and how many a sequence may have.

    ``what`` names the limit in messages: "the model's context" or "max_length".
    """

    tokenizer: Any
    template: str
    max_tokens: int
    what: str = "the model's context"


@dataclass
class Lengths:
    """Token counts of a set of records (a record's length is its longest sequence)."""

    max_tokens: int
    longest: int = 0
    longest_record: int | None = None
    truncated: list[int] = field(default_factory=list)  # longer than max_tokens
    unfit: list[int] = field(default_factory=list)  # a completion alone leaves no room
    unfit_tokens: int = 0  # completion tokens of the first unfit record


def _counts(tokenizer, texts: Sequence[str], special: bool) -> dict[str, int]:
    """Tokens of each distinct text (one batched tokenizer call)."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}
    ids = tokenizer(unique, add_special_tokens=special)["input_ids"]
    return {text: len(row) for text, row in zip(unique, ids, strict=True)}


def measure(tokenizer, prompts: Sequence[str], completions: Sequence[str],
            records: Sequence[int], max_tokens: int) -> Lengths:
    """Lengths of (templated prompt, completion) items; ``records[i]`` is item i's record."""
    prompt_n = _counts(tokenizer, prompts, True)
    completion_n = _counts(tokenizer, completions, False)
    eos = 1 if getattr(tokenizer, "eos_token_id", None) is not None else 0
    totals: dict[int, int] = {}  # record -> tokens of its longest sequence
    completion_max: dict[int, int] = {}  # record -> tokens of its longest completion
    for prompt, completion, record in zip(prompts, completions, records, strict=True):
        done = completion_n[completion] + eos
        totals[record] = max(totals.get(record, 0), prompt_n[prompt] + done)
        completion_max[record] = max(completion_max.get(record, 0), done)
    out = Lengths(max_tokens)
    for record, total in totals.items():
        done = completion_max[record]
        if total > out.longest:
            out.longest, out.longest_record = total, record
        if done >= max_tokens:  # not even one prompt token would fit
            if not out.unfit:
                out.unfit_tokens = done
            out.unfit.append(record)
        elif total > max_tokens:
            out.truncated.append(record)
    return out


def example_items(examples: Sequence[Example], template: str,
                  tokenizer) -> tuple[list[str], list[str], list[int]]:
    """Every (model input, completion) a record is trained or scored on, with its record
    index: a pair's two orderings, a selection record's every candidate."""
    prompts: list[str] = []
    completions: list[str] = []
    records: list[int] = []
    for i, ex in enumerate(examples):
        text = model_input(ex.prompt, template, tokenizer)
        if isinstance(ex, PairwiseExample):
            outs = [ex.chosen, ex.rejected]
        else:
            outs = [ex.completion_for(c) for c in ex.candidates]
        prompts += [text] * len(outs)
        completions += outs
        records += [i] * len(outs)
    return prompts, completions, records


def measure_examples(examples: Sequence[Example], limit: LengthLimit) -> Lengths:
    """:func:`measure` over every sequence of ``examples``."""
    prompts, completions, records = example_items(examples, limit.template, limit.tokenizer)
    return measure(limit.tokenizer, prompts, completions, records, limit.max_tokens)


CUT = "their prompts are cut from the start, dropping the oldest history titles"


def truncation_note(truncated: int, records: int, max_tokens: int, longest: int,
                    longest_record: int | None, what: str, consequence: str = CUT) -> str:
    """The sentence stating a truncation: how many records, the limit, the longest, and
    what becomes of them."""
    return (f"{truncated} of {records} records are longer than {what} of {max_tokens} "
            f"tokens (longest: {longest} tokens, record {longest_record}); {consequence}")


def unfit_message(unfit: int, unfit_tokens: int, max_tokens: int, what: str) -> str:
    """The error for records whose completion alone fills the limit."""
    return (f"a completion of {unfit_tokens} tokens alone fills {what} of {max_tokens} "
            f"tokens, leaving no room for the prompt ({unfit} such records)")


def check_fit(lengths: Lengths, records: int, what: str, path: str | Path | None) -> None:
    """Raise a DataError for the first record that cannot fit at all; log one warning
    stating the truncation of those that are only too long."""
    if lengths.unfit:
        raise DataError(path, lengths.unfit[0], None, unfit_message(
            len(lengths.unfit), lengths.unfit_tokens, lengths.max_tokens, what))
    if lengths.truncated:
        prefix = f"{path}: " if path is not None else ""
        log.warning("%s%s", prefix, truncation_note(
            len(lengths.truncated), records, lengths.max_tokens, lengths.longest,
            lengths.longest_record, what))


def check_examples_fit(examples: Sequence[Example], limit: LengthLimit,
                       path: str | Path | None) -> Lengths:
    """The check training runs before tokenising: see :func:`check_fit`."""
    lengths = measure_examples(examples, limit)
    check_fit(lengths, len(examples), limit.what, path)
    return lengths


def model_limit(model: str, template: str, max_tokens: int | None = None) -> LengthLimit:
    """The limit to check records against: ``max_tokens`` (a training ``max_length``)
    when given, else the model's context; counted with the model's tokenizer."""
    from prefrec.model import load_tokenizer

    tokenizer, context = load_tokenizer(model)
    try:
        model_input("", template, tokenizer)
    except ValueError as err:
        raise PrefrecError(f"{model}: {err}") from None
    if max_tokens is not None:
        if max_tokens < 1:
            raise PrefrecError(f"--max-length {max_tokens}: expected at least 1")
        return LengthLimit(tokenizer, template, max_tokens, "max_length")
    if context is None:
        raise PrefrecError(f"{model}: its config names no context length; give --max-length")
    return LengthLimit(tokenizer, template, context)
