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
