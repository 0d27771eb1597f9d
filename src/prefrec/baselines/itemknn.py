"""Item-kNN: items are similar when the same training users interacted with both.

Each training user is one basket, B_u = history_u + liked_u (as a set). With n_i the number
of baskets holding item i and c_ij the number holding both i and j, the similarity is the
shrunk cosine

    sim(i, j) = c_ij / (sqrt(n_i * n_j) + shrinkage),  sim(i, i) = 0,

kept only for the ``neighbours`` most similar items j of each item i (all when None).
A candidate c of a user with history H is scored by its similarity to the history:

    score(c) = sum_{h in H'} sim(c, h)            (aggregate "sum")
    score(c) = (1 / |H'|) sum_{h in H'} sim(c, h)  (aggregate "mean"; 0 when H' is empty)

where H' is the set of history items seen in training. Within one query both orders agree;
"mean" makes scores comparable across users, which pooled metrics (the DMPO AUC) need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from prefrec.baselines.base import OnEpoch
from prefrec.baselines.items import Basket, ItemIndex, Query
from prefrec.errors import PrefrecError


@dataclass
class ItemKNNConfig:
    neighbours: int | None = 50
    shrinkage: float = 10.0
    aggregate: str = "mean"
    grid: dict[str, list[Any]] = field(
        default_factory=lambda: {"neighbours": [10, 50, None], "shrinkage": [0.0, 10.0]}
    )


def cosine_similarity(baskets: sp.csr_matrix, shrinkage: float) -> sp.csr_matrix:
    """Shrunk cosine between the columns (items) of a binary users x items matrix,
    with a zero diagonal."""
    co = (baskets.T @ baskets).tocoo()
    counts = np.asarray(baskets.sum(axis=0)).ravel()
    values = co.data / (np.sqrt(counts[co.row] * counts[co.col]) + shrinkage)
    values[co.row == co.col] = 0.0
    sim = sp.csr_matrix((values, (co.row, co.col)), shape=co.shape)
    sim.eliminate_zeros()
    return sim


def spectral_item_vectors(sim: sp.csr_matrix, dim: int) -> np.ndarray:
    """Item vectors whose dot products approximate the symmetrised similarity graph:

        S = (sim + sim^T) / 2 ~ U diag(lambda) U^T   (the ``dim`` largest eigenvalues)
        v_i = U_i * sqrt(max(lambda, 0))

    so v_i . v_j ~ S_ij: what item-kNN knows about two items, as ``dim`` numbers each
    (fewer when there are fewer items). Each eigenvector's sign is fixed (its largest-
    magnitude entry positive), so the same graph always gives the same vectors."""
    sim = sp.csr_matrix(sim)
    sym = ((sim + sim.T) * 0.5).toarray()
    n = sym.shape[0]
    dim = min(dim, n)
    if dim == 0:
        return np.zeros((n, 0))
    values, vectors = np.linalg.eigh(sym)  # ascending; dense is fine for ~10^4 items
    values, vectors = values[::-1][:dim], vectors[:, ::-1][:, :dim]
    flip = np.sign(vectors[np.abs(vectors).argmax(0), np.arange(dim)])
    return vectors * flip * np.sqrt(np.clip(values, 0.0, None))


def keep_top_neighbours(sim: sp.csr_matrix, k: int | None) -> sp.csr_matrix:
    """Each row's ``k`` largest entries (ties broken by lower column index)."""
    if k is None:
        return sim
    rows, cols, vals = [], [], []
    for i in range(sim.shape[0]):
        start, end = sim.indptr[i], sim.indptr[i + 1]
        c, v = sim.indices[start:end], sim.data[start:end]
        order = np.lexsort((c, -v))[:k]
        rows.append(np.full(len(order), i))
        cols.append(c[order])
        vals.append(v[order])
    if not rows:
        return sim
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=sim.shape
    )


class ItemKNN:
    def __init__(self, config: ItemKNNConfig | None = None, seed: int = 0) -> None:
        self.config = config or ItemKNNConfig()
        if self.config.aggregate not in ("sum", "mean"):
            raise PrefrecError(
                f"itemknn aggregate {self.config.aggregate!r}: expected 'sum' or 'mean'"
            )
        if self.config.neighbours is not None and self.config.neighbours < 1:
            raise PrefrecError(f"itemknn neighbours {self.config.neighbours}: expected >= 1")
        self.index = ItemIndex(())
        self.sim = sp.csr_matrix((0, 0))
        self.counts = np.zeros(0)

    def fit(
        self, baskets: Sequence[Basket], titles: Mapping[str, str], on_epoch: OnEpoch | None = None
    ) -> None:
        self.index = ItemIndex(k for b in baskets for k in b.positives)
        rows, cols = [], []
        for u, b in enumerate(baskets):
            for item in b.positives:
                rows.append(u)
                cols.append(self.index.ids[item])
        matrix = sp.csr_matrix(
            (np.ones(len(rows)), (rows, cols)), shape=(len(baskets), len(self.index))
        )
        self.counts = np.asarray(matrix.sum(axis=0)).ravel()
        sim = cosine_similarity(matrix, self.config.shrinkage)
        self.sim = keep_top_neighbours(sim, self.config.neighbours)

    def score(self, queries: Sequence[Query]) -> list[np.ndarray]:
        out = []
        for q in queries:
            history = sorted(set(self.index.known(q.history)))
            scores = np.zeros(len(q.candidates))
            for j, c in enumerate(q.candidates):
                i = self.index.get(c)
                if i is not None and history:
                    scores[j] = self.sim[i, history].sum()
            if self.config.aggregate == "mean" and history:
                scores /= len(history)
            out.append(scores)
        return out
