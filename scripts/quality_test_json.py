"""Write ``results/quality/test.json`` from the test-user table of ``results/quality.md``.

Every model and baseline scored on the 200 unseen ML-100K test users (1200 pairs) gets its
name, pairwise accuracy with the 95% CI, n, and listed-first preference, so the page's
headline can be checked by a script: ``--check`` prints the best language model against
the best baseline and exits 1 if the page's verdict line contradicts them.

    python scripts/quality_test_json.py                 # writes results/quality/test.json
    python scripts/quality_test_json.py --check

The table is the page's record of runs done on 2026-11-22/23 (CPU dev machine, H100 rows
marked); the evaluation folders behind the CPU rows were not committed, so the table,
not a folder walk, is the source.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "results" / "quality.md"
OUT = REPO / "results" / "quality" / "test.json"
TABLE_HEADER = "| model | pairwise accuracy | given order only | listed-first preference |"
BASELINES = ("item-knn", "bpr-mf", "popularity", "content")
CELL = re.compile(r"\*{0,2}([0-9.]+) \[([0-9.]+), ([0-9.]+)\]\*{0,2}")


def _metric(cell: str) -> dict[str, float] | None:
    match = CELL.fullmatch(cell.strip())
    if not match:
        return None
    value, low, high = map(float, match.groups())
    return {"value": value, "ci_low": low, "ci_high": high}


def test_rows(markdown: str) -> list[dict]:
    """The rows of the test-user table: one dict per model or baseline."""
    lines = markdown.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(TABLE_HEADER))
    except StopIteration:
        raise SystemExit(f"{PAGE}: no test-user table (header {TABLE_HEADER!r})") from None
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        name = cells["model"].replace(" (best baseline)", "")
        accuracy = _metric(cells["pairwise accuracy"])
        if accuracy is None:
            raise SystemExit(f"{PAGE}: row {name!r}: unreadable pairwise accuracy")
        kind = "baseline" if name.lower().startswith(BASELINES) else "llm"
        rows.append({
            "name": name,
            "kind": kind,
            "device": "H100" if "(H100)" in name else "cpu",
            "pairwise_accuracy": accuracy["value"],
            "ci_low": accuracy["ci_low"],
            "ci_high": accuracy["ci_high"],
            "n": int(cells["n"]),
            "listed_first_preference": (_metric(cells["listed-first preference"]) or {}).get(
                "value"),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true",
                        help="compare the best LLM with the best baseline; do not write")
    args = parser.parse_args(argv)
    rows = test_rows(args.page.read_text(encoding="utf-8"))
    if args.check:
        best_llm = max((r for r in rows if r["kind"] == "llm"),
                       key=lambda r: r["pairwise_accuracy"])
        best_base = max((r for r in rows if r["kind"] == "baseline"),
                        key=lambda r: r["pairwise_accuracy"])
        beats = best_llm["pairwise_accuracy"] >= best_base["pairwise_accuracy"]
        print(f"best LLM {best_llm['name']}: {best_llm['pairwise_accuracy']:.3f}; "
              f"best baseline {best_base['name']}: {best_base['pairwise_accuracy']:.3f}; "
              f"LLM at or above the baseline: {beats}")
        claims_win = "**The target is reached" in args.page.read_text(encoding="utf-8")
        return 0 if claims_win == beats else 1
    from prefrec.io import atomic_write_json

    atomic_write_json(args.out, {"source": "results/quality.md (test-user table)",
                                 "eval": "200 unseen ML-100K test users, 1200 pairs",
                                 "models": rows})
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
