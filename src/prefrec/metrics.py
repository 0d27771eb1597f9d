"""Evaluation metrics as small pure functions over numpy arrays, registered by name.

Three task families, each with its own inputs (one row per test example):

- ``pairwise`` (DMPO data): ``chosen`` = log pi(positive-first completion | x) and
  ``rejected`` = log pi(negative-first completion | x), one float each per test pair.
- ``selection`` (S-DPO data, likelihood ranking): ``scores`` [n, N] (e.g. the log-prob of
  each candidate's title as the answer) and ``target_index`` [n]; or ``ranks`` directly.
- ``generation`` (S-DPO data, greedy decoding): the generated answers, the candidate lists
  and the targets; or the per-example ``valid`` / ``hit`` flags of :func:`selection_validity`.

:data:`METRICS` maps a metric's name to a :class:`Metric` (its task, its inputs, its
function); :func:`compute_all` evaluates every metric of a task and returns
:class:`MetricValue` s carrying a percentile-bootstrap confidence interval and the sample
count. Significance between two models scored on the same examples:
:func:`paired_bootstrap_pvalue` (any metric) and :func:`mcnemar_pvalue` (0/1 outcomes).

Sub-groups (e.g. accuracy by the position of the positive in the prompt): select the
rows first and evaluate the subset, ``compute_all("pairwise", chosen=c[m], rejected=r[m])``.
Do not wrap a metric in a mask: the bootstrap resamples rows, so a mask of the original
length would no longer line up with them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
from scipy.stats import binomtest, rankdata
from sklearn.metrics import roc_auc_score

Task = Literal["pairwise", "selection", "generation"]
Protocol = Literal["sdpo", "llara"]

# Bootstrap work is done in blocks of at most this many resampled values, so that a large
# test set (n = 100k) never materialises an n_boot x n matrix at once.
_BLOCK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class MetricValue:
    """A point estimate with its (1 - alpha) bootstrap interval and the number of examples."""

    name: str
    value: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN (an undefined metric or interval) becomes ``None``."""
        row = asdict(self)
        for key in ("value", "ci_low", "ci_high"):
            if math.isnan(row[key]):
                row[key] = None
        return row

    def fmt(self, digits: int = 3) -> str:
        """``"0.512 [0.481, 0.544] n=1000"``."""
        return (
            f"{self.value:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"
            f" n={self.n}"
        )


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _paired_scores(chosen: Any, rejected: Any) -> tuple[np.ndarray, np.ndarray]:
    chosen = np.asarray(chosen, dtype=np.float64)
    rejected = np.asarray(rejected, dtype=np.float64)
    if chosen.ndim != 1 or chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen and rejected must be 1-D of equal length, got shapes "
            f"{chosen.shape} and {rejected.shape}"
        )
    if chosen.size == 0:
        raise ValueError("no pairs to evaluate")
    if np.isnan(chosen).any() or np.isnan(rejected).any():
        raise ValueError("chosen/rejected log-probs contain NaN")
    return chosen, rejected


def _ranks_1d(ranks: Any) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    if (ranks < 1).any():
        raise ValueError("ranks are 1-based; found a rank < 1")
    return ranks


def _flags_1d(*flags: Any) -> list[np.ndarray]:
    out = [np.asarray(f, dtype=bool) for f in flags]
    if any(f.ndim != 1 for f in out) or len({f.shape for f in out}) != 1 or out[0].size == 0:
        raise ValueError(
            f"expected non-empty 1-D flags of equal length, got {[f.shape for f in out]}"
        )
    return out


# --------------------------------------------------------------------------------------
# Pairwise ranking
# --------------------------------------------------------------------------------------


