"""A run's record: published without weights, restored into a fresh run folder, where the
runner trains and scores only what the record lacks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from prefrec.cli import main as cli_main
from prefrec.errors import PrefrecError
from prefrec.record import publish_record, record_files, restore_record

pytestmark = pytest.mark.usefixtures("single_thread")


def _touch(path: Path, text: str = "{}") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_record_leaves_out_weights_data_and_unfinished_stages(tmp_path):
    out = tmp_path / "run"
    keep = ["stages.jsonl", "report.md", "figures/exp_bars.png", "exp/audit.json",
            "exp/sft/log.jsonl", "exp/sft/config.yaml", "exp/sft/loss.png",
            "exp/eval/sft/metrics.json", "exp/eval/sft/scores.jsonl",
            "exp/baselines/itemknn/metrics.json", "exp/baselines/itemknn/scores.jsonl"]
    for rel in keep:
        _touch(out / rel)
    # weights, checkpoints, data, temporaries and unfinished stages
    _touch(out / "exp/sft/adapter/adapter_config.json")
    _touch(out / "exp/sft/adapter/adapter_model.safetensors", "weights")
    _touch(out / "exp/sft/checkpoints/checkpoint-50/trainer_state.json")
    _touch(out / "exp/dpo-k2/log.jsonl")                     # training, no adapter yet
    _touch(out / "exp/dpo-k2/checkpoints/checkpoint-50/trainer_state.json")
    _touch(out / "exp/eval/dmpo-k2/scores.jsonl")            # evaluation, no metrics yet
    _touch(out / "exp/eval/.metrics.json.abc.tmp")
    _touch(out / "exp/data/train.json")
    _touch(out / "built/ml_sft.json")
    _touch(out / "exp/eval/sft/cache.safetensors", "weights")
    assert record_files(out, [out / "built", out / "exp" / "data"]) == sorted(Path(r) for r in keep)


def test_publish_replaces_the_folder_whole_and_refuses_the_run_folder(tmp_path):
    out, dest = tmp_path / "run", tmp_path / "published"
    _touch(out / "exp/eval/sft/metrics.json", '{"a": 1}')
    _touch(out / "exp/eval/sft/scores.jsonl", "")
    _touch(dest / "stale.md", "from an older publish")
    assert publish_record(out, dest) == 2
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == ["metrics.json",
                                                                       "scores.jsonl"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries
    with pytest.raises(PrefrecError, match="must not be the run folder"):
        publish_record(out, out / "published")
    # restore never overwrites what the run folder has
    _touch(out / "exp/eval/sft/metrics.json", '{"a": 2}')
    (out / "exp/eval/sft/scores.jsonl").unlink()
    assert restore_record(dest, out) == 1
    assert json.loads((out / "exp/eval/sft/metrics.json").read_text()) == {"a": 2}
    with pytest.raises(PrefrecError, match="no such folder"):
        restore_record(tmp_path / "missing", out)


def _config(tiny_dir: Path, shared_data: Path, out: Path) -> dict:
    return {
        "name": "tiny", "out": str(out), "model": str(tiny_dir), "dtype": "float32",
        "device": "cpu", "data_dir": str(shared_data),
        "experiments": [{"name": "ml1m", "sft": "ml1m-sft", "preference": "ml1m-dpo-{k}",
                         "eval": "ml1m-eval", "audit": ["ml1m-eval"]}],
        "sft": {"limit": 4, "max_steps": 2, "batch_size": 2, "lora_r": 4, "lora_alpha": 8,
                "save_steps": 100},
        "align": {"losses": ["dmpo", "dpo"], "negatives": [2], "limit": 4, "max_steps": 2,
                  "batch_size": 2, "lora_r": 4, "lora_alpha": 8, "save_steps": 100},
        "eval": {"limit": 8, "batch_size": 4, "n_boot": 100, "orders": "both"},
        "significance": {"n_boot": 100},
    }


def _new_stages(out: Path, before: int) -> list[str]:
    rows = (out / "stages.jsonl").read_text().splitlines()
    return [json.loads(r)["stage"] for r in rows[before:]]


def test_restored_record_trains_and_scores_only_what_it_lacks(tmp_path, tiny_dir, shared_data,
                                                              monkeypatch):
    import prefrec.evaluate as evaluate_module

    out, pub = tmp_path / "runs" / "tiny", tmp_path / "results" / "tiny"
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(_config(tiny_dir, shared_data, out)), encoding="utf-8")
    assert cli_main(["run", str(path), "--publish", str(pub)]) == 0
    first = json.loads((out / "results.json").read_text())["experiments"]["ml1m"]["models"]
    assert not list(pub.rglob("*.safetensors")) and not list(pub.rglob("adapter"))
    assert (pub / "report.md").is_file() and (pub / "ml1m/eval/dpo-k2/scores.jsonl").is_file()

    # A fresh clone: the run folder is gone, the record is committed, one model was never
    # scored (its evaluation is not in the record).
    shutil.rmtree(out)
    shutil.rmtree(pub / "ml1m" / "eval" / "dpo-k2")
    scored: list[str] = []
    real_evaluate = evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate",
                        lambda model, tok, ex, out_dir, *a, **k: scored.append(Path(out_dir).name)
                        or real_evaluate(model, tok, ex, out_dir, *a, **k))
    before = len((pub / "stages.jsonl").read_text().splitlines())
    assert cli_main(["run", str(path), "--restore", str(pub), "--publish", str(pub)]) == 0
    # dmpo-k2 is complete in the record: neither trained nor scored; SFT is trained again
    # as dpo-k2's base, and only dpo-k2 is scored.
    assert scored == ["dpo-k2"]
    assert _new_stages(out, before) == ["ml1m/audit", "ml1m/eval/zero-shot", "ml1m/sft",
                                        "ml1m/eval/sft", "ml1m/dpo-k2", "ml1m/eval/dpo-k2"]
    assert not (out / "ml1m" / "dmpo-k2" / "adapter").exists()
    second = json.loads((out / "results.json").read_text())["experiments"]["ml1m"]["models"]
    assert list(second) == list(first)
    for label in ("zero-shot", "sft", "dmpo-k2"):   # restored, unchanged
        assert second[label]["metrics"] == first[label]["metrics"], label
    assert second["dpo-k2"]["metrics"]["pairwise_accuracy"]["n"] == 8
    assert (pub / "ml1m/eval/dpo-k2/metrics.json").is_file()   # published as it finished

    # Everything in the record now: a third run does nothing but the audit and the report.
    shutil.rmtree(out)
    scored.clear()
    before = len((pub / "stages.jsonl").read_text().splitlines())
    assert cli_main(["run", str(path), "--restore", str(pub)]) == 0
    assert scored == [] and _new_stages(out, before) == ["ml1m/audit", "ml1m/eval/zero-shot"]
    assert not (out / "ml1m" / "sft" / "adapter").exists()
