"""Items and users as the classical baselines see them.

Item identity. The shipped LLM datasets carry titles only, so an item is its
:func:`prefrec.data.titles.item_key`: ``normalize_title(title).casefold()``. That maps the
ML-1M training title ``"Tarzan "`` and the eval title ``"Tarzan (1999)"`` onto one item
(see DESIGN.md on the year drift), and ``"Sound of Music, The (1965)"`` onto
``"sound of music"``. Examples built in memory from raw data
(:func:`prefrec.data.protocols.build_dmpo` / ``build_sdpo``) carry the raw item ids in
``meta``; when *every* training and eval example does, items are keyed ``"id:<item id>"``
instead, which keeps apart movies that share a title. The written DMPO / S-DPO files do
not store those ids, so examples read back from a file always use titles.

Training data become :class:`Basket` s, one per user: the history (in prompt order), the
liked items (a DMPO pair's positive, a selection example's target) and the items the
record ranks below a liked one (a DMPO pair's explicit negative, a selection example's
other candidates). Rows of one user (the DMPO ``sft`` and ``dpo_ranking_k`` rows share
histories, hence user keys) merge into one basket.

Eval examples become :class:`Query` s: a history and the candidates to score.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prefrec.data.schema import PairwiseExample, SelectionExample
from prefrec.data.titles import item_key, normalize_title

Example = PairwiseExample | SelectionExample

# meta fields that examples built from raw data carry (prefrec.data.protocols).
_PAIRWISE_ID_FIELDS = ("history_items", "positive_item", "negative_item")
_SELECTION_ID_FIELDS = ("history_items", "target_item", "candidate_items")


@dataclass(frozen=True)
class Basket:
    """One training user: what they interacted with, liked, and ranked lower."""

    user: str
    history: tuple[str, ...]
    liked: tuple[str, ...]
    negatives: tuple[str, ...]

    @property
    def positives(self) -> tuple[str, ...]:
        """History and liked items, each once, in order: the user's observed positives."""
        return tuple(dict.fromkeys(self.history + self.liked))


@dataclass(frozen=True)
class Query:
    """One eval example as a baseline scores it: the history and the candidates (item keys)."""

    history: tuple[str, ...]
    candidates: tuple[str, ...]


def carries_item_ids(examples: Iterable[Example]) -> bool:
    """True when every example has the raw item ids a build from raw data puts in ``meta``."""
    seen = False
    for ex in examples:
        seen = True
        fields = _PAIRWISE_ID_FIELDS if isinstance(ex, PairwiseExample) else _SELECTION_ID_FIELDS
        if not all(name in ex.meta for name in fields):
            return False
    return seen


def _id_key(item: object) -> str:
    return f"id:{item}"


def _keys(
    ex: Example, use_ids: bool
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(history, candidates in prompt order, liked, negatives) of one example, as item keys."""
    if isinstance(ex, PairwiseExample):
        if use_ids:
            history = tuple(_id_key(i) for i in ex.meta["history_items"])
            pos, neg = _id_key(ex.meta["positive_item"]), _id_key(ex.meta["negative_item"])
        else:
            history = tuple(item_key(t) for t in ex.history)
            pos, neg = item_key(ex.positive_title), item_key(ex.negative_title)
        candidates = (pos, neg) if ex.positive == 0 else (neg, pos)
        return history, candidates, (pos,), (neg,)
    if use_ids:
        history = tuple(_id_key(i) for i in ex.meta["history_items"])
        candidates = tuple(_id_key(i) for i in ex.meta["candidate_items"])
        target = _id_key(ex.meta["target_item"])
    else:
        history = tuple(item_key(t) for t in ex.history)
        candidates = tuple(item_key(c) for c in ex.candidates)
        target = item_key(ex.target)
    return history, candidates, (target,), tuple(c for c in candidates if c != target)


def baskets_from_examples(examples: Sequence[Example], use_ids: bool = False) -> list[Basket]:
    """One basket per user key, in order of first appearance.

    A user's rows merge: the first row's history, the liked items of all rows, and all
    their lower-ranked items that the user did not also like (each once, in order).
    """
    by_user: dict[str, tuple[tuple[str, ...], dict[str, None], dict[str, None]]] = {}
    for ex in examples:
        history, _, liked, negatives = _keys(ex, use_ids)
        _, liked_all, negatives_all = by_user.setdefault(ex.user, (history, {}, {}))
        liked_all.update(dict.fromkeys(liked))
        negatives_all.update(dict.fromkeys(negatives))
    return [
        Basket(
            user,
            history,
            tuple(liked),
            tuple(n for n in negatives if n not in liked and n not in history),
        )
        for user, (history, liked, negatives) in by_user.items()
    ]


def query_from_example(ex: Example, use_ids: bool = False) -> Query:
    """The history and the candidates of an eval example (pairwise: in prompt order)."""
    history, candidates, _, _ = _keys(ex, use_ids)
    return Query(history, candidates)


def validation_queries(baskets: Iterable[Basket]) -> list[tuple[Query, int]]:
    """Held-out training users as (query, number of liked items) for hyperparameter search.

    Candidates are the liked items followed by the negatives; users without negatives
    give no query.
    """
    return [
        (Query(b.history, b.liked + b.negatives), len(b.liked))
        for b in baskets
        if b.liked and b.negatives
    ]


def item_titles(examples: Iterable[Example], use_ids: bool = False) -> dict[str, str]:
    """A display title per item key (the normalised title; the first one seen wins)."""
    titles: dict[str, str] = {}
    for ex in examples:
        history, candidates, _, _ = _keys(ex, use_ids)
        raw = ex.history + ex.candidates
        for key, title in zip(history + candidates, raw, strict=True):
            titles.setdefault(key, normalize_title(title))
    return titles


class ItemIndex:
    """Dense integer ids 0..n-1 for the item keys seen in training, in first-seen order."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys: list[str] = list(dict.fromkeys(keys))
        self.ids: dict[str, int] = {k: i for i, k in enumerate(self.keys)}

    @classmethod
    def from_baskets(cls, baskets: Iterable[Basket], negatives: bool = True) -> ItemIndex:
        """Every item in the baskets' histories and liked items (and negatives if asked)."""
        return cls(
            k for b in baskets for k in b.history + b.liked + (b.negatives if negatives else ())
        )

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, key: str) -> int | None:
        return self.ids.get(key)

    def known(self, keys: Iterable[str]) -> list[int]:
        """The ids of the known keys, in order; unknown (cold) items are left out."""
        return [self.ids[k] for k in keys if k in self.ids]