def _pairwise_wins(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    return (chosen > rejected) + 0.5 * (chosen == rejected)


def pairwise_accuracy(chosen: Any, rejected: Any) -> float:
    """Share of pairs where log pi(positive-first) > log pi(negative-first); ties count 0.5.

    acc = (1/n) * sum_i [ 1(c_i > r_i) + 0.5 * 1(c_i == r_i) ].

    Why a tie counts one half: a model that cannot tell the two orderings apart is
    guessing, and a fair coin is right half the time. It also makes the per-pair value
    exactly the AUC of that pair (one positive, one negative: the Mann-Whitney statistic,
    which counts ties as 1/2), so a degenerate model with all-equal scores reads 0.5 (chance)
    rather than 0 or 1.
    """
    chosen, rejected = _paired_scores(chosen, rejected)
    return float(np.mean(_pairwise_wins(chosen, rejected)))


def _dmpo_picks(n: int, seed: int) -> np.ndarray:
    """True where the DMPO notebook keeps the chosen log-prob (label 1), False for rejected."""
    rng = random.Random(seed)
    return np.array([rng.random() < 0.5 for _ in range(n)], dtype=bool)


def dmpo_auc(chosen: Any, rejected: Any, seed: int = 42) -> float:
    """ROC-AUC by the DMPO paper's protocol (their ``auc.ipynb``), to compare with its numbers.

    For each test pair i, in order, draw u_i from Python's ``random`` seeded with ``seed``;
    if u_i < 0.5 keep (label 1, score c_i), else keep (label 0, score r_i); then
    ``sklearn.metrics.roc_auc_score(labels, scores)`` over the n kept points. It thus
    compares log-probs *across* pairs (different users, different completions), which mixes
    the model's preference with how likely each pair's text is at all; prefer
    :func:`pairwise_accuracy` / :func:`candidate_roc_auc` for conclusions.

    Source: BZX667/DMPO ``auc.ipynb`` (commit 4f88f6fb): ``random.seed(42)``, then for each
    ``Metrics: {...}`` log line ``if random.random()<0.5: label 1, prediction chosen_logps
    else: label 0, prediction reject_logps``; ``roc_auc_score(label, prediction)``. The
    values are ``eval_logps/chosen`` / ``eval_logps/rejected`` of their DPO trainer: summed
    (not averaged) completion log-probs of the policy, logged once per eval batch with
    ``per_device_eval_batch_size 1`` (their run.sh), i.e. once per pair. We match the RNG
    (``random.Random(seed).random()``, the same Mersenne-Twister stream as the module-level
    ``random`` after ``random.seed``), the pick rule and the labels, so the same log-probs
    in the same order give the notebook's number. Assumption: their log contains exactly
    the eval pairs in dataset order (no training lines); that is not checkable from the
    notebook. Returns NaN if all picks share one label (only possible for tiny n).

    In a bootstrap, resampled rows take the pick of their new position, so the interval
    also covers the luck of the draw (the point estimate is one draw).
    """
    chosen, rejected = _paired_scores(chosen, rejected)
    picks = _dmpo_picks(chosen.size, seed)
    if picks.all() or not picks.any():
        return math.nan
    return float(roc_auc_score(picks.astype(int), np.where(picks, chosen, rejected)))


def candidate_roc_auc(chosen: Any, rejected: Any) -> float:
    """Global ROC-AUC over all 2n candidates, each scored by how much it is preferred first.

    Pair i yields two candidates: its positive, scored d_i = c_i - r_i (the log-odds of
    the model putting it first), label 1; and its negative, scored -d_i (the same quantity
    from that candidate's side), label 0. AUC = P(d_i > -d_j) + 0.5 * P(d_i == -d_j) over
    all (i, j), computed by ``roc_auc_score`` (which counts ties as 1/2).
    Unlike :func:`pairwise_accuracy` (only i == j) it also asks whether a positive of one
    user outranks a negative of another, and unlike :func:`dmpo_auc` it uses both
    candidates of every pair and no random draw, and scores by a within-prompt
    difference, so text length and user history largely cancel.
    """
    chosen, rejected = _paired_scores(chosen, rejected)
    margin = chosen - rejected
    labels = np.r_[np.ones(margin.size, dtype=int), np.zeros(margin.size, dtype=int)]
    return float(roc_auc_score(labels, np.r_[margin, -margin]))


def _auc_rows(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC-AUC of each row of ``scores`` by the Mann-Whitney rank formula (ties = 1/2).

    AUC = (R_pos - n1 (n1 + 1) / 2) / (n1 * n0), R_pos = sum of the positives' average
    ranks. Equals ``roc_auc_score`` row by row (a test checks it) at a fraction of the
    cost of calling it once per bootstrap resample.
    """
    ranks = rankdata(scores, method="average", axis=-1)
    n1 = positive.sum(axis=-1)
    n0 = positive.shape[-1] - n1
    rank_sum = (ranks * positive).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n1 > 0) & (n0 > 0), (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0), np.nan)


def _dmpo_auc_rows(chosen: np.ndarray, rejected: np.ndarray, seed: int = 42) -> np.ndarray:
    picks = _dmpo_picks(chosen.shape[-1], seed)
    return _auc_rows(np.where(picks, chosen, rejected), picks)


def _candidate_roc_auc_rows(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    margin = chosen - rejected
    n = margin.shape[-1]
    positive = np.r_[np.ones(n, dtype=bool), np.zeros(n, dtype=bool)]
    return _auc_rows(np.concatenate([margin, -margin], axis=-1), positive)


# --------------------------------------------------------------------------------------
# Candidate selection by likelihood ranking
# --------------------------------------------------------------------------------------


def target_ranks(scores: Any, target_index: Any) -> np.ndarray:
    """1-based rank of each row's target among its N candidates (higher score = better).

    rank_i = 1 + #{j != t_i : s_ij >= s_it_i}.

    Ties are broken pessimistically (every tied candidate is placed ahead of the target),
    so a model that gives all candidates the same score ranks the target last, not first:
    a degenerate scorer must never look good. Pad ragged candidate lists with ``-inf``;
    padding only ties with a target that itself scored ``-inf``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    target_index = np.asarray(target_index)
    if scores.ndim != 2 or target_index.shape != (scores.shape[0],) or scores.shape[0] == 0:
        raise ValueError(
            f"expected scores [n, N] and target_index [n], got {scores.shape} and "
            f"{target_index.shape}"
        )
    if not np.issubdtype(target_index.dtype, np.integer):
        raise ValueError(f"target_index must be integers, got {target_index.dtype}")
    if (target_index < 0).any() or (target_index >= scores.shape[1]).any():
        raise ValueError(f"target_index out of range for {scores.shape[1]} candidates")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    target_score = scores[np.arange(scores.shape[0]), target_index]
    # The target itself satisfies s >= s, which supplies the "1 +".
    return (scores >= target_score[:, None]).sum(axis=1)


def _ndcg_gain(ranks: np.ndarray, k: int) -> np.ndarray:
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def hit_ratio_at_k(ranks: Any, k: int) -> float:
    """HR@k = (1/n) * sum_i 1(rank_i <= k)."""
    return float(np.mean(_ranks_1d(ranks) <= k))


def ndcg_at_k(ranks: Any, k: int) -> float:
    """NDCG@k with one relevant item: (1/n) * sum_i 1(rank_i <= k) / log2(rank_i + 1).

    The ideal DCG is 1/log2(2) = 1, so no normalisation is needed.
    """
    return float(np.mean(_ndcg_gain(_ranks_1d(ranks), k)))


def mrr(ranks: Any) -> float:
    """Mean reciprocal rank: (1/n) * sum_i 1 / rank_i (over all N candidates, no cut-off)."""
    return float(np.mean(1.0 / _ranks_1d(ranks)))


# --------------------------------------------------------------------------------------
# Candidate selection by generation (S-DPO's HitRatio@1 / ValidRatio)
# --------------------------------------------------------------------------------------


def selection_validity(
    generated_texts: Sequence[str],
    candidates_lists: Sequence[Sequence[str]],
    targets: Sequence[str],
    protocol: Protocol = "sdpo",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example (valid, hit) flags of a generated answer, as S-DPO (or LLaRA) decides.

    ``generated_texts`` are the generated continuations only (not prompt + answer).

    ``protocol="sdpo"`` follows chenyuxin1999/S-DPO ``evaluate_batch.py::evaluate`` (called
    by its ``inference.py``): ``num_cans = sum(1 for can in candidates if can in selection)``,
    i.e. case-sensitive Python substring tests of each listed candidate against the decoded,
    ``.strip()``-ed answer (greedy, at most 20 new tokens); *valid* iff exactly one
    candidate appears; *hit* iff valid and ``target in selection``. A candidate contained in
    another ("Alien" in "Aliens") therefore makes the longer one's mention invalid; we keep
    that quirk. S-DPO returns ``score / len(inputs)``, so HitRatio@1 divides by *all*
    examples: :func:`hit_ratio_at_1`.

    ``protocol="llara"`` follows ljy0ustc/LLaRA ``model/model_interface.py``, which differs
    (the claim that S-DPO and LLaRA evaluate alike does not hold): the answer is cut to its
    first line (``generate.strip().split("\\n")[0]``), answer, candidates and target are
    ``.strip().lower()``-ed, *hit* iff valid and the one matched candidate equals the target,
    and ``calculate_hr1`` divides the hits by the *valid* examples:
    :func:`hit_ratio_at_1_of_valid`.
    """
    if not len(generated_texts) == len(candidates_lists) == len(targets):
        raise ValueError(
            f"generated_texts, candidates_lists and targets differ in length: "
            f"{len(generated_texts)}, {len(candidates_lists)}, {len(targets)}"
        )
    if protocol not in ("sdpo", "llara"):
        raise ValueError(f"unknown protocol {protocol!r}; expected 'sdpo' or 'llara'")
    valid = np.zeros(len(targets), dtype=bool)
    hit = np.zeros(len(targets), dtype=bool)
    for i, (text, candidates, target) in enumerate(
        zip(generated_texts, candidates_lists, targets, strict=True)
    ):
        if protocol == "sdpo":
            answer = text.strip()
            matched = [c for c in candidates if c in answer]
            valid[i] = len(matched) == 1
            hit[i] = valid[i] and target in answer
        else:
            answer = text.strip().split("\n")[0].strip().lower()
            matched = [c.strip().lower() for c in candidates if c.strip().lower() in answer]
            valid[i] = len(matched) == 1
            hit[i] = valid[i] and matched[0] == target.strip().lower()
    return valid, hit


def valid_ratio(valid: Any) -> float:
    """ValidRatio = (1/n) * sum_i valid_i: answers naming exactly one candidate."""
    (valid,) = _flags_1d(valid)
    return float(valid.mean())


def hit_ratio_at_1(hit: Any) -> float:
    """HitRatio@1 as S-DPO reports it: hits over *all* examples, (1/n) * sum_i hit_i."""
    (hit,) = _flags_1d(hit)
    return float(hit.mean())


def _of_valid_rows(valid: np.ndarray, hit: np.ndarray) -> np.ndarray:
    n_valid = valid.sum(axis=-1)
    # LLaRA returns 0 (not undefined) when no answer is valid.
    return np.where(n_valid > 0, (hit & valid).sum(axis=-1) / np.maximum(n_valid, 1), 0.0)


def hit_ratio_at_1_of_valid(valid: Any, hit: Any) -> float:
    """HitRatio@1 as LLaRA reports it: sum_i hit_i / sum_i valid_i (0 when nothing is valid)."""
    valid, hit = _flags_1d(valid, hit)
    return float(_of_valid_rows(valid, hit))


# --------------------------------------------------------------------------------------
# Bootstrap and significance
# --------------------------------------------------------------------------------------


def _resample_blocks(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of ``n_boot`` resamples of n rows, drawn with replacement in blocks.

    All bootstrap functions draw through here, so a seed means the same resamples whether a
    metric is evaluated one resample at a time or a block at a time.
    """
    rng = np.random.default_rng(seed)
    block = max(1, min(n_boot, _BLOCK_ELEMENTS // max(n, 1)))
    done = 0
    while done < n_boot:
        size = min(block, n_boot - done)
        yield rng.integers(0, n, size=(size, n))
        done += size


def _n_rows(arrays: Sequence[Any]) -> int:
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"arrays differ in their number of rows: {sorted(lengths)}")
    (n,) = lengths
    if n == 0:
        raise ValueError("no examples to evaluate")
    return n


def _bootstrap_stats(
    metric_fn: Callable[..., float],
    arrays: Sequence[np.ndarray],
    n_boot: int,
    seed: int,
    batched_fn: Callable[..., np.ndarray] | None,
) -> np.ndarray:
    n = _n_rows(arrays)
    stats = []
    for idx in _resample_blocks(n, n_boot, seed):
        if batched_fn is not None:
            stats.append(np.asarray(batched_fn(*(a[idx] for a in arrays)), dtype=np.float64))
        else:
            stats.append(np.array([metric_fn(*(a[row] for a in arrays)) for row in idx]))
    return np.concatenate(stats)


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    batched_fn: Callable[..., np.ndarray] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of ``metric_fn(*arrays)``.

    Resamples the n rows (examples) of all ``arrays`` together, with replacement, ``n_boot``
    times with ``np.random.default_rng(seed)``, and returns the alpha/2 and 1 - alpha/2
    percentiles of the metric over the resamples. Resamples where the metric is undefined
    (NaN, e.g. an AUC with one class) are left out; if all are, returns (NaN, NaN).

    ``batched_fn``, if given, must compute the same metric for a block of resamples at
    once (arrays of shape [b, n, ...], one value per resample); it replaces the Python loop.
    """
    arrays_np = [np.asarray(a) for a in arrays]
    stats = _bootstrap_stats(metric_fn, arrays_np, n_boot, seed, batched_fn)
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def evaluate_metric(
    name: str,
    fn: Callable[..., float],
    *arrays: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    batched_fn: Callable[..., np.ndarray] | None = None,
) -> MetricValue:
    """``fn(*arrays)`` with its bootstrap interval (:func:`bootstrap_ci`) and row count."""
    value = float(fn(*arrays))
    low, high = bootstrap_ci(
        fn, *arrays, n_boot=n_boot, seed=seed, alpha=alpha, batched_fn=batched_fn
    )
    return MetricValue(name=name, value=value, ci_low=low, ci_high=high, n=_n_rows(arrays))


def paired_bootstrap_pvalue(
    metric_fn: Callable[..., float],
    arrays_a: Sequence[Any],
    arrays_b: Sequence[Any],
    n_boot: int = 1000,
    seed: int = 0,
    batched_fn: Callable[..., np.ndarray] | None = None,
) -> float:
    """Two-sided p-value for "models A and B score the same" on the same n examples.

    delta = m(A) - m(B). Each resample draws the same rows for both models (pairing
    removes the example-to-example variance they share) and gives delta*_b. Centring the
    bootstrap distribution on the null (Efron & Tibshirani 1993, sec. 16.4):
    p = (1 + #{b : |delta*_b - delta| >= |delta|}) / (n_boot + 1);
    the +1s keep p > 0, as a finite resample cannot show p = 0.
    """
    arrays_a = [np.asarray(a) for a in arrays_a]
    arrays_b = [np.asarray(b) for b in arrays_b]
    k = len(arrays_a)
    if k != len(arrays_b):
        raise ValueError("models A and B must give the same number of arrays")
    _n_rows(arrays_a + arrays_b)

    def delta(*arrays: np.ndarray) -> float:
        return metric_fn(*arrays[:k]) - metric_fn(*arrays[k:])

    def delta_rows(*arrays: np.ndarray) -> np.ndarray:
        return batched_fn(*arrays[:k]) - batched_fn(*arrays[k:])

    observed = delta(*arrays_a, *arrays_b)
    stats = _bootstrap_stats(
        delta, arrays_a + arrays_b, n_boot, seed, delta_rows if batched_fn else None
    )
    stats = stats[~np.isnan(stats)]
    extreme = np.count_nonzero(np.abs(stats - observed) >= abs(observed))
    return float((1 + extreme) / (stats.size + 1))


def mcnemar_pvalue(correct_a: Any, correct_b: Any) -> float:
    """Exact (binomial) two-sided McNemar test on per-example 0/1 outcomes of A and B.

    Only discordant examples carry information: b = #(A right, B wrong), c = #(A wrong,
    B right). Under H0 each is equally likely, so b ~ Binomial(b + c, 1/2) and
    p = min(1, 2 * P(X <= min(b, c))) (``scipy.stats.binomtest``, exact for any count,
    so no chi-square approximation is needed). p = 1 when there are no discordant pairs.
    Outcomes must be 0/1: resolve pairwise ties (scored 0.5) before calling.
    """
    a = np.asarray(correct_a)
    b = np.asarray(correct_b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"expected two 1-D outcome arrays of equal length, got {a.shape}, {b.shape}"
        )
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("McNemar needs 0/1 (or boolean) outcomes")
    a, b = a.astype(bool), b.astype(bool)
    only_a = int(np.count_nonzero(a & ~b))
    only_b = int(np.count_nonzero(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One registered metric: which task it belongs to and how to compute it.

    ``fn`` takes the arrays named in ``inputs`` (1-D, one row per example) and returns a
    float; ``batched_fn`` takes blocks of resamples of the same arrays ([b, n]) and returns
    b values, which makes the bootstrap fast.
    """

    name: str
    task: Task
    inputs: tuple[str, ...]
    fn: Callable[..., float]
    batched_fn: Callable[..., np.ndarray]
    description: str


def _mean_rows(per_example: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    return lambda *arrays: per_example(*arrays).mean(axis=-1)


def _selection_metrics() -> list[Metric]:
    metrics = []
    for k in (1, 5, 10):
        metrics.append(
            Metric(
                f"hr@{k}",
                "selection",
                ("ranks",),
                partial(hit_ratio_at_k, k=k),
                _mean_rows(lambda r, k=k: r <= k),
                f"share of targets ranked in the top {k} by likelihood",
            )
        )
    for k in (5, 10):
        metrics.append(
            Metric(
                f"ndcg@{k}",
                "selection",
                ("ranks",),
                partial(ndcg_at_k, k=k),
                _mean_rows(partial(_ndcg_gain, k=k)),
                f"NDCG@{k} with one relevant item",
            )
        )
    metrics.append(
        Metric(
            "mrr",
            "selection",
            ("ranks",),
            mrr,
            _mean_rows(lambda r: 1.0 / r),
            "mean reciprocal rank of the target",
        )
    )
    return metrics


_REGISTERED = [
    Metric(
        "pairwise_accuracy",
        "pairwise",
        ("chosen", "rejected"),
        pairwise_accuracy,
        _mean_rows(_pairwise_wins),
        "share of pairs preferring the positive-first ordering (ties 1/2)",
    ),
    Metric(
        "dmpo_auc",
        "pairwise",
        ("chosen", "rejected"),
        dmpo_auc,
        _dmpo_auc_rows,
        "ROC-AUC by the DMPO auc.ipynb protocol (one random pick per pair, seed 42)",
    ),
    Metric(
        "candidate_roc_auc",
        "pairwise",
        ("chosen", "rejected"),
        candidate_roc_auc,
        _candidate_roc_auc_rows,
        "ROC-AUC over all 2n candidates scored by +-(chosen - rejected)",
    ),
    *_selection_metrics(),
    Metric(
        "valid_ratio",
        "generation",
        ("valid",),
        valid_ratio,
        _mean_rows(lambda v: v),
        "share of answers naming exactly one candidate (S-DPO ValidRatio)",
    ),
    Metric(
        "gen_hr@1",
        "generation",
        ("hit",),
        hit_ratio_at_1,
        _mean_rows(lambda h: h),
        "hits over all examples (S-DPO HitRatio@1)",
    ),
    Metric(
        "gen_hr@1_of_valid",
        "generation",
        ("valid", "hit"),
        hit_ratio_at_1_of_valid,
        _of_valid_rows,
        "hits over valid answers (LLaRA's HitRatio@1)",
    ),
]

METRICS: dict[str, Metric] = {m.name: m for m in _REGISTERED}

TASK_INPUTS: dict[str, str] = {
    "pairwise": "chosen, rejected",
    "selection": "ranks, or scores and target_index",
    "generation": "valid and hit, or generated_texts, candidates_lists and targets "
    "(optional protocol)",
}


def _task_arrays(task: str, arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    """Derive the arrays the task's metrics take from what the caller passed."""
    given = set(arrays)
    if task == "pairwise" and given == {"chosen", "rejected"}:
        chosen, rejected = _paired_scores(arrays["chosen"], arrays["rejected"])
        return {"chosen": chosen, "rejected": rejected}
    if task == "selection" and given == {"ranks"}:
        return {"ranks": _ranks_1d(arrays["ranks"])}
    if task == "selection" and given == {"scores", "target_index"}:
        return {"ranks": target_ranks(arrays["scores"], arrays["target_index"])}
    if task == "generation" and given == {"valid", "hit"}:
        valid, hit = _flags_1d(arrays["valid"], arrays["hit"])
        return {"valid": valid, "hit": hit}
    if task == "generation" and given - {"protocol"} == {
        "generated_texts",
        "candidates_lists",
        "targets",
    }:
        valid, hit = selection_validity(**arrays)
        return {"valid": valid, "hit": hit}
    if task not in TASK_INPUTS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_INPUTS)}")
    raise TypeError(
        f"task {task!r} takes {TASK_INPUTS[task]}; got {', '.join(sorted(given)) or 'nothing'}"
    )


def compute_all(
    task: Task,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    **arrays: Any,
) -> dict[str, MetricValue]:
    """Every registered metric of ``task``, each with its bootstrap interval and n.

    ``compute_all("pairwise", chosen=c, rejected=r)``,
    ``compute_all("selection", scores=s, target_index=t)`` (or ``ranks=``),
    ``compute_all("generation", generated_texts=g, candidates_lists=c, targets=t)``
    (or ``valid=``, ``hit=``). All metrics share the bootstrap seed, hence the resamples.
    """
    inputs = _task_arrays(task, arrays)
    return {
        m.name: evaluate_metric(
            m.name,
            m.fn,
            *(inputs[name] for name in m.inputs),
            n_boot=n_boot,
            seed=seed,
            alpha=alpha,
            batched_fn=m.batched_fn,
        )
        for m in METRICS.values()
        if m.task == task
    }
