"""`prefrec study` and the runner's build stage, on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prefrec.cli import main as cli_main
from prefrec.errors import PrefrecError
from prefrec.runner import _build, load_config
from prefrec.study import (
    final_models,
    load_study,
    reuse_default_stages,
    run_study,
    study_rows,
    variant_config,
    write_study_tables,
)

pytestmark = pytest.mark.usefixtures("single_thread")

BUILD = {"raw": "ml100k", "format": "ml100k", "protocol": "dmpo", "prefix": "m",
         "max_interactions": 0, "sft_users": 6, "dpo_users": 6, "valid_users": 3,
         "eval_users": 3, "pairs_per_user": 2, "groups_per_user": 2, "eval_pairs_per_user": 2,
         "max_history": 5, "max_negatives": 2, "min_negatives": 2}


def _config(tiny_dir: Path, out: Path) -> dict:
    return {
        "name": "tiny", "out": str(out), "model": str(tiny_dir), "dtype": "float32",
        "device": "cpu", "build": dict(BUILD),
        "experiments": [{"name": "m", "sft": "m_sft_ranking.json",
                         "preference": "m_dpo_ranking_{k}.json", "eval": "m_eval_ranking.json"}],
        "sft": {"max_steps": 2, "warmup_ratio": 0.0, "batch_size": 2, "lora_r": 4,
                "lora_alpha": 8},
        "align": {"losses": ["dmpo"], "negatives": [2], "max_steps": 1, "batch_size": 2,
                  "lora_r": 4, "lora_alpha": 8},
        "eval": {"batch_size": 4, "n_boot": 50, "orders": "both"},
        "significance": {"n_boot": 50},
    }


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")  # sorts keys: "beta" first
    return path


def test_build_stage_builds_once_into_the_data_dir(tiny_dir, tmp_path, monkeypatch):
    config = load_config(_write(tmp_path / "c.yaml", _config(tiny_dir, tmp_path / "o")))
    assert config["data_dir"] == str(tmp_path / "o" / "data")
    _build(config)
    data = tmp_path / "o" / "data"
    report = json.loads((data / "m_build_report.json").read_text())
    assert report["examples"]["sft"] == 12 and report["examples"]["dpo_2"] == 6 * 2 * 2
    assert report["examples"]["eval"] == 6 and report["examples"]["valid"] == 6

    import prefrec.data.build as build

    monkeypatch.setattr(build, "build_files", lambda args: pytest.fail("built twice"))
    _build(config)  # same arguments: nothing to do


@pytest.mark.parametrize(
    ("build", "message"),
    [
        ({"raw": "ml100k", "format": "ml100k"}, "build needs protocol"),
        ({**BUILD, "pairs_per_users": 2}, r"unknown key\(s\) pairs_per_users in build"),
        ([1, 2], "build must be a mapping"),
    ],
)
def test_bad_build_sections_name_the_file(tiny_dir, tmp_path, build, message):
    path = _write(tmp_path / "c.yaml", {**_config(tiny_dir, tmp_path / "o"), "build": build})
    with pytest.raises(PrefrecError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_bad_build_value_is_a_one_line_error(tiny_dir, tmp_path, capsys):
    config = _config(tiny_dir, tmp_path / "o")
    config["build"]["sft_users"] = "many"
    assert cli_main(["run", str(_write(tmp_path / "c.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefrec: error: build:") and "Traceback" not in err


def _study(tmp_path: Path, tiny_dir: Path, variants: dict) -> Path:
    base = _write(tmp_path / "base.yaml", _config(tiny_dir, tmp_path / "unused"))
    return _write(tmp_path / "study.yaml", {
        "base": str(base), "out": str(tmp_path / "study"), "variants": variants,
        "overrides": ['experiments=[{name: m, sft: m_sft_ranking.json, '
                      'preference: "m_dpo_ranking_{k}.json", eval: m_valid_ranking.json}]'],
    })


def test_study_files_are_checked(tmp_path, tiny_dir):
    with pytest.raises(PrefrecError, match="missing variants"):
        load_study(_write(tmp_path / "s.yaml", {"base": "b.yaml", "out": "o"}))
    with pytest.raises(PrefrecError, match="must be a list of key=value strings"):
        load_study(_study(tmp_path, tiny_dir, {"default": "align.lr=1"}))
    with pytest.raises(PrefrecError, match=r"unknown key\(s\) variant in the top level"):
        load_study(_write(tmp_path / "s.yaml", {"base": "b", "out": "o", "variant": {}}))


def test_variants_share_the_data_and_reuse_only_matching_stages(tmp_path, tiny_dir, caplog):
    caplog.set_level("INFO", logger="prefrec.study")
    study = load_study(_study(tmp_path, tiny_dir, {
        "default": [], "beta": ["align.beta=0.5"], "sft-lr": ["sft.lr=1.0e-3"],
    }))
    default, beta, sft_lr = (variant_config(study, n) for n in ("default", "beta", "sft-lr"))
    assert default["data_dir"] == beta["data_dir"] == str(tmp_path / "study" / "data")
    assert beta["out"] == str(tmp_path / "study" / "beta")
    assert beta["align"]["beta"] == 0.5 and default["align"].get("beta") != 0.5
    assert beta["experiments"][0]["eval"] == "m_valid_ranking.json"
    norm = variant_config(
        load_study(_study(tmp_path, tiny_dir, {"default": [], "n": ["build.normalize_titles=true"]})),
        "n",
    )
    assert norm["data_dir"] == str(tmp_path / "study" / "n" / "data")  # its own build
    assert norm["build"]["normalize_titles"] is True
    # Nothing finished yet: nothing to copy.
    assert reuse_default_stages(default, beta) == []

    table = run_study(study, only=["default", "beta", "sft-lr"])
    out = tmp_path / "study"
    # beta reused the default's SFT adapter and zero-shot eval; sft-lr trained its own.
    beta_sft = out / "beta" / "m" / "sft" / "adapter" / "adapter_model.safetensors"
    default_sft = out / "default" / "m" / "sft" / "adapter" / "adapter_model.safetensors"
    lr_sft = out / "sft-lr" / "m" / "sft" / "adapter" / "adapter_model.safetensors"
    assert beta_sft.read_bytes() == default_sft.read_bytes() != lr_sft.read_bytes()
    assert "variant beta reuses the default's m/sft, m/eval/zero-shot, m/eval/sft" in caplog.text
    copied = json.loads((out / "beta" / "m" / "eval" / "sft" / "metrics.json").read_text())
    assert copied["settings"]["adapters"] == [str(out / "beta" / "m" / "sft" / "adapter")]
    # ... and the runner accepted the copy instead of evaluating again (same wall time).
    default_eval = json.loads((out / "default" / "m" / "eval" / "sft" / "metrics.json").read_text())
    assert copied["wall_time_s"] == default_eval["wall_time_s"]
    assert not (out / "beta" / "m" / "sft" / "checkpoints").exists()
    assert "variant sft-lr reuses the default's m/eval/zero-shot" in caplog.text

    rows = json.loads((out / "study.json").read_text())["rows"]
    assert {(r["variant"], r["model"]) for r in rows} == {
        (v, m) for v in ("default", "beta", "sft-lr") for m in ("zero-shot", "sft", "dmpo-k2")
    }
    text = table.read_text()
    assert "| beta | align.beta=0.5 | dmpo-k2 |" in text
    assert sorted((r["variant"], r["model"]) for r in final_models(rows)) == [
        ("beta", "dmpo-k2"), ("default", "dmpo-k2"), ("sft-lr", "dmpo-k2")]
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![study](study.png)" in text
    # The final-model summary: each variant's training stages (not evaluations, not the
    # near-instant ones a reused stage logs).
    with open(out / "beta" / "stages.jsonl", "a") as fh:
        for stage, seconds in (("m/sft", 2.0), ("m/dmpo-k2", 100.0), ("m/eval/dmpo-k2", 50.0)):
            fh.write(json.dumps({"stage": stage, "seconds": seconds}) + "\n")
    summary = write_study_tables(study).read_text().split("## Each variant's final model")[1]
    beta_line = next(x for x in summary.splitlines() if x.startswith("| beta |"))
    assert "| dmpo-k2 |" in beta_line and beta_line.endswith("| dmpo-k2 100 s |")
    valid_n = json.loads((out / "data" / "m_build_report.json").read_text())["examples"]["valid"]
    assert all(r["metrics"]["pairwise_accuracy"]["n"] == valid_n for r in rows)
    assert all("pairwise_accuracy_given_order" in r["metrics"] for r in rows)

    # A later run of another config into the default's folder (the final test-set
    # evaluation) adds an experiment that is not part of the study: left out.
    results = out / "default" / "results.json"
    data = json.loads(results.read_text())
    data["experiments"]["test"] = data["experiments"]["m"]
    # ... and models the variant does not train (here a loss it does not use).
    data["experiments"]["m"]["models"]["sdpo-k2"] = data["experiments"]["m"]["models"]["dmpo-k2"]
    results.write_text(json.dumps(data))
    assert {r["experiment"] for r in study_rows(study)} == {"m"}
    assert {r["model"] for r in study_rows(study) if r["variant"] == "default"} == {
        "zero-shot", "sft", "dmpo-k2"}

    with pytest.raises(PrefrecError, match="not variants of this study"):
        run_study(study, only=["nope"])


def test_the_shipped_study_and_every_variant_load():
    study = load_study(Path(__file__).parents[1] / "configs" / "quality-study.yaml")
    assert list(study["variants"])[0] == "default"
    for name in study["variants"]:
        config = variant_config(study, name)
        assert config["experiments"][0]["eval"] == "ml100k_valid_ranking.json"  # never test
        assert config["out"].endswith(name)


def test_final_models_pick_each_variants_last_trained_language_model():
    def row(variant, model, kind="llm"):
        return {"variant": variant, "model": model, "kind": kind, "metrics": {}}

    rows = [row("default", "zero-shot"), row("default", "sft"), row("default", "dmpo-k3"),
            row("default", "itemknn", "baseline"),
            row("no-sft", "zero-shot"), row("no-sft", "dpo-k1"),
            row("sft-only", "zero-shot"), row("sft-only", "sft"),
            row("base", "zero-shot")]
    assert [(r["variant"], r["model"]) for r in final_models(rows)] == [
        ("default", "dmpo-k3"), ("no-sft", "dpo-k1"), ("sft-only", "sft"), ("base", "zero-shot")]


# --------------------------------------------------------------------------- learning curve


def test_examples_seen_counts_what_the_build_draws_times_epochs():
    from prefrec.study import examples_seen

    config = {"build": {"sft_users": 602, "dpo_users": 602, "pairs_per_user": 8,
                        "groups_per_user": 4},
              "sft": {"epochs": 2}, "align": {"losses": ["dmpo"]}}
    assert examples_seen(config, "sft") == 602 * 8 * 2
    assert examples_seen(config, "align") == 602 * 4  # AlignConfig's default: 1 epoch
    config["sft"]["limit"], config["align"]["limit"] = 200, 100  # pairs, users
    assert examples_seen(config, "sft") == 200 * 2
    assert examples_seen(config, "align") == 100 * 4
    config["align"]["both_orders"] = True
    assert examples_seen(config, "align") == 100 * 4 * 2
    assert examples_seen({**config, "build": None}, "sft") is None  # shipped files
    config["build"]["pairs_per_user"] = "all"
    assert examples_seen(config, "sft") is None


def test_learning_curve_keeps_size_variants_and_draws_a_png(tiny_dir, tmp_path):
    from prefrec.study import learning_curve_plot, learning_curve_points

    config = _config(tiny_dir, tmp_path / "o")
    config["sft"]["epochs"] = 1
    study = {"base": str(_write(tmp_path / "base.yaml", config)), "out": str(tmp_path / "s"),
             "overrides": [], "metric": "pairwise_accuracy",
             "variants": {"default": [], "more": ["build.pairs_per_user=4"],
                          "lr": ["sft.lr=1e-3"],
                          "per-target": ["build.train_history=3", "build.train_block=1",
                                         "build.pairs_per_history=2"]}}

    def row(variant, model, value):
        return {"variant": variant, "overrides": study["variants"][variant], "model": model,
                "kind": "llm", "metrics": {"pairwise_accuracy": {
                    "value": value, "ci_low": value - 0.05, "ci_high": value + 0.05, "n": 6}}}

    rows = [row("default", "zero-shot", 0.5), row("default", "sft", 0.52),
            row("default", "dmpo-k2", 0.53), row("more", "sft", 0.6), row("lr", "sft", 0.7),
            row("per-target", "sft", 0.55)]
    points = learning_curve_points(study, rows)
    # zero-shot trains on nothing, and the learning-rate variant changes the recipe.
    assert [(p["variant"], p["stage"], p["series"], p["examples"]) for p in points] == [
        ("default", "sft", "sft r4", 12), ("default", "align", "dmpo-k2 r4", 12),
        ("more", "sft", "sft r4", 24),
        ("per-target", "sft", "sft r4 per-target, 2 pairs per target", 12)]
    png = tmp_path / "curve.png"
    assert learning_curve_plot(points, {"itemknn": 0.69}, png, "pairwise_accuracy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not learning_curve_plot([], {}, tmp_path / "none.png", "pairwise_accuracy")


def test_baseline_curve_points_read_baseline_runs_per_training_size(tmp_path):
    from prefrec.study import baseline_curve_points, learning_curve_plot

    def method(folder, name, value):
        (folder / name).mkdir(parents=True)
        (folder / name / "metrics.json").write_text(json.dumps({
            "settings": {"task": "pairwise"}, "wall_time_s": 1.0, "metrics": {
                "pairwise_accuracy": {"value": value, "ci_low": value - 0.04,
                                      "ci_high": value + 0.04, "n": 600}}}))

    small, big = tmp_path / "1x", tmp_path / "4x"
    method(small, "itemknn", 0.69)
    method(small, "popularity", 0.61)
    method(big, "itemknn", 0.71)
    (big / "popularity").mkdir()  # unfinished: no metrics.json, so no point
    points = baseline_curve_points({4816: big, 1204: small}, "pairwise_accuracy")
    assert [(p["series"], p["examples"], p["value"]) for p in points] == [
        ("itemknn", 1204, 0.69), ("popularity", 1204, 0.61), ("itemknn", 4816, 0.71)]
    assert all(p["baseline"] and p["stage"] == "sft" for p in points)
    assert baseline_curve_points({1204: small}, "hit_ratio@1") == []
    from prefrec.errors import PrefrecError
    from prefrec.study import eval_curve_point

    point = eval_curve_point(big / "itemknn", "sft", "sft r16 blocks", 4460, "pairwise_accuracy")
    assert (point["series"], point["examples"], point["value"], point["n"]) == (
        "sft r16 blocks", 4460, 0.71, 600)
    with pytest.raises(PrefrecError, match="no finished evaluation"):
        eval_curve_point(big / "popularity", "sft", "x", 1, "pairwise_accuracy")
    png = tmp_path / "curve.png"
    assert learning_curve_plot(points, {}, png, "pairwise_accuracy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
