"""Blend a classical baseline's pairwise scores with a language model's, weight picked on
validation users, scored once on test users.

For each pair, the blend ranks by  d_base / s_base + w * d_llm / s_llm, where d is a
model's score difference (chosen - rejected; the LLM's summed over both listings when it
was scored so) and s its standard deviation on the *validation* pairs. ``w`` is the
weight of ``--weights`` with the best validation accuracy; the test blend is written as
an evaluation folder (``scores.jsonl``) and compared with the baseline alone by
``prefrec.report.compare`` (paired bootstrap, McNemar). results/quality.md uses it to ask
whether the language model's calls carry a signal the baseline lacks.

    python scripts/score_blend.py --base-valid B_VALID --llm-valid L_VALID \\
        --base-test B_TEST --llm-test L_TEST --out runs/blend [--weights 0 0.25 0.5 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from prefrec.io import atomic_write_json, atomic_write_text
from prefrec.metrics import METRICS, evaluate_metric
from prefrec.report import compare, per_example_outcomes


def score_differences(folder: Path) -> dict[int, float]:
    """Example index -> chosen score minus rejected score, as the evaluation ranked them."""
    return {i: float(c - r) for i, (c, r) in per_example_outcomes(folder, "pairwise").items()}


def blend(base: dict[int, float], llm: dict[int, float], weight: float,
          scales: tuple[float, float]) -> dict[int, float]:
    """base / s_base + weight * llm / s_llm on the examples both scored."""
    common = sorted(base.keys() & llm.keys())
    return {i: base[i] / scales[0] + weight * llm[i] / scales[1] for i in common}


def accuracy(differences: dict[int, float]) -> float:
    """Pairwise accuracy of score differences (a tie counts half)."""
    d = np.array(list(differences.values()))
    return float(METRICS["pairwise_accuracy"].fn(d, np.zeros_like(d)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("base-valid", "llm-valid", "base-test", "llm-test"):
        p.add_argument(f"--{name}", type=Path, required=True, help="an evaluation folder")
    p.add_argument("--weights", type=float, nargs="+", default=[0, 0.125, 0.25, 0.5, 1, 2])
    p.add_argument("--out", type=Path, required=True, help="folder for the test blend")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    base_v, llm_v = score_differences(args.base_valid), score_differences(args.llm_valid)
    common = sorted(base_v.keys() & llm_v.keys())
    scales = (float(np.std([base_v[i] for i in common])),
              float(np.std([llm_v[i] for i in common])))
    valid = {w: accuracy(blend(base_v, llm_v, w, scales)) for w in args.weights}
    chosen = max(valid, key=lambda w: (valid[w], -w))  # ties go to the smaller weight
    test = blend(score_differences(args.base_test), score_differences(args.llm_test), chosen,
                 scales)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = ({"index": i, "chosen_logp": d, "rejected_logp": 0.0, "score_kind": "blend"}
            for i, d in test.items())
    atomic_write_text(args.out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    d = np.array(list(test.values()))
    metric = METRICS["pairwise_accuracy"]
    value = evaluate_metric(metric.name, metric.fn, d, np.zeros_like(d), n_boot=args.n_boot,
                            seed=args.seed, batched_fn=metric.batched_fn)
    versus = compare(args.out, args.base_test, "pairwise", args.n_boot, args.seed)
    result = {"weights_valid_accuracy": {str(w): a for w, a in valid.items()}, "weight": chosen,
              "scales": scales, "test": value.to_dict(),
              "versus_base_test": versus}
    atomic_write_json(args.out / "blend.json", result)
    print(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
