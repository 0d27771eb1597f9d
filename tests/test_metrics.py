"""Metrics against hand-computed values, ties included, plus bootstrap and significance."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from prefrec import metrics as M

# --------------------------------------------------------------------------------------
# Pairwise ranking
# --------------------------------------------------------------------------------------


def test_pairwise_accuracy_counts_ties_as_half():
    # wins, loss, tie, tie -> (1 + 1 + 0 + 0.5 + 0.5) / 5
    chosen = [-1.0, -2.0, -5.0, -3.0, -4.0]
    rejected = [-2.0, -3.0, -1.0, -3.0, -4.0]
    assert M.pairwise_accuracy(chosen, rejected) == pytest.approx(3 / 5)


def test_pairwise_accuracy_all_equal_is_chance():
    assert M.pairwise_accuracy([-2.0] * 4, [-2.0] * 4) == 0.5


def test_pairwise_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        M.pairwise_accuracy([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        M.pairwise_accuracy([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="no pairs"):
        M.pairwise_accuracy([], [])


def test_candidate_roc_auc_by_hand_with_tie():
    # margins d = [2, 0]: positives score {2, 0}, negatives {-2, 0}.
    # (2 vs -2) 1, (2 vs 0) 1, (0 vs -2) 1, (0 vs 0) tie 1/2 -> 3.5 / 4.
    chosen = np.array([-1.0, -3.0])
    rejected = np.array([-3.0, -3.0])
    assert M.candidate_roc_auc(chosen, rejected) == pytest.approx(0.875)
    # ...while the per-pair view only sees (2 > -2) and (0 vs 0): (1 + 0.5) / 2.
    assert M.pairwise_accuracy(chosen, rejected) == pytest.approx(0.75)


def test_candidate_roc_auc_symmetric_margins_is_chance():
    # d = [1, 0, -1]: the positive and negative score multisets coincide.
    assert M.candidate_roc_auc([1.0, 0.0, -1.0], [0.0, 0.0, 0.0]) == pytest.approx(0.5)


def test_dmpo_auc_by_hand():
    # Python's random after seed(42) starts 0.639, 0.025, 0.275, 0.223, ... so the
    # notebook keeps: pair 0 rejected (label 0), pairs 1-3 chosen (label 1).
    chosen = [9.0, 3.0, 1.0, 2.0]
    rejected = [2.0, 5.0, 5.0, 5.0]
    # kept: negative {2}, positives {3, 1, 2}: 3 > 2 (1), 1 < 2 (0), 2 = 2 (1/2) -> 1.5 / 3
    assert M.dmpo_auc(chosen, rejected, seed=42) == pytest.approx(0.5)
    # The pick pattern does not depend on the values: flip which side is kept.
    assert M.dmpo_auc([0.0, 3.0, 4.0, 5.0], [9.0, 0.0, 0.0, 0.0]) == pytest.approx(0.0)


def test_dmpo_auc_single_class_is_nan():
    # the first draw after seed(42) is 0.639 >= 0.5: only a label-0 point is kept.
    assert math.isnan(M.dmpo_auc([1.0], [0.0], seed=42))


def test_dmpo_auc_is_deterministic_and_seed_dependent():
    rng = np.random.default_rng(1)
    chosen, rejected = rng.normal(size=60), rng.normal(size=60)
    assert M.dmpo_auc(chosen, rejected, seed=42) == M.dmpo_auc(chosen, rejected, seed=42)
    values = {M.dmpo_auc(chosen, rejected, seed=s) for s in range(10)}
    assert len(values) > 1


def test_rank_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(5, 30)).astype(float)  # many ties
    positive = rng.random(30) < 0.4
    expected = [roc_auc_score(positive, row) for row in scores]
    np.testing.assert_allclose(M._auc_rows(scores, positive), expected)


@pytest.mark.parametrize("name", ["pairwise_accuracy", "dmpo_auc", "candidate_roc_auc"])
def test_batched_pairwise_metrics_match_loop(name):
    rng = np.random.default_rng(3)
    chosen = rng.integers(0, 5, 40).astype(float)  # ties on purpose
    rejected = rng.integers(0, 5, 40).astype(float)
    metric = M.METRICS[name]
    loop = M.bootstrap_ci(metric.fn, chosen, rejected, n_boot=50, seed=5)
    batched = M.bootstrap_ci(
        metric.fn, chosen, rejected, n_boot=50, seed=5, batched_fn=metric.batched_fn
    )
    assert batched == pytest.approx(loop)


# --------------------------------------------------------------------------------------
# Candidate selection
# --------------------------------------------------------------------------------------


def test_target_ranks_pessimistic_ties():
    scores = np.array(
        [
            [0.5, 0.9, 0.5, 0.1],  # target 0: beaten by 0.9, tied with 0.5 -> rank 3
            [1.0, 1.0, 1.0, 1.0],  # all equal -> last, rank 4
            [0.1, 0.2, 0.3, 0.4],  # target 3 is the best -> rank 1
            [-np.inf, 0.0, -np.inf, -np.inf],  # target 1 alone on top -> rank 1
        ]
    )
    ranks = M.target_ranks(scores, np.array([0, 0, 3, 1]))
    np.testing.assert_array_equal(ranks, [3, 4, 1, 1])


def test_target_ranks_rejects_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        M.target_ranks(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        M.target_ranks(np.array([[np.nan, 0.0]]), np.array([1]))
    with pytest.raises(ValueError, match="integers"):
        M.target_ranks(np.zeros((1, 3)), np.array([0.0]))


def test_ranking_metrics_by_hand():
    ranks = np.array([1, 2, 5, 11])
    assert M.hit_ratio_at_k(ranks, 1) == 0.25
    assert M.hit_ratio_at_k(ranks, 5) == 0.75
    assert M.hit_ratio_at_k(ranks, 10) == 0.75
    # NDCG@5: 1/log2(2) + 1/log2(3) + 1/log2(6) + 0, over 4
    assert M.ndcg_at_k(ranks, 5) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert M.ndcg_at_k(ranks, 1) == 0.25
    assert M.mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 11) / 4)


def test_compute_all_selection_from_scores_all_ties_looks_bad():
    scores = np.zeros((20, 20))
    out = M.compute_all("selection", scores=scores, target_index=np.arange(20), n_boot=50)
    assert set(out) == {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"}
    assert out["hr@10"].value == 0.0
    assert out["mrr"].value == pytest.approx(1 / 20)
    assert all(v.n == 20 for v in out.values())


# --------------------------------------------------------------------------------------
# Generation (S-DPO's ValidRatio / HitRatio@1)
# --------------------------------------------------------------------------------------

CANDIDATES = ["Heat", "Toy Story", "Alien"]


def test_selection_validity_sdpo():
    texts = [
        "I recommend Heat.",  # exactly one, the target -> valid, hit
        "Toy Story",  # exactly one, not the target -> valid, miss
        "Heat or Alien",  # two candidates -> invalid
        "Something else",  # none -> invalid
        "heat",  # S-DPO is case-sensitive -> none -> invalid
    ]
    valid, hit = M.selection_validity(texts, [CANDIDATES] * 5, ["Heat"] * 5)
    np.testing.assert_array_equal(valid, [True, True, False, False, False])
    np.testing.assert_array_equal(hit, [True, False, False, False, False])
    assert M.valid_ratio(valid) == pytest.approx(2 / 5)
    assert M.hit_ratio_at_1(hit) == pytest.approx(1 / 5)  # over ALL examples
    assert M.hit_ratio_at_1_of_valid(valid, hit) == pytest.approx(1 / 2)


def test_selection_validity_substring_quirk_kept():
    # "Alien" is a substring of "Aliens": S-DPO counts two candidates -> invalid.
    valid, hit = M.selection_validity(["Aliens"], [["Alien", "Aliens"]], ["Aliens"])
    assert not valid[0] and not hit[0]


def test_selection_validity_llara_protocol():
    texts = ["heat", "Heat\nAlien", "Toy Story"]
    valid, hit = M.selection_validity(texts, [CANDIDATES] * 3, ["Heat"] * 3, protocol="llara")
    np.testing.assert_array_equal(valid, [True, True, True])  # lower-cased, first line only
    np.testing.assert_array_equal(hit, [True, True, False])
    valid, _ = M.selection_validity(texts, [CANDIDATES] * 3, ["Heat"] * 3, protocol="sdpo")
    np.testing.assert_array_equal(valid, [False, False, True])


def test_selection_validity_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        M.selection_validity(["a"], [CANDIDATES, CANDIDATES], ["Heat"])


def test_compute_all_generation_from_texts():
    out = M.compute_all(
        "generation",
        generated_texts=["Heat", "Alien", "Heat Alien", "none"],
        candidates_lists=[CANDIDATES] * 4,
        targets=["Heat"] * 4,
        n_boot=100,
    )
    assert out["valid_ratio"].value == 0.5
    assert out["gen_hr@1"].value == 0.25
    assert out["gen_hr@1_of_valid"].value == 0.5
    assert M.hit_ratio_at_1_of_valid([False, False], [False, False]) == 0.0


# --------------------------------------------------------------------------------------
# Bootstrap, significance, registry
# --------------------------------------------------------------------------------------


def _pairs(n, p_correct, seed):
    rng = np.random.default_rng(seed)
    chosen = rng.normal(size=n)
    rejected = chosen + np.where(rng.random(n) < p_correct, -1.0, 1.0)
    return chosen, rejected


def test_bootstrap_is_deterministic_and_contains_estimate():
    chosen, rejected = _pairs(200, 0.6, seed=0)
    a = M.compute_all("pairwise", chosen=chosen, rejected=rejected, n_boot=200, seed=7)
    b = M.compute_all("pairwise", chosen=chosen, rejected=rejected, n_boot=200, seed=7)
    assert a == b
    c = M.compute_all("pairwise", chosen=chosen, rejected=rejected, n_boot=200, seed=8)
    assert c["pairwise_accuracy"] != a["pairwise_accuracy"]
    for v in a.values():
        assert v.ci_low <= v.value <= v.ci_high
        assert v.n == 200


def test_bootstrap_ci_narrows_with_more_data():
    small = M.evaluate_metric("acc", M.pairwise_accuracy, *_pairs(100, 0.6, 1), n_boot=300)
    large = M.evaluate_metric("acc", M.pairwise_accuracy, *_pairs(4000, 0.6, 1), n_boot=300)
    assert (large.ci_high - large.ci_low) < 0.5 * (small.ci_high - small.ci_low)


def test_bootstrap_ci_of_known_proportion():
    # 30 of 100 correct: the 95% interval of a proportion is about 0.30 +- 0.09.
    low, high = M.bootstrap_ci(M.hit_ratio_at_1, np.arange(100) < 30, n_boot=2000, seed=0)
    assert 0.19 < low < 0.23 and 0.37 < high < 0.40


def test_metric_value_format_and_dict():
    v = M.MetricValue("acc", 0.5123, 0.4811, 0.5436, 1000)
    assert v.fmt() == "0.512 [0.481, 0.544] n=1000"
    assert v.to_dict() == {
        "name": "acc",
        "value": 0.5123,
        "ci_low": 0.4811,
        "ci_high": 0.5436,
        "n": 1000,
    }
    undefined = M.MetricValue("auc", math.nan, math.nan, math.nan, 1).to_dict()
    assert json.loads(json.dumps(undefined))["value"] is None


def test_mcnemar_by_hand():
    # A right / B wrong on 5 examples, the reverse on 1, 4 concordant.
    # b + c = 6, min = 1: p = 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7 / 64.
    a = np.array([1, 1, 1, 1, 1, 0, 1, 1, 0, 0])
    b = np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
    assert M.mcnemar_pvalue(a, b) == pytest.approx(14 / 64)
    assert M.mcnemar_pvalue(b, a) == pytest.approx(14 / 64)
    assert M.mcnemar_pvalue(a, a) == 1.0
    with pytest.raises(ValueError, match="0/1"):
        M.mcnemar_pvalue([0.5, 1], [1, 1])


def test_paired_bootstrap_pvalue():
    chosen, rejected = _pairs(300, 0.5, seed=2)
    metric = M.METRICS["pairwise_accuracy"]
    same = M.paired_bootstrap_pvalue(
        metric.fn, (chosen, rejected), (chosen, rejected), n_boot=200, batched_fn=metric.batched_fn
    )
    assert same == 1.0
    better = (chosen, chosen - 1.0)  # always right
    p = M.paired_bootstrap_pvalue(
        metric.fn, better, (chosen, rejected), n_boot=200, batched_fn=metric.batched_fn
    )
    assert p == pytest.approx(1 / 201)
    p_loop = M.paired_bootstrap_pvalue(metric.fn, better, (chosen, rejected), n_boot=200)
    assert p_loop == p


def test_registry_tasks_and_bad_inputs():
    tasks = {m.task for m in M.METRICS.values()}
    assert tasks == {"pairwise", "selection", "generation"}
    with pytest.raises(TypeError, match="takes chosen, rejected"):
        M.compute_all("pairwise", chosen=[1.0], wrong=[0.0])
    with pytest.raises(ValueError, match="unknown task"):
        M.compute_all("ranking", ranks=[1])
