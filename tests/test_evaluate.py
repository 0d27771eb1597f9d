"""Evaluation orchestration on a tiny random model: outputs, recomputability, resume."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from prefrec import evaluate as ev
from prefrec.data.formats import load_examples
from prefrec.errors import PrefrecError
from prefrec.metrics import pairwise_accuracy


def _settings(task: str, n: int, limit: int | None, modes=("likelihood",)) -> ev.EvalSettings:
    return ev.EvalSettings(
        data="test", model="tiny", adapters=[], template="alpaca", limit=limit, seed=0,
        n_examples=n, task=task, modes=list(modes), max_new_tokens=4,
    )


@pytest.fixture(scope="module")
def ml1m_eval(shared_data):
    return load_examples(shared_data / "dmpo" / "rec_data_ml_1m_eval_ranking.json")


def test_subset_is_seeded_sorted_and_complete_without_limit():
    a = ev.subset_indices(1000, 10, seed=1)
    assert a == ev.subset_indices(1000, 10, seed=1) and a == sorted(a) and len(set(a)) == 10
    assert a != ev.subset_indices(1000, 10, seed=2)
    assert ev.subset_indices(5, None, 0) == [0, 1, 2, 3, 4]


def test_pairwise_eval_writes_recomputable_metrics(tiny_llama, ml1m_eval, tmp_path):
    model, tok = tiny_llama
    result = ev.evaluate(model, tok, ml1m_eval, tmp_path, _settings("pairwise", 1000, 12),
                         batch_size=4, n_boot=200)
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    chosen = np.array([r["chosen_logp"] for r in rows])
    rejected = np.array([r["rejected_logp"] for r in rows])
    m = result["metrics"]
    assert m["pairwise_accuracy"]["value"] == pytest.approx(pairwise_accuracy(chosen, rejected))
    assert m["pairwise_accuracy"]["n"] == 12
    first = sum(r["positive_first"] for r in rows)
    assert m["pairwise_accuracy_positive_listed_first"]["n"] == first
    assert m["pairwise_accuracy_positive_listed_second"]["n"] == 12 - first
    assert {"dmpo_auc", "candidate_roc_auc"} <= m.keys()
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == m
    assert "| pairwise_accuracy |" in (tmp_path / "metrics.md").read_text()


def test_eval_resumes_from_its_per_example_file(tiny_llama, ml1m_eval, tmp_path, monkeypatch):
    model, tok = tiny_llama
    settings = _settings("pairwise", 1000, 8)
    full = ev.evaluate(model, tok, ml1m_eval, tmp_path / "full", settings, batch_size=4, n_boot=50)

    # A killed run: 3 complete rows and a torn fourth line.
    part = tmp_path / "part"
    part.mkdir()
    lines = (tmp_path / "full" / "scores.jsonl").read_text().splitlines()
    (part / "scores.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:15])
    (part / "eval_config.json").write_text(json.dumps(asdict(settings)))

    import prefrec.scoring as scoring

    scored = []
    real = scoring.score_completions

    def counting(model, tokenizer, prompts, completions, **kw):
        scored.extend(kw["group_ids"])
        return real(model, tokenizer, prompts, completions, **kw)

    monkeypatch.setattr(scoring, "score_completions", counting)
    resumed = ev.evaluate(model, tok, ml1m_eval, part, settings, batch_size=4, n_boot=50)
    assert len(set(scored)) == 5  # only the 5 missing examples were scored again
    for name, value in full["metrics"].items():
        assert resumed["metrics"][name]["value"] == pytest.approx(value["value"], abs=1e-6)


def test_resume_with_other_settings_is_refused(tiny_llama, ml1m_eval, tmp_path):
    model, tok = tiny_llama
    ev.evaluate(model, tok, ml1m_eval, tmp_path, _settings("pairwise", 1000, 2), n_boot=10)
    with pytest.raises(PrefrecError, match="other settings"):
        ev.evaluate(model, tok, ml1m_eval, tmp_path, _settings("pairwise", 1000, 3), n_boot=10)


def test_selection_eval_likelihood_and_generation(tiny_llama, shared_data, tmp_path):
    model, tok = tiny_llama
    examples = load_examples(shared_data / "sdpo-lastfm" / "lastfm-val.json")
    settings = _settings("selection", len(examples), 3, modes=("likelihood", "generate"))
    result = ev.evaluate(model, tok, examples, tmp_path, settings, batch_size=2, n_boot=20)
    m = result["metrics"]
    for name in ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr", "valid_ratio", "gen_hr@1"):
        assert m[name]["n"] == 3, name
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert all(len(r["logps"]) == 20 for r in rows)
    # HR@10 can never be below HR@1: both come from the same ranks.
    assert m["hr@10"]["value"] >= m["hr@1"]["value"]
    gens = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert len(gens) == 3 and all("generated" in json.loads(g) for g in gens)


# --------------------------------------------------------------------------- position bias


def _rows(first: list[bool], chosen, rejected, chosen_sw=None, rejected_sw=None) -> list[dict]:
    rows = []
    for i, f in enumerate(first):
        row = {"index": i, "user": "u", "positive_first": f, "chosen_logp": chosen[i],
               "rejected_logp": rejected[i], "chosen_tokens": 4, "rejected_tokens": 4}
        if chosen_sw is not None:
            row["chosen_logp_swapped"] = chosen_sw[i]
            row["rejected_logp_swapped"] = rejected_sw[i]
        rows.append(row)
    return rows


def test_listed_first_preference_and_both_orders_by_hand():
    # A pure copier: +1 nat for the completion that keeps the prompt's order, plus a small
    # real preference (+0.25) for the positive. Positive listed first in 3 of 4 pairs.
    first = [True, True, True, False]
    copy = np.where(first, 1.0, -1.0)
    chosen = -10 + copy + 0.25
    rejected = -10 - copy
    m = ev.pairwise_metrics(_rows(first, chosen, rejected), n_boot=50, seed=0)
    assert m["listed_first_preference"].value == 1.0
    assert m["pairwise_accuracy"].value == 0.75  # right only where the positive came first
    assert "pairwise_accuracy_given_order" not in m
    # The swapped prompt lists the other title first: the copy bonus flips sign.
    both = ev.pairwise_metrics(
        _rows(first, chosen, rejected, -10 - copy + 0.25, -10 + copy), n_boot=50, seed=0
    )
    assert both["pairwise_accuracy"].value == 1.0  # the bias cancels, the preference stays
    assert both["pairwise_accuracy_given_order"].value == 0.75
    assert both["listed_first_preference"].value == 1.0  # measured on the given order


def test_both_orders_eval_scores_the_swapped_prompt(tiny_llama, ml1m_eval, tmp_path):
    from prefrec.data.dmpo import swap_candidate_order

    model, tok = tiny_llama
    both = ev.evaluate(model, tok, ml1m_eval, tmp_path / "both",
                       ev.EvalSettings(**{**asdict(_settings("pairwise", 1000, 6)),
                                          "orders": "both"}),
                       batch_size=4, n_boot=50)
    rows = [json.loads(x) for x in (tmp_path / "both" / "scores.jsonl").read_text().splitlines()]
    swapped = [swap_candidate_order(ex) for ex in ml1m_eval]
    ev.evaluate(model, tok, swapped, tmp_path / "swapped", _settings("pairwise", 1000, 6),
                batch_size=4, n_boot=50)
    alone = [json.loads(x) for x in (tmp_path / "swapped" / "scores.jsonl").read_text().splitlines()]
    for r, s in zip(rows, alone, strict=True):
        assert r["index"] == s["index"] and r["positive_first"] != s["positive_first"]
        assert r["chosen_logp_swapped"] == pytest.approx(s["chosen_logp"], abs=1e-4)
        assert r["rejected_logp_swapped"] == pytest.approx(s["rejected_logp"], abs=1e-4)
    summed = pairwise_accuracy(
        np.array([r["chosen_logp"] + r["chosen_logp_swapped"] for r in rows]),
        np.array([r["rejected_logp"] + r["rejected_logp_swapped"] for r in rows]),
    )
    assert both["metrics"]["pairwise_accuracy"]["value"] == pytest.approx(summed)


def test_settings_written_before_dtype_and_orders_still_match():
    new = _settings("pairwise", 1000, 8)
    legacy = {k: v for k, v in asdict(new).items() if k not in ("dtype", "orders")}
    assert ev.same_settings(legacy, new)
    assert not ev.same_settings(legacy, ev.EvalSettings(**{**asdict(new), "dtype": "bfloat16"}))
    assert not ev.same_settings(legacy, ev.EvalSettings(**{**asdict(new), "orders": "both"}))
    assert not ev.same_settings(None, new)


def test_both_orders_is_refused_for_selection_data(shared_data, tmp_path):
    with pytest.raises(PrefrecError, match="pairwise data only"):
        ev.run_eval(str(shared_data / "sdpo-lastfm" / "lastfm-val.json"), tmp_path,
                    orders="both", limit=2)


# --------------------------------------------------------------------------- position bias


def test_position_bias_warning_flags_only_values_outside_the_bounds():
    def metrics(value):
        return {"listed_first_preference": {"value": value}}

    copier = ev.position_bias_warning(metrics(1.0))
    assert "1.000" in copier and "listed-first title" in copier
    assert "listed-second title" in ev.position_bias_warning(metrics(0.2))
    for fine in (0.35, 0.5, 0.65):
        assert ev.position_bias_warning(metrics(fine)) is None
    assert ev.position_bias_warning({}) is None  # selection data has no such metric
    assert ev.position_bias_warning(metrics(None)) is None


@pytest.mark.parametrize("bounds, warned", [((2.0, 3.0), True), ((0.0, 1.0), False)])
def test_eval_writes_the_position_bias_warning_to_log_json_and_markdown(
    tiny_llama, ml1m_eval, tmp_path, monkeypatch, caplog, bounds, warned
):
    # Bounds that every (or no) value breaks make the outcome independent of the random model.
    monkeypatch.setattr(ev, "POSITION_BIAS_BOUNDS", bounds)
    model, tok = tiny_llama
    with caplog.at_level("WARNING", logger="prefrec.evaluate"):
        result = ev.evaluate(model, tok, ml1m_eval, tmp_path, _settings("pairwise", 1000, 4),
                             batch_size=4, n_boot=20)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["warnings"] == result["warnings"]
    assert bool(saved["warnings"]) is warned
    assert ("WARNING: degenerate ranking" in (tmp_path / "metrics.md").read_text()) is warned
    assert any("degenerate ranking" in r.getMessage() for r in caplog.records) is warned


def test_report_tables_mark_degenerate_models():
    from prefrec.report import degenerate_models, results_table

    def entry(listed_first):
        metric = {"value": 0.6, "ci_low": 0.5, "ci_high": 0.7, "n": 60}
        bias = {"value": listed_first, "ci_low": listed_first, "ci_high": listed_first, "n": 60}
        return {"kind": "llm", "wall_time_s": 1.0,
                "metrics": {"pairwise_accuracy": metric, "listed_first_preference": bias}}

    models = {"sft": entry(1.0), "dmpo-k3": entry(0.52)}
    header, rows = results_table(models, "pairwise")
    column = header.index("listed-1st pref.")
    assert rows[0][column].endswith("⚠ degenerate") and "1.000" in rows[0][column]
    assert "⚠" not in rows[1][column]
    [line] = degenerate_models(models)
    assert line.startswith("sft: degenerate ranking")


def test_eval_states_a_cut_past_the_context_and_refuses_what_cannot_fit(
    tiny_llama, tmp_path, caplog
):
    from prefrec.data.prompts import DOMAINS, pairwise_completion, pairwise_instruction
    from prefrec.data.schema import PairwiseExample
    from prefrec.errors import DataError

    def example(history, first="Heat (1995)", second="Big (1988)"):
        return PairwiseExample(
            tuple(history), (first, second), 0,
            pairwise_instruction(history, first, second, DOMAINS["movie"]),
            pairwise_completion(first, second), pairwise_completion(second, first), "u")

    model, tok = tiny_llama  # max_position_embeddings = 1024
    long_history = [f"Movie number {i} (19{i % 100:02d})" for i in range(300)]
    examples = [example(["Toy Story (1995)"]), example(long_history)]
    with caplog.at_level("WARNING", logger="prefrec.data.lengths"):
        result = ev.evaluate(model, tok, examples, tmp_path / "cut",
                             _settings("pairwise", 2, None), batch_size=2, n_boot=10)
    assert result["metrics"]["pairwise_accuracy"]["n"] == 2  # scored, not dropped
    assert any("1 of 2 records are longer than the model's context of 1024" in r.getMessage()
               for r in caplog.records)
    huge = example(["Toy Story (1995)"], first="Heat " * 2000)
    with pytest.raises(DataError, match="record 1.*leaving no room for the prompt"):
        ev.evaluate(model, tok, [examples[0], huge], tmp_path / "unfit",
                    _settings("pairwise", 2, None), batch_size=2, n_boot=10)


def test_wall_time_of_a_killed_invocation_counts_after_resume(tiny_llama, ml1m_eval, tmp_path,
                                                              monkeypatch):
    """The clock is saved while rows are written, so the time spent on rows a killed run left
    on disk is in the resumed evaluation's wall_time_s."""
    import prefrec.scoring as scoring

    model, tok = tiny_llama
    now = [0.0]

    def fake_clock() -> float:  # every reading is 100 s after the one before
        now[0] += 100.0
        return now[0]

    monkeypatch.setattr(ev.time, "perf_counter", fake_clock)
    real = scoring.score_completions
    calls = []

    def killed_after_two_batches(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_completions", killed_after_two_batches)
    settings = _settings("pairwise", 1000, 12)
    with pytest.raises(RuntimeError, match="killed"):
        ev.evaluate(model, tok, ml1m_eval, tmp_path, settings, batch_size=4, n_boot=50)
    saved = json.loads((tmp_path / "eval_time.json").read_text())["wall_time_s"]
    assert saved >= 200.0  # two finished batches' worth of the first invocation
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 8

    monkeypatch.setattr(scoring, "score_completions", real)
    result = ev.evaluate(model, tok, ml1m_eval, tmp_path, settings, batch_size=4, n_boot=50)
    assert result["wall_time_s"] > saved
    assert result["metrics"]["pairwise_accuracy"]["n"] == 12
