"""The experiment runner and its report: config handling, stages, resume, significance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from prefrec.cli import main as cli_main
from prefrec.errors import PrefrecError
from prefrec.report import compare, cross_significance, model_entry
from prefrec.runner import experiments, load_config, parse_override, run
from prefrec.study import load_study, variant_config

pytestmark = pytest.mark.usefixtures("single_thread")


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _tiny_config(tiny_dir: Path, shared_data: Path, out: Path) -> dict:
    return {
        "name": "tiny",
        "out": str(out),
        "model": str(tiny_dir),
        "dtype": "float32",
        "device": "cpu",
        "data_dir": str(shared_data),
        "experiments": [{"name": "ml1m", "sft": "ml1m-sft", "preference": "ml1m-dpo-{k}",
                         "eval": "ml1m-eval", "audit": ["ml1m-sft", "ml1m-eval"]}],
        "sft": {"limit": 4, "max_steps": 2, "batch_size": 2, "lora_r": 4, "lora_alpha": 8,
                "save_steps": 100},
        "align": {"losses": ["dmpo", "dpo"], "negatives": [1, 2], "limit": 4, "max_steps": 2,
                  "batch_size": 2, "lora_r": 4, "lora_alpha": 8, "save_steps": 100},
        "eval": {"limit": 12, "batch_size": 4, "n_boot": 200, "orders": "both"},
        "significance": {"n_boot": 200},
    }


# --------------------------------------------------------------------------- config


def test_overrides_parse_yaml_values_into_nested_keys(tmp_path, tiny_dir, shared_data):
    assert parse_override("eval.limit=100") == (["eval", "limit"], 100)
    assert parse_override("align.losses=[dpo, sdpo]") == (["align", "losses"], ["dpo", "sdpo"])
    assert parse_override("sft.limit=null") == (["sft", "limit"], None)
    path = _write(tmp_path / "c.yaml", _tiny_config(tiny_dir, shared_data, tmp_path / "o"))
    config = load_config(path, ["eval.limit=3", "align.losses=sdpo", "name=other"])
    assert config["eval"]["limit"] == 3
    assert config["eval"]["seed"] == 0  # defaults (those of prefrec eval) fill the rest
    assert config["align"]["losses"] == ["sdpo"]  # a scalar becomes a one-item list
    assert config["name"] == "other"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sft": {"lerning_rate": 1}}, r"unknown key\(s\) lerning_rate in sft"),
        ({"align": {"losses": ["ipo"]}}, r"align.losses has \['ipo'\]"),
        ({"evaluation": {}}, r"unknown key\(s\) evaluation in the top level"),
        ({"experiments": []}, "no experiments"),
        ({"experiments": [{"name": "a", "eval": "x", "cross_eval": ["b"]}]},
         "cross_eval names 'b', which is not an experiment"),
        ({"experiments": [{"name": "a", "eval": "x"}, {"name": "a", "eval": "y"}]},
         "duplicate experiment name 'a'"),
    ],
)
def test_bad_configs_are_one_line_errors_naming_the_file(tmp_path, tiny_dir, shared_data,
                                                         change, message):
    config = {**_tiny_config(tiny_dir, shared_data, tmp_path / "o"), **change}
    path = _write(tmp_path / "bad.yaml", config)
    with pytest.raises(PrefrecError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_bad_config_exits_2_without_traceback(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n", encoding="utf-8")
    assert cli_main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefrec: error: ") and "not valid YAML" in err
    assert "Traceback" not in err
    assert cli_main(["run", str(tmp_path / "missing.yaml")]) == 2


def test_shipped_configs_load(shared_data, tmp_path):
    """Every config in configs/ parses and names datasets that resolve (for configs that
    build their data, among the files the build writes)."""
    from prefrec.data.resolve import resolve_dataset
    from prefrec.runner import _build

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"quickstart.yaml", "ml100k-data-rich.yaml"}
    studies = [p for p in configs if "variants" in (yaml.safe_load(p.read_text()) or {})]
    assert [p.name for p in studies] == ["quality-study-h100.yaml", "quality-study.yaml"]
    for path in studies:  # every variant's overrides must name real settings
        study = load_study(path)
        for name in study["variants"]:
            assert variant_config(study, name)["name"] == name
    for path in set(configs) - set(studies):
        data_dir = shared_data
        config = load_config(path, [f"data_dir={data_dir}"])
        if config["build"]:
            data_dir = tmp_path / path.stem
            config = load_config(path, [f"data_dir={data_dir}"])
            _build(config)
        for exp in experiments(config):
            names = [exp.eval, exp.sft] if not exp.split else [exp.split["source"]]
            for k in (config["align"] or {}).get("negatives", []):
                if exp.preference and not exp.split:
                    names.append(exp.preference_data(k))
            for name in filter(None, names):
                assert resolve_dataset(name, data_dir=str(data_dir)).is_file()
        # Pairwise evaluation scores both listings (the bias of trained models cancels).
        pairwise = any("lastfm" not in str(exp.eval) for exp in experiments(config))
        assert config["eval"]["orders"] == ("both" if pairwise else "given"), path.name


# --------------------------------------------------------------------------- significance


def _pairwise_folder(path: Path, wins: list[bool]) -> Path:
    path.mkdir(parents=True)
    rows = [{"index": i, "chosen_logp": -1.0 if w else -2.0, "rejected_logp": -1.5}
            for i, w in enumerate(wins)]
    (path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_compare_gives_paired_pvalues_on_common_examples(tmp_path):
    a = _pairwise_folder(tmp_path / "a", [True] * 30)
    b = _pairwise_folder(tmp_path / "b", [False] * 30)
    row = compare(a, b, "pairwise", n_boot=500, seed=0)
    assert row["n"] == 30 and row["delta"] == pytest.approx(1.0)
    assert row["p_bootstrap"] == pytest.approx(1 / 501)  # no resample reaches |delta*-1|>=1
    assert row["p_mcnemar"] == pytest.approx(2 * 0.5**30)  # 30 discordant, all one way
    same = compare(a, a, "pairwise", n_boot=100, seed=0)
    assert same["delta"] == 0 and same["p_mcnemar"] == 1.0


def test_compare_ranks_both_order_rows_by_their_summed_scores(tmp_path):
    """Significance uses the scores the evaluation ranked by: with both candidate orders,
    a pair lost on the given order can be won on the sum."""
    a = _pairwise_folder(tmp_path / "a", [False] * 30)  # loses every pair on the given order
    rows = [json.loads(x) for x in (a / "scores.jsonl").read_text().splitlines()]
    for r in rows:
        r.update(chosen_logp_swapped=-1.0, rejected_logp_swapped=-2.0)  # sum: -3.0 vs -3.5
    (a / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = _pairwise_folder(tmp_path / "b", [False] * 30)
    row = compare(a, b, "pairwise", n_boot=100, seed=0)
    assert row["a"] == 1.0 and row["b"] == 0.0


def test_mcnemar_leaves_out_tied_pairs_that_accuracy_counts_as_half(tmp_path):
    a = _pairwise_folder(tmp_path / "a", [True] * 20)
    tied = tmp_path / "tied"
    tied.mkdir()
    rows = [{"index": i, "chosen_logp": 0.0, "rejected_logp": 0.0} for i in range(10)]
    rows += [{"index": i, "chosen_logp": -2.0, "rejected_logp": -1.5} for i in range(10, 20)]
    (tied / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    row = compare(a, tied, "pairwise", n_boot=100, seed=0)
    assert row["b"] == pytest.approx(0.25)  # ten ties at 0.5, ten losses
    assert row["n_mcnemar"] == 10 and row["p_mcnemar"] == pytest.approx(2 * 0.5**10)


def _scored(path: Path, wins: list[bool]) -> Path:
    """An evaluation folder: scores.jsonl and the metrics.json the report reads."""
    _pairwise_folder(path, wins)
    (path / "metrics.json").write_text(json.dumps({
        "settings": {"task": "pairwise"}, "wall_time_s": 1.0,
        "metrics": {"pairwise_accuracy": {"value": sum(wins) / len(wins)}}}))
    return path


def test_cross_significance_compares_on_the_other_sets_own_rows(tmp_path):
    """Models evaluated on another experiment's eval set are compared with that
    experiment's zero-shot model and best baseline, which scored the same examples."""
    n = 40
    entries = {
        ("test", "zero-shot"): [i % 2 == 0 for i in range(n)],       # 0.5
        ("test", "popularity"): [i % 4 != 0 for i in range(n)],     # 0.75
        ("test", "itemknn"): [i % 10 != 0 for i in range(n)],       # 0.9, the best baseline
        ("cross", "sft"): [i % 5 == 0 for i in range(n)],           # 0.2
        ("cross", "dmpo-k3"): [i % 5 != 0 for i in range(n)],       # 0.8, best preference
        ("cross", "dpo-k3"): [i % 3 == 0 for i in range(n)],
    }
    folders = {"zero-shot": "test/eval/zero-shot", "popularity": "test/baselines/popularity",
               "itemknn": "test/baselines/itemknn"}
    test_models, cross_models = {}, {}
    for (where, label), wins in entries.items():
        folder = _scored(tmp_path / folders.get(label, f"m/cross/test/{label}"), wins)
        kind = "baseline" if "baselines" in str(folder) else "llm"
        target = test_models if where == "test" else cross_models
        target[label] = model_entry(folder, kind, tmp_path)
    experiments = {"test": {"models": test_models}}
    rows = cross_significance({"test": cross_models}, experiments, tmp_path, 200, 0)["test"]
    assert [(r["model"], r["versus"]) for r in rows] == [
        ("dmpo-k3", "sft"), ("dmpo-k3", "zero-shot"), ("dmpo-k3", "itemknn")]
    assert [round(r["delta"], 3) for r in rows] == [0.6, 0.3, -0.1]
    assert all(r["n"] == n for r in rows)
    # No preference model on that set: nothing to compare.
    assert cross_significance({"test": {"sft": cross_models["sft"]}}, experiments,
                              tmp_path, 200, 0) == {}


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    path = _write(out.parent / "tiny.yaml", _tiny_config(tiny_dir, shared_data, out))
    assert cli_main(["run", str(path)]) == 0
    return path, out


