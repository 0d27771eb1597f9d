"""BPR-MF: matrix factorisation trained with the Bayesian Personalised Ranking loss.

The score of item i for user u is x_ui = p_u . q_i + b_i. Training draws triples
(u, i, j): i is one of u's positives (history and liked items) and j a negative, and
minimises (Rendle et al. 2009)

    L = -mean log sigmoid(x_ui - x_uj) + reg * mean(|p_u|^2 + |q_i|^2 + |q_j|^2 + b_i^2 + b_j^2).

With probability ``explicit_negative_share`` j is one of u's explicit negatives (a DMPO
pair's disliked item, a selection example's other candidates) when u has any; otherwise
j is drawn uniformly from the catalogue items u has no positive interaction with.
Adam with a constant learning rate; seeded initialisation and sampling.

Eval users are not in the training data, so they are *folded in* from their history H'
(the items of it seen in training), with the item factors fixed:

- ``fold_in="mean"``: p = (1/|H'|) sum_{h in H'} q_h;
- ``fold_in="gradient"``: p starts at 0 and takes ``fold_in_steps`` Adam steps on the same
  BPR loss over (h in H', j uniform over the catalogue) pairs, L2 weight ``reg``.

Which one is used is part of the validation search. A candidate never seen in training
gets the mean item factor and the mean bias (an "average item").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prefrec.baselines.base import OnEpoch
from prefrec.baselines.config import BPRConfig
from prefrec.baselines.items import Basket, ItemIndex, Query
from prefrec.errors import PrefrecError

log = logging.getLogger(__name__)

FOLD_IN = ("mean", "gradient")


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """-mean log sigmoid(x_ui - x_uj): the BPR ranking loss (without the L2 term)."""
    return -F.logsigmoid(pos_scores - neg_scores).mean()


class BPR:
    score_params = ("fold_in", "fold_in_steps", "fold_in_lr")

    def __init__(self, config: BPRConfig | None = None, seed: int = 0) -> None:
        self.config = config or BPRConfig()
        for fold_in in [self.config.fold_in, *self.config.grid.get("fold_in", [])]:
            if fold_in not in FOLD_IN:
                raise PrefrecError(
                    f"bpr fold_in {fold_in!r}: expected one of {', '.join(FOLD_IN)}"
                )
        self.seed = seed
        self.index = ItemIndex(())
        self.items = torch.zeros(0, self.config.dim)
        self.bias = torch.zeros(0)

    # ------------------------------------------------------------------ training

    def _triples(
        self, users: list[np.ndarray], explicit: list[np.ndarray], positive_mask: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """One epoch's (u, i, j) triples: every positive of every user once, shuffled."""
        u = np.concatenate([np.full(len(p), k) for k, p in enumerate(users)])
        i = np.concatenate(users)
        j = rng.integers(0, len(self.index), size=len(i))
        # Uniform negatives must not be positives of the user: redraw until none is.
        while (bad := positive_mask[u, j]).any():
            j[bad] = rng.integers(0, len(self.index), size=int(bad.sum()))
        # Explicit negatives: a uniform pick among the user's own, where it has any.
        counts = np.array([len(n) for n in explicit])[u]
        offsets = np.concatenate([[0], np.cumsum([len(n) for n in explicit])])[u]
        pick = np.floor(rng.random(len(i)) * counts).astype(np.int64)
        use_explicit = (rng.random(len(i)) < self.config.explicit_negative_share) & (counts > 0)
        if use_explicit.any():
            flat = np.concatenate(explicit)
            j[use_explicit] = flat[(offsets + pick)[use_explicit]]
        return rng.permutation(np.stack([u, i, j], axis=1))

    def fit(
        self, baskets: Sequence[Basket], titles: Mapping[str, str], on_epoch: OnEpoch | None = None
    ) -> None:
        cfg = self.config
        self.index = ItemIndex.from_baskets(baskets)
        n_items = len(self.index)
        users = [np.array(self.index.known(b.positives), dtype=np.int64) for b in baskets]
        explicit = [np.array(self.index.known(b.negatives), dtype=np.int64) for b in baskets]
        positive_mask = np.zeros((len(baskets), n_items), dtype=bool)
        for k, p in enumerate(users):
            positive_mask[k, p] = True
        if positive_mask.all(axis=1).any():
            raise PrefrecError("bpr: a training user interacted with every item; no negatives")

        gen = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        user_f = torch.nn.Parameter(torch.randn(len(baskets), cfg.dim, generator=gen) * cfg.init_std)
        item_f = torch.nn.Parameter(torch.randn(n_items, cfg.dim, generator=gen) * cfg.init_std)
        bias = torch.nn.Parameter(torch.zeros(n_items))
        opt = torch.optim.Adam([user_f, item_f, bias], lr=cfg.lr)
        loss_sum, n_batches = 0.0, 0
        for epoch in range(1, cfg.epochs + 1):
            triples = torch.from_numpy(self._triples(users, explicit, positive_mask, rng))
            for start in range(0, len(triples), cfg.batch_size):
                u, i, j = triples[start : start + cfg.batch_size].T
                pu, qi, qj = user_f[u], item_f[i], item_f[j]
                x_ui = (pu * qi).sum(-1) + bias[i]
                x_uj = (pu * qj).sum(-1) + bias[j]
                l2 = (pu.pow(2).sum(-1) + qi.pow(2).sum(-1) + qj.pow(2).sum(-1)
                      + bias[i].pow(2) + bias[j].pow(2)).mean()
                loss = bpr_loss(x_ui, x_uj) + cfg.reg * l2
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum, n_batches = loss_sum + loss.item(), n_batches + 1
            self.items, self.bias = item_f.detach().clone(), bias.detach().clone()
            if on_epoch is not None:
                on_epoch(epoch)
        log.debug("bpr: mean batch loss %.4f", loss_sum / max(n_batches, 1))

    # ------------------------------------------------------------------ scoring

    def user_vectors(self, histories: list[list[int]]) -> torch.Tensor:
        """Fold-in user factors [n, dim] from histories of known item ids."""
        n, dim = len(histories), self.items.shape[1]
        width = max((len(h) for h in histories), default=0)
        if width == 0:
            return torch.zeros(n, dim)
        ids = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width)
        for k, h in enumerate(histories):
            ids[k, : len(h)] = torch.tensor(h, dtype=torch.long)
            mask[k, : len(h)] = 1.0
        counts = mask.sum(1).clamp(min=1)
        if self.config.fold_in == "mean":
            return (self.items[ids] * mask[..., None]).sum(1) / counts[:, None]
        gen = torch.Generator().manual_seed(self.seed + 1)
        p = torch.zeros(n, dim, requires_grad=True)
        opt = torch.optim.Adam([p], lr=self.config.fold_in_lr)
        x_h = None
        for _ in range(self.config.fold_in_steps):
            neg = torch.randint(0, len(self.index), (n, width), generator=gen)
            x_h = torch.einsum("nd,nwd->nw", p, self.items[ids]) + self.bias[ids]
            x_j = torch.einsum("nd,nwd->nw", p, self.items[neg]) + self.bias[neg]
            pair = -F.logsigmoid(x_h - x_j) * mask
            loss = (pair.sum(1) / counts).sum() + self.config.reg * p.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return p.detach() * (mask.sum(1, keepdim=True) > 0)

    def score(self, queries: Sequence[Query]) -> list[np.ndarray]:
        users = self.user_vectors([self.index.known(q.history) for q in queries])
        mean_item, mean_bias = self.items.mean(0), self.bias.mean()
        out = []
        for k, q in enumerate(queries):
            ids = [self.index.get(c) for c in q.candidates]
            vecs = torch.stack([self.items[i] if i is not None else mean_item for i in ids])
            bias = torch.stack([self.bias[i] if i is not None else mean_bias for i in ids])
            out.append((vecs @ users[k] + bias).double().numpy())
        return out
