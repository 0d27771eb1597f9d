"""Classical recommender baselines, scored on the same eval examples as the language models.

Methods (:data:`METHODS`, by name):

- ``popularity``: how many training users interacted with the item;
- ``itemknn``: shrunk cosine item-item similarity to the history (co-occurrence in
  training users' histories + liked items);
- ``bpr``: BPR matrix factorisation, eval users folded in from their history;
- ``content``: cosine of all-MiniLM-L6-v2 title embeddings to the history's mean;
- ``sasrec``: a small causal self-attention next-item model.

Items are identified by normalised title (:mod:`prefrec.baselines.items`). Outputs have
the layout of ``prefrec eval`` (:mod:`prefrec.baselines.run`), so ``prefrec summarize``
reads baseline folders like model folders; the entry point is
:func:`prefrec.baselines.run.run_baselines`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefrec.baselines.base import Recommender
from prefrec.baselines.config import BPRConfig, SASRecConfig
from prefrec.baselines.content import ContentConfig, ContentSimilarity
from prefrec.baselines.itemknn import ItemKNN, ItemKNNConfig
from prefrec.baselines.popularity import Popularity, PopularityConfig


# torch is imported only when a torch-based method is built (the CLI stays fast).
def _bpr(config: BPRConfig, seed: int) -> Recommender:
    from prefrec.baselines.bpr import BPR

    return BPR(config, seed)


def _sasrec(config: SASRecConfig, seed: int) -> Recommender:
    from prefrec.baselines.sasrec import SASRec

    return SASRec(config, seed)


@dataclass(frozen=True)
class Method:
    """A registered baseline: its config class and how to build it from (config, seed)."""

    name: str
    config_class: type
    build: Callable[[Any, int], Recommender]
    description: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("popularity", PopularityConfig, Popularity, "training users per item"),
        Method("itemknn", ItemKNNConfig, ItemKNN, "item-item cosine to the history"),
        Method("bpr", BPRConfig, _bpr, "BPR matrix factorisation with fold-in"),
        Method("content", ContentConfig, ContentSimilarity, "MiniLM title similarity"),
        Method("sasrec", SASRecConfig, _sasrec, "self-attentive next-item model"),
    )
}

__all__ = ["METHODS", "Method", "Recommender"]
