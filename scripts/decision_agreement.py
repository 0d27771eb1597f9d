"""How often two pairwise models make the same call: a markdown matrix.

For each two evaluation folders (``scores.jsonl`` of the same eval file), the share of
pairs on which both models pick the same candidate, among the pairs neither scored as a
tie. Two models that each reach ~0.53 accuracy can do so on different pairs (agreement
~0.5) or on the same ones (agreement near 1); results/quality.md uses it to tell a model
that learned something new from one that copied its starting point.

    python scripts/decision_agreement.py NAME=FOLDER NAME=FOLDER ... [-o table.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from prefrec.io import atomic_write_text
from prefrec.report import per_example_outcomes


def decisions(folder: Path) -> dict[int, int]:
    """Example index -> +1 (ranks the liked item first), -1, or 0 (a tie)."""
    return {i: int(np.sign(c - r)) for i, (c, r) in per_example_outcomes(folder, "pairwise").items()}


def agreement(a: dict[int, int], b: dict[int, int]) -> tuple[float, int]:
    """(share of same calls, number of pairs) over the pairs both scored and neither tied."""
    common = [i for i in a.keys() & b.keys() if a[i] and b[i]]
    if not common:
        return float("nan"), 0
    return sum(a[i] == b[i] for i in common) / len(common), len(common)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="NAME=FOLDER")
    p.add_argument("-o", "--output", help="also write the table here")
    args = p.parse_args()
    named = {}
    for spec in args.models:
        name, sep, folder = spec.partition("=")
        if not sep:
            p.error(f"{spec}: expected NAME=FOLDER")
        named[name] = decisions(Path(folder))
    names = list(named)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in names:
        cells = []
        for b in names:
            share, n = agreement(named[a], named[b])
            cells.append(f"{share:.3f} (n={n})")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        atomic_write_text(args.output, table)


if __name__ == "__main__":
    main()