def test_run_trains_and_evaluates_every_model_and_writes_the_report(tiny_run):
    _, out = tiny_run
    results = json.loads((out / "results.json").read_text())
    exp = results["experiments"]["ml1m"]
    assert exp["task"] == "pairwise"
    assert list(exp["models"]) == ["zero-shot", "sft", "dmpo-k1", "dpo-k1", "dmpo-k2", "dpo-k2"]
    # At K=1 DPO is DMPO: trained and scored once, reported as the same model.
    assert exp["models"]["dpo-k1"]["same_as"] == "dmpo-k1"
    assert exp["models"]["dpo-k1"]["dir"] == exp["models"]["dmpo-k1"]["dir"]
    assert not (out / "ml1m" / "dpo-k1").exists()
    assert "same_as" not in exp["models"]["dpo-k2"]
    for label, entry in exp["models"].items():
        assert entry["metrics"]["pairwise_accuracy"]["n"] == 12, label
    # every model scored the same 12 eval pairs
    indices = {label: sorted(json.loads(x)["index"] for x in
                             (out / e["dir"] / "scores.jsonl").read_text().splitlines())
               for label, e in exp["models"].items()}
    assert len({tuple(v) for v in indices.values()}) == 1
    # the preference stages sit on top of the SFT adapter
    lineage = json.loads((out / "ml1m" / "dmpo-k2" / "adapter" / "prefrec_adapter.json")
                         .read_text())
    assert str(out / "ml1m" / "sft" / "adapter") in json.dumps(lineage)
    # headline comparisons: best preference model vs SFT and vs zero-shot
    sig = exp["significance"]
    assert [r["versus"] for r in sig] == ["sft", "zero-shot"]
    assert all(0 < r["p_bootstrap"] <= 1 and 0 < r["p_mcnemar"] <= 1 for r in sig)
    assert set(exp["ablation"]["dmpo"]) == set(exp["ablation"]["dpo"]) == {"1", "2"}
    for name in ("ml1m_bars.png", "ml1m_curves.png", "ml1m_ablation.png"):
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| dmpo-k2 | llm |" in md and "figures/ml1m_bars.png" in md
    assert "| dpo-k1 (= dmpo-k1) | llm |" in md
    # both listings scored, the published one-listing protocol beside it
    assert "| model | kind | accuracy | acc (given order) |" in md
    assert md.count("Data audit") == 1 and "p (McNemar)" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # self-contained
    stages = [json.loads(x)["stage"] for x in (out / "stages.jsonl").read_text().splitlines()]
    assert stages == ["ml1m/audit", "ml1m/eval/zero-shot", "ml1m/sft", "ml1m/eval/sft",
                      "ml1m/dmpo-k1", "ml1m/eval/dmpo-k1", "ml1m/dmpo-k2", "ml1m/eval/dmpo-k2",
                      "ml1m/dpo-k2", "ml1m/eval/dpo-k2"]
    assert results["versions"]["torch"] == torch.__version__.split("+")[0] or \
        results["versions"]["torch"].startswith(torch.__version__.split("+")[0])


