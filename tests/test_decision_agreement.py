"""scripts/decision_agreement.py: how often two pairwise models make the same call."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "decision_agreement", Path(__file__).parents[1] / "scripts" / "decision_agreement.py")
agreement_script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(agreement_script)


def _scores(folder: Path, chosen_rejected: list[tuple[float, float]]) -> Path:
    folder.mkdir()
    rows = [{"index": i, "chosen_logp": c, "rejected_logp": r}
            for i, (c, r) in enumerate(chosen_rejected)]
    (folder / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_agreement_counts_same_calls_and_leaves_out_ties(tmp_path):
    a = agreement_script.decisions(_scores(tmp_path / "a", [(-1, -2), (-1, -2), (-2, -1), (0, 0)]))
    b = agreement_script.decisions(_scores(tmp_path / "b", [(-1, -2), (-2, -1), (-2, -1), (-1, -2)]))
    assert a == {0: 1, 1: 1, 2: -1, 3: 0}
    share, n = agreement_script.agreement(a, b)
    assert n == 3 and share == pytest.approx(2 / 3)  # pair 3 is a tie for a
    assert agreement_script.agreement(a, a) == (1.0, 3)
