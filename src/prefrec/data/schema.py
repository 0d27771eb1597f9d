"""Typed records that every reader produces and every trainer and evaluator consumes.

Three task records:

- :class:`PairwiseExample` -- the DMPO format: a prompt naming two candidates, and the two
  orderings of them as completions. ``chosen`` lists the positive first.
- :class:`SelectionExample` -- the S-DPO format: a prompt listing N candidates, one target.
- :class:`PreferenceGroup` -- the training unit of the preference stage: one user, one
  preferred completion and K dispreferred ones, each with its own prompt.

Titles are stored exactly as they appear in the source (``"Tarzan "`` keeps its trailing
space) so that writers can reproduce files byte for byte; normalisation is an explicit,
optional step (:mod:`prefrec.data.titles`).

Conversions are explicit functions at the bottom of this module.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PairwiseExample:
    """One pairwise-ranking prompt with its two orderings.

    Attributes:
        history: the user's history titles, in prompt order.
        candidates: the two candidate titles in the order the prompt lists them.
        positive: index (0 or 1) into ``candidates`` of the liked item.
        prompt: the instruction text (without the model's chat/alpaca wrapper).
        chosen: the completion that ranks the positive first.
        rejected: the completion that ranks the negative first.
        user: a user key; readers without user ids use a hash of the history.
        meta: format details writers need for exact round trips (e.g. DMPO's
            ``input`` field, whether ``output`` was a string or a list), and the
            source file / record index for messages.
    """

    history: tuple[str, ...]
    candidates: tuple[str, str]
    positive: int
    prompt: str
    chosen: str
    rejected: str
    user: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def positive_title(self) -> str:
        return self.candidates[self.positive]

    @property
    def negative_title(self) -> str:
        return self.candidates[1 - self.positive]

    @property
    def positive_listed_first(self) -> bool:
        """True when the prompt names the positive candidate first (position-bias studies)."""
        return self.positive == 0


@dataclass(frozen=True)
class SelectionExample:
    """One candidate-selection prompt: pick the target among N candidates.

    ``prompt`` is the instruction text; the completion for a candidate ``c`` is
    ``completion_for(c)``, by default the bare title.
    """

    history: tuple[str, ...]
    candidates: tuple[str, ...]
    target: str
    prompt: str
    user: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def target_index(self) -> int:
        return self.candidates.index(self.target)

    def completion_for(self, candidate: str) -> str:
        return self.meta.get("completion_format", "{title}").format(title=candidate)


@dataclass(frozen=True)
class ScoredCompletion:
    """A prompt and a completion, the unit the scorer works on."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class PreferenceGroup:
    """One user's preferred completion against K dispreferred ones.

    ``rejected[i]`` is scored under ``rejected_prompts[i]``; for selection data every
    prompt equals ``prompt``; for DMPO pairwise data each negative comes with its own
    prompt (the same history, another candidate pair).
    """

    user: str
    prompt: str
    chosen: str
    rejected: tuple[str, ...]
    rejected_prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.rejected) != len(self.rejected_prompts):
            raise ValueError("PreferenceGroup needs one prompt per rejected completion")
        if not self.rejected:
            raise ValueError("PreferenceGroup needs at least one rejected completion")

    @property
    def k(self) -> int:
        return len(self.rejected)

    def completions(self) -> list[ScoredCompletion]:
        """The chosen completion first, then the K rejected ones: the scorer's input."""
        return [ScoredCompletion(self.prompt, self.chosen)] + [
            ScoredCompletion(p, c) for p, c in zip(self.rejected_prompts, self.rejected, strict=True)
        ]

    def with_negatives(self, k: int, rng: random.Random | None = None) -> PreferenceGroup:
        """Keep ``k`` of the negatives: the first ``k``, or a sample when ``rng`` is given."""
        if not 1 <= k <= self.k:
            raise ValueError(f"cannot keep {k} negatives of a group with {self.k}")
        idx = list(range(self.k))
        if rng is not None:
            idx = sorted(rng.sample(idx, k))
        else:
            idx = idx[:k]
        return PreferenceGroup(
            self.user,
            self.prompt,
            self.chosen,
            tuple(self.rejected[i] for i in idx),
            tuple(self.rejected_prompts[i] for i in idx),
        )


@dataclass(frozen=True)
class Interaction:
    """One raw user-item event (MovieLens, Amazon, generic CSV)."""

    user: str
    item: str
    rating: float
    timestamp: int


@dataclass
class Interactions:
    """A raw interaction log plus item titles, as the raw readers return it."""

    events: list[Interaction]
    titles: dict[str, str]
    source: str = ""

    def title(self, item: str) -> str:
        return self.titles.get(item, item)


# --------------------------------------------------------------------------- conversions


def pair_to_group(example: PairwiseExample) -> PreferenceGroup:
    """A single pairwise example as a K=1 group (chosen vs rejected under one prompt)."""
    return PreferenceGroup(
        example.user, example.prompt, example.chosen, (example.rejected,), (example.prompt,)
    )


def group_pairs_by_user(examples: Iterable[PairwiseExample]) -> list[PreferenceGroup]:
    """Regroup DMPO ``dpo_ranking_k`` rows into one K-negative group per user.

    Rows with the same ``user`` (readers key users by history) and the same positive
    title form one group, in file order: the released files have one target per history,
    fixed-history data (``train_history``) several. The chosen completion is scored under
    the first row's prompt; each row's rejected completion under its own prompt, as in
    the DMPO objective.
    """
    by_target: dict[tuple[str, str], list[PairwiseExample]] = {}
    for ex in examples:
        by_target.setdefault((ex.user, ex.positive_title), []).append(ex)
    groups = []
    for (user, _), rows in by_target.items():
        first = rows[0]
        groups.append(
            PreferenceGroup(
                user,
                first.prompt,
                first.chosen,
                tuple(r.rejected for r in rows),
                tuple(r.prompt for r in rows),
            )
        )
    return groups


def selection_to_group(
    example: SelectionExample, k: int, rng: random.Random | None = None
) -> PreferenceGroup:
    """A selection example as a group: the target against ``k`` other candidates.

    Without ``rng`` the first ``k`` non-target candidates (prompt order) are taken; with
    it, a sample (the trainers pass a per-epoch seeded generator to resample).
    """
    others = [c for c in example.candidates if c != example.target]
    if not 1 <= k <= len(others):
        raise ValueError(f"cannot draw {k} negatives from {len(others)} other candidates")
    negatives = rng.sample(others, k) if rng is not None else others[:k]
    return PreferenceGroup(
        example.user,
        example.prompt,
        example.completion_for(example.target),
        tuple(example.completion_for(c) for c in negatives),
        tuple(example.prompt for _ in negatives),
    )


def trl_rows(
    examples: Sequence[PairwiseExample | SelectionExample], k: int | None = None
) -> list[dict[str, str]]:
    """TRL's preference format: one ``{prompt, chosen, rejected}`` row per negative.

    Pairwise examples give one row each; selection examples give one row per other
    candidate (or the first ``k``).
    """
    rows: list[dict[str, str]] = []
    for ex in examples:
        if isinstance(ex, PairwiseExample):
            rows.append({"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected})
        else:
            others = [c for c in ex.candidates if c != ex.target]
            for c in others[: k or len(others)]:
                rows.append(
                    {
                        "prompt": ex.prompt,
                        "chosen": ex.completion_for(ex.target),
                        "rejected": ex.completion_for(c),
                    }
                )
    return rows
