"""What every baseline is, and how its hyperparameters are chosen on held-out training users.

A baseline is fitted on training :class:`~prefrec.baselines.items.Basket` s and scores the
candidates of :class:`~prefrec.baselines.items.Query` s (higher = more likely liked). Eval
users never appear in training, so every method must score a user from their history alone.

Hyperparameter search never looks at the eval file: a seeded share of the *training* users
(:func:`prefrec.data.split.split_by_user`, with chained sliding windows of one listener
kept together: :func:`prefrec.data.split.window_chains`) is held out, each grid point is fitted on the
rest and scored on the held-out users' own liked-vs-negative items by :func:`pair_auc`, and
the best grid point (the first one on ties) is refitted on all training users.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Protocol

import numpy as np

from prefrec.baselines.items import Basket, Query, validation_queries
from prefrec.data.split import split_by_user, window_chains
from prefrec.errors import PrefrecError

log = logging.getLogger(__name__)

OnEpoch = Callable[[int], None]


class Recommender(Protocol):
    """A fitted-then-scoring baseline.

    ``score_params`` names the config fields that only change scoring (e.g. BPR's fold-in):
    the search scores their grid values on one fitted model instead of refitting.
    """

    config: Any
    score_params: tuple[str, ...] = ()

    def fit(
        self, baskets: Sequence[Basket], titles: Mapping[str, str], on_epoch: OnEpoch | None = None
    ) -> None:
        """Learn from training users. ``titles`` maps every item key (train and eval) to a
        title; ``on_epoch(e)``, when given, is called after epoch e = 1, 2, ... of an
        iterative method (the search scores checkpoints through it)."""

    def score(self, queries: Sequence[Query]) -> list[np.ndarray]:
        """One score per candidate of each query, as float64 arrays."""


Factory = Callable[[Any, int], Recommender]


def pair_auc(scores: np.ndarray, n_liked: int) -> float:
    """Share of (liked, negative) candidate pairs scored in the right order, ties 1/2.

    ``scores[:n_liked]`` are the liked items', the rest the negatives':
    AUC = mean over (l, j) of [s_l > s_j] + 1/2 [s_l = s_j].
    """
    liked = scores[:n_liked, None]
    negative = scores[None, n_liked:]
    return float(((liked > negative) + 0.5 * (liked == negative)).mean())


def validation_score(model: Recommender, queries: Sequence[tuple[Query, int]]) -> float:
    """Mean :func:`pair_auc` of a fitted model over held-out (query, n_liked) pairs."""
    scores = model.score([q for q, _ in queries])
    return float(np.mean([pair_auc(s, n) for s, (_, n) in zip(scores, queries, strict=True)]))


@dataclass(frozen=True)
class Trial:
    """One grid point and its validation score."""

    params: dict[str, Any]
    score: float


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of ``grid`` (``{}`` gives one empty point), in grid order."""
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*grid.values())]


def search(
    factory: Factory,
    config: Any,
    baskets: Sequence[Basket],
    titles: Mapping[str, str],
    validation_fraction: float,
    seed: int,
) -> tuple[Any, list[Trial]]:
    """The config with the best grid point of ``config.grid`` set, and every trial.

    An ``epochs`` axis costs one fit per other grid point: the model is trained for the
    largest value and scored after each listed epoch (training schedules are constant, so
    stopping at epoch e equals training for e epochs). Axes named in the model's
    ``score_params`` are scored on the same fit. Without a grid, or without enough
    held-out users with negatives, ``config`` is returned as is.
    """
    grid = dict(getattr(config, "grid", {}) or {})
    known = {f.name for f in fields(config)}
    unknown = sorted(set(grid) - known)
    if unknown:
        raise PrefrecError(
            f"{type(config).__name__}: grid names unknown field(s) {', '.join(unknown)}"
        )
    if not grid:
        return config, []
    chains = window_chains([b.history for b in baskets], [b.liked for b in baskets])
    users = [baskets[first].user for first in chains]
    if len(set(users)) < 2:
        log.warning("only %d training user(s): no hyperparameter search", len(set(users)))
        return config, []
    fit_part, held_out = split_by_user(baskets, validation_fraction, seed, users)
    queries = validation_queries(held_out)
    if not queries:
        log.warning("no held-out user has negatives to rank: no hyperparameter search")
        return config, []
    epochs = sorted(grid.pop("epochs", []))
    score_params = getattr(factory, "score_params", ())
    score_grid = {k: grid.pop(k) for k in list(grid) if k in score_params}
    trials: list[Trial] = []
    for point in grid_points(grid):
        cfg = replace(config, **point, **({"epochs": epochs[-1]} if epochs else {}))
        model = factory(cfg, seed)

        def evaluate(extra: dict, point: dict = point, model: Recommender = model) -> None:
            for score_point in grid_points(score_grid):
                model.config = replace(model.config, **score_point)
                trials.append(
                    Trial({**point, **score_point, **extra}, validation_score(model, queries))
                )

        def checkpoint(epoch: int, evaluate: Callable[[dict], None] = evaluate) -> None:
            if epoch in epochs:
                evaluate({"epochs": epoch})

        if epochs:
            model.fit(fit_part, titles, on_epoch=checkpoint)
        else:
            model.fit(fit_part, titles)
            evaluate({})
    best = max(trials, key=lambda t: t.score)  # max keeps the first of equal scores
    for t in trials:
        log.info("  %s validation pair AUC %.4f%s", t.params, t.score,
                 "  <- chosen" if t is best else "")
    held_ids = {id(b) for b in held_out}
    held_out_users = {u for b, u in zip(baskets, users, strict=True) if id(b) in held_ids}
    log.info(
        "%s: chose %s on %d held-out training users (%d queries)",
        type(config).__name__, best.params, len(held_out_users), len(queries),
    )
    return replace(config, **best.params), trials


def config_dict(config: Any) -> dict[str, Any]:
    """A config as a JSON-ready dict."""
    return asdict(config)