def test_rerun_skips_finished_stages_and_redoes_only_what_is_missing(tiny_run, monkeypatch):
    import transformers

    path, out = tiny_run
    # Simulate a crash that lost the last evaluation's summary.
    (out / "ml1m" / "eval" / "dmpo-k2" / "metrics.json").unlink()
    before = (out / "ml1m" / "eval" / "sft" / "metrics.json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage must not train again")

    monkeypatch.setattr(transformers.Trainer, "train", no_training)
    scored = []
    import prefrec.evaluate as evaluate_module

    real_evaluate = evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate",
                        lambda model, tok, ex, out_dir, *a, **k: scored.append(Path(out_dir).name)
                        or real_evaluate(model, tok, ex, out_dir, *a, **k))
    config = load_config(path)
    run(config)
    assert scored == ["dmpo-k2"]
    assert (out / "ml1m" / "eval" / "dmpo-k2" / "metrics.json").is_file()
    assert (out / "ml1m" / "eval" / "sft" / "metrics.json").read_text() == before


def test_report_only_rebuilds_without_running(tiny_run, monkeypatch):
    import prefrec.runner as runner

    path, out = tiny_run
    (out / "report.html").unlink()
    monkeypatch.setattr(runner, "run_experiment", lambda *a: pytest.fail("ran a stage"))
    assert cli_main(["run", str(path), "--report-only"]) == 0
    assert (out / "report.html").is_file()


