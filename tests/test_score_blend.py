"""scripts/score_blend.py: a baseline blended with a language model, weight picked on valid."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "score_blend", Path(__file__).parents[1] / "scripts" / "score_blend.py")
blend_script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(blend_script)


def _folder(path: Path, differences: np.ndarray) -> Path:
    """An evaluation folder whose pair i has score difference differences[i]."""
    path.mkdir()
    rows = [{"index": i, "chosen_logp": float(d), "rejected_logp": 0.0}
            for i, d in enumerate(differences)]
    (path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path: Path, llm_signal: float) -> dict:
    """Base and LLM each see an independent half of the truth (LLM's share scaled by
    ``llm_signal``; 0 = pure noise), on 2000 validation and 2000 test pairs."""
    rng = np.random.default_rng(0)
    folders = {}
    for split in ("valid", "test"):
        base = 0.4 + rng.normal(size=2000)
        llm = 100 * (llm_signal + rng.normal(size=2000))  # another scale: the blend rescales
        folders[f"base-{split}"] = _folder(tmp_path / f"base-{split}", base)
        folders[f"llm-{split}"] = _folder(tmp_path / f"llm-{split}", llm)
    argv = [x for name, f in folders.items() for x in (f"--{name}", str(f))]
    assert blend_script.main([*argv, "--weights", "0", "0.5", "1", "--out",
                              str(tmp_path / "out")]) == 0
    return json.loads((tmp_path / "out" / "blend.json").read_text())


def test_a_complementary_model_gets_weight_and_lifts_test_accuracy(tmp_path):
    result = _run(tmp_path, llm_signal=0.4)
    assert result["weight"] == 1.0  # equal signal halves: equal weights are best
    versus = result["versus_base_test"]
    assert versus["a"] == pytest.approx(result["test"]["value"])
    assert versus["delta"] > 0.05 and versus["p_bootstrap"] < 0.01


def test_a_noise_model_gets_no_weight_and_changes_nothing(tmp_path):
    result = _run(tmp_path, llm_signal=0.0)
    assert result["weight"] == 0.0
    assert result["weights_valid_accuracy"]["0.0"] > result["weights_valid_accuracy"]["1.0"]
    assert result["versus_base_test"]["delta"] == 0.0
