"""Collaborative item tokens: LLaRA's hybrid item representation for DMPO pairwise prompts.

An item's vector from a collaborative model fitted on the *training* users only (BPR-MF,
SASRec or item-kNN's similarity graph, from :mod:`prefrec.baselines`) is projected by a
small trained MLP into the LLM's input-embedding space and inserted as ONE extra input
position right after each ``<Title:X>`` tag of a prompt (history and candidates):

    e(item) = W2 . GELU(W1 . v_item + b1) + b2,        v_item in R^d, e(item) in R^hidden

Items the collaborative model never saw (cold items, eval-only titles) use a learned
"unknown" vector in place of v_item, never an error. The collaborative vectors stay fixed;
the MLP and the unknown vector train with the LoRA adapter, and are saved beside it
(``item_projector.safetensors`` + ``item_projector.json``), so ``eval``, ``rank``, ``serve``
and ``Recommender.load`` restore them with the adapter chain.

In token space an item position is a *virtual token* with a negative id, ``-(row + 1)``,
where ``row`` indexes the projector's table (its last row is the unknown vector). The
scorer's prefix tree compares ids, so positions of one item share like any token and
those of different items never do; its decoder input is the token embedding for real
ids and ``projector(row)`` for virtual ones (:func:`prefrec.scoring.score_completions`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prefrec.data.titles import item_key
from prefrec.errors import PrefrecError

log = logging.getLogger(__name__)

ITEM_SOURCES = ("none", "bpr", "sasrec", "itemknn")
WEIGHTS_FILE = "item_projector.safetensors"
META_FILE = "item_projector.json"
ITEMKNN_DIM = 64  # as SASRec's hidden size: the projector maps 64 numbers an item
TITLE_TAG = re.compile(r"<Title:(.*?)>")


class ItemProjector(nn.Module):
    """Fixed collaborative item vectors, a learned unknown vector and the MLP into the
    LLM's embedding space. ``keys`` are :func:`~prefrec.data.titles.item_key` s."""

    def __init__(self, keys: Sequence[str], vectors: torch.Tensor, hidden_size: int,
                 source: str) -> None:
        super().__init__()
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise ValueError(f"got {len(keys)} item keys for vectors of shape {tuple(vectors.shape)}")
        self.keys = list(keys)
        self.rows = {k: i for i, k in enumerate(self.keys)}
        self.source = source
        dim = vectors.shape[1]
        self.register_buffer("vectors", vectors.detach().float().clone())
        self.unknown = nn.Parameter(torch.zeros(dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size))

    @property
    def unknown_row(self) -> int:
        return len(self.keys)

    def row(self, title: str) -> int:
        """The table row of a title: its collaborative vector, or the unknown one."""
        return self.rows.get(item_key(title), self.unknown_row)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """[n] table rows -> [n, hidden] input embeddings."""
        table = torch.cat([self.vectors, self.unknown[None]])
        return self.mlp(table[rows])

    # ------------------------------------------------------------------ files

    def save(self, folder: str | Path) -> None:
        """Write the weights and the item keys into ``folder`` (an adapter folder)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        meta = {"source": self.source, "keys": self.keys, "dim": int(self.vectors.shape[1]),
                "hidden_size": int(self.mlp[2].out_features)}
        (folder / META_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> ItemProjector | None:
        """The projector saved in ``folder``, or None when it has none."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / WEIGHTS_FILE).is_file():
            return None
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            state = load_file(str(folder / WEIGHTS_FILE))
            projector = cls(meta["keys"], torch.zeros(len(meta["keys"]), meta["dim"]),
                            meta["hidden_size"], meta["source"])
            projector.load_state_dict(state)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            raise PrefrecError(f"{folder / WEIGHTS_FILE}: unreadable item projector ({err})") from None
        return projector


# --------------------------------------------------------------------------- fitting


def check_item_source(source: str) -> None:
    """Raise unless ``source`` is ``none``, one collaborative source, or several joined by
    ``+`` (``bpr+itemknn``: their vectors side by side in one item token)."""
    parts = source.split("+")
    known = [s for s in ITEM_SOURCES if s != "none"]
    if source != "none" and (len(set(parts)) < len(parts) or any(p not in known for p in parts)):
        raise PrefrecError(f"--item-embeddings {source}: expected none, one of "
                           f"{', '.join(known)}, or several of them joined by '+'")


