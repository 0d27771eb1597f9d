"""SASRec: a small causal self-attention model of the next item (Kang & McAuley 2018).

Training sequences are each training user's history followed by a liked item (one
sequence per liked item), cut to the last ``max_len + 1`` items. At every position t the
model reads items 1..t and predicts item t+1: learned item and position embeddings,
``blocks`` pre-norm transformer blocks (``heads`` heads, feed-forward width ``hidden``),
a final layer norm, and scores against the (shared) item embeddings. The loss is the full
softmax cross-entropy over the catalogue at every position,

    L = -mean_t log softmax(h_t E^T)[i_{t+1}],

rather than the original binary loss with one sampled negative: with catalogues of a few
thousand items the full softmax is cheap and trains better (Klenitskiy & Vasilev 2023).

It runs on both task formats: a selection example's sequence is history -> target, a
DMPO pair's is history -> liked item (the explicit negatives are not used). An eval
user's candidates are scored by h_T . e_c from the history's known items; a candidate
never seen in training gets the mean item embedding, an empty history scores 0.
Adam with a constant learning rate; initialisation, dropout and batch order are seeded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prefrec.baselines.base import OnEpoch
from prefrec.baselines.config import SASRecConfig
from prefrec.baselines.items import Basket, ItemIndex, Query
from prefrec.errors import PrefrecError

PAD = 0  # item ids are shifted by one; 0 pads sequences on the left


class SASRecModel(nn.Module):
    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.max_len = cfg.max_len
        self.scale = math.sqrt(cfg.hidden)
        self.items = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=PAD)
        self.positions = nn.Embedding(cfg.max_len, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden, cfg.heads, dim_feedforward=cfg.hidden, dropout=cfg.dropout,
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)

    def attention_mask(self, seq: torch.Tensor) -> torch.Tensor:
        """[B * heads, L, L], True where attention is blocked: the future and the padding.

        Every position may attend to itself, so a padding row is never fully blocked
        (which would give NaN); padding outputs are never read.
        """
        length = seq.shape[1]
        future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        blocked = future[None] | (seq == PAD)[:, None, :]
        blocked &= ~torch.eye(length, dtype=torch.bool)[None]
        return blocked.repeat_interleave(self.heads, dim=0)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, hidden] of left-padded item sequences [B, L <= max_len].

        Positions count from the right end (the last item is always position max_len - 1),
        so batches may be padded to their own longest sequence.
        """
        positions = torch.arange(self.max_len - seq.shape[1], self.max_len)
        x = self.dropout(self.items(seq) * self.scale + self.positions(positions))
        return self.norm(self.encoder(x, mask=self.attention_mask(seq)))

    def item_embeddings(self) -> torch.Tensor:
        return self.items.weight[1:]


def left_pad(sequences: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """[n, length] tensor: each sequence's last ``length`` ids, right-aligned, 0-padded."""
    out = torch.full((len(sequences), length), PAD, dtype=torch.long)
    for k, s in enumerate(sequences):
        s = list(s)[-length:]
        if s:
            out[k, length - len(s) :] = torch.tensor(s, dtype=torch.long)
    return out


class SASRec:
    def __init__(self, config: SASRecConfig | None = None, seed: int = 0) -> None:
        self.config = config or SASRecConfig()
        self.seed = seed
        self.index = ItemIndex(())
        self.model: SASRecModel | None = None

    def _sequences(self, baskets: Sequence[Basket]) -> list[list[int]]:
        """Shifted item ids of history -> liked, one sequence per liked item."""
        out = []
        for b in baskets:
            history = [i + 1 for i in self.index.known(b.history)]
            for liked in self.index.known(b.liked):
                out.append(history + [liked + 1])
        return [s for s in out if len(s) >= 2]

    def fit(
        self, baskets: Sequence[Basket], titles: Mapping[str, str], on_epoch: OnEpoch | None = None
    ) -> None:
        cfg = self.config
        self.index = ItemIndex.from_baskets(baskets, negatives=False)
        sequences = self._sequences(baskets)
        if not sequences:
            raise PrefrecError("sasrec: no training user has a known history and a liked item")
        longest = max((len(s) for s in sequences), default=2)
        padded = left_pad(sequences, min(cfg.max_len + 1, longest))
        inputs, targets = padded[:, :-1], padded[:, 1:]
        rng = np.random.default_rng(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = SASRecModel(len(self.index), cfg)
            opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
            for epoch in range(1, cfg.epochs + 1):
                self.model.train()
                order = torch.from_numpy(rng.permutation(len(sequences)))
                for start in range(0, len(order), cfg.batch_size):
                    rows = order[start : start + cfg.batch_size]
                    hidden = self.model(inputs[rows])
                    logits = hidden @ self.model.item_embeddings().T
                    # targets are shifted ids; PAD (0) becomes -1 and is ignored.
                    loss = F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]),
                        targets[rows].reshape(-1) - 1,
                        ignore_index=-1,
                    )
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                if on_epoch is not None:
                    on_epoch(epoch)
        self.model.eval()

    @torch.no_grad()
    def score(self, queries: Sequence[Query]) -> list[np.ndarray]:
        assert self.model is not None, "fit before score"
        self.model.eval()
        histories = [[i + 1 for i in self.index.known(q.history)] for q in queries]
        longest = max((len(h) for h in histories), default=1)
        hidden = self.model(left_pad(histories, max(1, min(self.config.max_len, longest))))[:, -1]
        items = self.model.item_embeddings()
        mean_item = items.mean(0)
        out = []
        for k, q in enumerate(queries):
            if not histories[k]:
                out.append(np.zeros(len(q.candidates)))
                continue
            ids = [self.index.get(c) for c in q.candidates]
            vecs = torch.stack([items[i] if i is not None else mean_item for i in ids])
            out.append((vecs @ hidden[k]).double().numpy())
        return out
