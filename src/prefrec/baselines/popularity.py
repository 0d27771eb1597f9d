"""Most-popular: an item's score is how many training users interacted with it.

popularity(i) = #{training users u : i in history_u or i in liked_u}

The eval user's history is ignored, so every user gets the same ranking; an item never
seen in training scores 0. Items ranked lower (explicit negatives) are not counted: they
are not evidence that users like the item.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prefrec.baselines.base import OnEpoch
from prefrec.baselines.items import Basket, Query


@dataclass
class PopularityConfig:
    """Most-popular has no hyperparameters; ``grid`` is there for a uniform config file."""

    grid: dict[str, list[Any]] = field(default_factory=dict)


class Popularity:
    def __init__(self, config: PopularityConfig | None = None, seed: int = 0) -> None:
        self.config = config or PopularityConfig()
        self.counts: Counter[str] = Counter()

    def fit(
        self, baskets: Sequence[Basket], titles: Mapping[str, str], on_epoch: OnEpoch | None = None
    ) -> None:
        self.counts = Counter(item for b in baskets for item in b.positives)

    def score(self, queries: Sequence[Query]) -> list[np.ndarray]:
        return [
            np.array([self.counts[c] for c in q.candidates], dtype=np.float64) for q in queries
        ]