def fit_item_vectors(examples: Sequence, source: str, seed: int) -> tuple[list[str], torch.Tensor]:
    """Item keys and vectors of a collaborative model fitted on ``examples`` (training
    users only), default settings: BPR-MF's item factors with its item bias as one more
    column, SASRec's item embeddings, or item-kNN's similarity graph as spectral vectors
    (:func:`~prefrec.baselines.itemknn.spectral_item_vectors`, 64 dimensions) with
    log(1 + the item's number of training users) as one more column; every column
    standardised. Sources joined by ``+`` give their columns side by side, over the union
    of their items; an item one source never saw gets zeros (its columns' mean) there."""
    from prefrec.baselines.items import baskets_from_examples, item_titles

    check_item_source(source)
    if "+" in source:
        fitted = [fit_item_vectors(examples, part, seed) for part in source.split("+")]
        keys = list(dict.fromkeys(k for part_keys, _ in fitted for k in part_keys))
        row = {k: i for i, k in enumerate(keys)}
        blocks = []
        for part_keys, vectors in fitted:
            block = torch.zeros(len(keys), vectors.shape[1])
            block[[row[k] for k in part_keys]] = vectors
            blocks.append(block)
        return keys, torch.cat(blocks, 1)

    baskets = baskets_from_examples(examples)
    titles = item_titles(examples)
    if source == "bpr":
        from prefrec.baselines.bpr import BPR

        bpr = BPR(seed=seed)
        bpr.fit(baskets, titles)
        # BPR scores p_u . q_i + b_i: the bias b_i carries how liked an item is across users,
        # most of what separates a liked from a disliked candidate, so it rides along.
        return list(bpr.index.keys), standardize_columns(torch.cat([bpr.items, bpr.bias[:, None]], 1))
    if source == "sasrec":
        from prefrec.baselines.sasrec import SASRec

        sasrec = SASRec(seed=seed)
        sasrec.fit(baskets, titles)
        return list(sasrec.index.keys), standardize_columns(sasrec.model.item_embeddings().detach())
    if source == "itemknn":
        from prefrec.baselines.itemknn import ItemKNN, spectral_item_vectors

        knn = ItemKNN(seed=seed)
        knn.fit(baskets, titles)
        vectors = torch.from_numpy(spectral_item_vectors(knn.sim, ITEMKNN_DIM)).float()
        # as BPR's bias: how many training users hold an item is what separates most liked
        # from disliked candidates, and a low-rank view of the graph would blur it.
        counts = torch.from_numpy(np.log1p(knn.counts)).float()[:, None]
        return list(knn.index.keys), standardize_columns(torch.cat([vectors, counts], 1))
    raise PrefrecError(f"item_embeddings {source!r}: no collaborative model to fit")


def standardize_columns(vectors: torch.Tensor) -> torch.Tensor:
    """(v - mean) / std per column, so the projector's first layer sees unit-scale inputs
    whatever the collaborative model's factor scale (BPR's init_std is 0.1)."""
    vectors = vectors.float()
    return (vectors - vectors.mean(0)) / vectors.std(0).clamp(min=1e-6)


def build_projector(examples: Sequence, source: str, hidden_size: int, seed: int) -> ItemProjector:
    """Fit the collaborative model on the training examples and wrap a fresh projector."""
    from prefrec.data.schema import PairwiseExample

    if not all(isinstance(ex, PairwiseExample) for ex in examples):
        raise PrefrecError("item_embeddings needs DMPO pairwise data (titles as <Title:X> tags)")
    keys, vectors = fit_item_vectors(examples, source, seed)
    torch.manual_seed(seed)  # the MLP's init
    projector = ItemProjector(keys, vectors, hidden_size, source)
    log.info("item tokens: %s vectors of %d training items (dim %d) -> hidden %d",
             source, len(keys), vectors.shape[1], hidden_size)
    return projector


# --------------------------------------------------------------------------- the model


def _base(model) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attach_item_projector(model, projector: ItemProjector, trainable: bool) -> None:
    """Make ``projector`` part of ``model`` (under a PEFT wrapper: of its base), on the
    model's device, so the scorer finds it and the Trainer's optimizer trains it."""
    base = _base(model)
    device = base.get_output_embeddings().weight.device
    projector.to(device).requires_grad_(trainable)
    base.item_projector = projector


def item_projector_of(model) -> ItemProjector | None:
    """The projector attached to ``model``, if any."""
    found = getattr(_base(model), "item_projector", None)
    return found if isinstance(found, ItemProjector) else None


def item_positions(prompt: str, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, str]]:
    """(token index to insert before, title) for each ``<Title:X>`` tag of ``prompt``.

    ``offsets`` are the tokens' character spans (a fast tokenizer's offset mapping). The
    virtual token goes after the token that holds the tag's closing ``>``.
    """
    out = []
    for match in TITLE_TAG.finditer(prompt):
        end = match.end()
        index = next((t + 1 for t, (_, stop) in enumerate(offsets) if stop >= end), len(offsets))
        out.append((index, match.group(1)))
    return out
