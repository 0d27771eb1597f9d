"""scripts/quality_test_json.py: the test-user table of results/quality.md as JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).parents[1]
_SPEC = importlib.util.spec_from_file_location(
    "quality_test_json", REPO / "scripts" / "quality_test_json.py")
script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(script)

PAGE = """# q

**The target is not reached.**

| model | pairwise accuracy | given order only | listed-first preference | DMPO AUC | n | eval time |
|---|---|---|---|---|---|---|
| SFT | 0.498 [0.472, 0.528] | 0.521 [0.492, 0.550] | 0.584 [0.555, 0.614] | – | 1200 | 836 s |
| SFT + DMPO (H100) | **0.576 [0.551, 0.603]** | – | 0.509 [0.482, 0.537] | – | 1200 | 14 s |
| item-kNN (best baseline) | 0.664 [0.639, 0.689] | – | – | – | 1200 | 2 s |

after the table
"""


def test_rows_carry_name_accuracy_ci_n_and_kind(tmp_path):
    rows = script.test_rows(PAGE)
    assert [r["name"] for r in rows] == ["SFT", "SFT + DMPO (H100)", "item-kNN"]
    assert rows[1] == {"name": "SFT + DMPO (H100)", "kind": "llm", "device": "H100",
                      "pairwise_accuracy": 0.576, "ci_low": 0.551, "ci_high": 0.603,
                      "n": 1200, "listed_first_preference": 0.509}
    assert rows[2]["kind"] == "baseline" and rows[2]["listed_first_preference"] is None


def test_check_agrees_with_the_verdict_and_the_file_is_written(tmp_path):
    page = tmp_path / "quality.md"
    page.write_text(PAGE)
    assert script.main(["--page", str(page), "--check"]) == 0  # 0.576 < 0.664, not reached
    page.write_text(PAGE.replace("not reached", "reached"))
    assert script.main(["--page", str(page), "--check"]) == 1  # a claim the table refutes


def test_the_committed_test_json_matches_the_page():
    committed = json.loads((REPO / "results" / "quality" / "test.json").read_text())
    assert committed["models"] == script.test_rows((REPO / "results" / "quality.md").read_text())
