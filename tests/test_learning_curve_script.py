"""scripts/learning_curve.py: a curve grows from an earlier run's points."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
_SPEC = importlib.util.spec_from_file_location(
    "learning_curve", REPO / "scripts" / "learning_curve.py")
script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(script)


def _point(series: str, examples: int, value: float, stage: str = "align") -> dict:
    return {"stage": stage, "series": series, "examples": examples, "name": "pairwise_accuracy",
            "value": value, "ci_low": value - 0.04, "ci_high": value + 0.04, "n": 600}


def _eval_folder(folder: Path, value: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "settings": {"task": "pairwise"}, "wall_time_s": 1.0, "metrics": {
            "pairwise_accuracy": {"value": value, "ci_low": value - 0.04,
                                  "ci_high": value + 0.04, "n": 600}}}))
    return folder


def test_points_of_an_earlier_run_are_kept_and_a_rerun_point_replaces_its_old_one(tmp_path):
    earlier = tmp_path / "curve.json"
    earlier.write_text(json.dumps({
        "points": [_point("dmpo", 2202, 0.677), _point("dmpo", 4177, 0.60),
                   {**_point("itemknn", 4816, 0.707, "sft"), "baseline": True}],
        "baselines": {"popularity": 0.62}}))
    out = tmp_path / "new" / "curve.png"
    script.main(["--points", str(earlier),
                 "--eval-point", "align", "dmpo", "4177", str(_eval_folder(tmp_path / "a", 0.683)),
                 "--eval-point", "align", "dmpo", "8354", str(_eval_folder(tmp_path / "b", 0.715)),
                 "--out", str(out)])
    written = json.loads(out.with_suffix(".json").read_text())
    assert [(p["series"], p["examples"], p["value"]) for p in written["points"]] == [
        ("dmpo", 2202, 0.677), ("itemknn", 4816, 0.707), ("dmpo", 4177, 0.683),
        ("dmpo", 8354, 0.715)]
    assert written["baselines"] == {"popularity": 0.62}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unreadable_points_file_is_a_one_line_error_naming_it(tmp_path):
    bad = tmp_path / "curve.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=r"--points .*curve\.json"):
        script.main(["--points", str(bad), "--out", str(tmp_path / "c.png")])
    with pytest.raises(SystemExit, match=r"--points .*missing\.json"):
        script.main(["--points", str(tmp_path / "missing.json"), "--out", str(tmp_path / "c.png")])