def test_narrowed_run_reports_every_evaluated_model_of_the_run(tiny_run, monkeypatch):
    import prefrec.runner as runner

    path, out = tiny_run
    full = json.loads((out / "results.json").read_text())["experiments"]["ml1m"]
    monkeypatch.setattr(runner, "run_experiment", lambda *a: pytest.fail("ran a stage"))
    # One cell and no zero-shot, as when a session trains a single loss x K of the run.
    assert cli_main(["run", str(path), "align.losses=[dpo]", "align.negatives=[2]",
                     "zero_shot=false", "--report-only"]) == 0
    narrowed = json.loads((out / "results.json").read_text())["experiments"]["ml1m"]
    assert list(narrowed["models"])[:2] == ["zero-shot", "sft"]
    assert set(narrowed["models"]) == set(full["models"])
    # The K=1 model keeps its alias though the narrowed config has no K=1.
    assert narrowed["models"]["dpo-k1"]["same_as"] == "dmpo-k1"
    for label, entry in full["models"].items():
        assert narrowed["models"][label]["metrics"] == entry["metrics"], label
    assert narrowed["ablation"] == full["ablation"]
    assert set(narrowed["ablation"]["dpo"]) == {"1", "2"}
    assert narrowed["significance"] == full["significance"]
    assert "| zero-shot | llm |" in (out / "report.md").read_text()


def test_selection_split_experiment_has_disjoint_users(tmp_path, tiny_dir, shared_data):
    """A LastFM-style experiment splits one file by user before anything trains on it."""
    from prefrec.data.formats import load_examples
    from prefrec.data.split import linked_users

    config = _tiny_config(tiny_dir, shared_data, tmp_path / "sel")
    config["experiments"] = [{"name": "lastfm",
                              "split": {"source": "lastfm", "eval_fraction": 0.2, "seed": 7}}]
    config.update({"zero_shot": True, "sft": None, "align": None,
                   "eval": {"limit": 4, "n_boot": 100, "mode": "likelihood"}})
    cfg = load_config(_write(tmp_path / "sel.yaml", config))
    run(cfg)
    data = tmp_path / "sel" / "lastfm" / "data"
    train = load_examples(data / "lastfm-val-train.json")
    test = load_examples(data / "lastfm-val-test.json")
    assert len(train) + len(test) == 2767
    # LastFM records are sliding windows of ~115 listeners: a listener's windows stay on
    # one side, so no test target sits in a training history of the same listener.
    users = linked_users([*train, *test])
    assert not set(users[: len(train)]) & set(users[len(train):])
    results = json.loads((tmp_path / "sel" / "results.json").read_text())
    zs = results["experiments"]["lastfm"]["models"]["zero-shot"]
    assert zs["task"] == "selection" and zs["metrics"]["hr@1"]["n"] == 4
    assert np.isfinite(zs["metrics"]["mrr"]["value"])
    # S-DPO's reported metrics head the table
    md = (tmp_path / "sel" / "report.md").read_text()
    assert "| model | kind | hr@1 | hr@5 | ndcg@5 | ndcg@10 | mrr |" in md


def test_data_rich_config_runs_its_item_token_recipe_end_to_end(tmp_path, tiny_dir):
    """configs/ml100k-data-rich.yaml's defaults (per-target histories shared by 2 pairs,
    packed SFT with BPR item tokens and a projector warm-up, LoRA on the last layers, DMPO,
    the unseen test users via cross_eval) run through the runner, shrunk to a tiny model."""
    from collections import Counter

    from prefrec.data.formats import load_examples
    from prefrec.item_tokens import WEIGHTS_FILE

    out = tmp_path / "rich"
    config = load_config(Path(__file__).parents[1] / "configs" / "ml100k-data-rich.yaml", [
        f"model={tiny_dir}", "dtype=float32", "device=cpu", f"out={out}",
        "zero_shot=false", "build.sft_users=30", "build.dpo_users=30",
        "build.valid_users=5", "build.eval_users=5",
        "sft.limit=8", "sft.max_steps=2", "sft.batch_size=2", "sft.lora_r=4",
        "sft.lora_alpha=8", "sft.lora_layers=1", "sft.item_projector_warmup_steps=1",
        "align.limit=4", "align.max_steps=1", "align.batch_size=2", "align.lora_r=4",
        "align.lora_alpha=8", "align.lora_layers=1",
        "eval.limit=6", "eval.n_boot=50", "baselines.methods=[popularity]",
        "significance.n_boot=50"])
    run(config)
    # Each training target has its own history, shared by the 2 SFT pairs drawn for it.
    sft = load_examples(out / "data" / "ml100k_sft_ranking.json")
    shared = Counter(tuple(ex.history) for ex in sft).values()
    assert max(shared) == 2 and 2 * sum(n == 2 for n in shared) >= 0.9 * len(sft)
    # Both stages save the item projector with their adapter; the models are scored on
    # the valid users and on the unseen test users.
    for stage in ("sft", "dmpo-k3"):
        assert (out / "ml100k" / stage / "adapter" / WEIGHTS_FILE).is_file(), stage
    results = json.loads((out / "results.json").read_text())
    exp = results["experiments"]["ml100k"]
    assert {"sft", "dmpo-k3"} <= set(exp["models"]) and "zero-shot" not in exp["models"]
    for label in ("sft", "dmpo-k3"):
        assert exp["models"][label]["metrics"]["pairwise_accuracy"]["n"] == 6
        assert exp["cross"]["test"][label]["metrics"]["pairwise_accuracy"]["n"] == 6
