"""The quality study's learning curve from finished studies' ``study.json`` files.

Each ``--study CONFIG STUDY_JSON`` adds the models of the variants that only change how
much a model trains on (pairs and groups per user, users, epochs; per LoRA rank and
history protocol), placed at the training examples they saw. ``--baselines RESULTS:EXP``
draws the classical baselines of a run's ``results.json`` (same eval users) as lines;
``--baseline-curve SFT_PAIRS FOLDER`` (repeated) draws ``prefrec baselines`` runs on
training sets of several sizes as curves, at the SFT pairs of the files they trained on;
``--eval-point STAGE SERIES EXAMPLES FOLDER`` adds one evaluation folder of a model
trained outside a finished study. ``--points JSON`` starts from the points of an earlier
run's JSON (the file written beside its PNG), so a curve grows without the run folders
its points came from; a new point of the same stage, series and examples replaces the old.

    python scripts/learning_curve.py \\
        --study configs/quality-study.yaml results/quality/study.json \\
        --study configs/quality-study-h100.yaml results/quality/h100/study.json \\
        --baselines results/quality/default-results.json:ml100k \\
        --out results/quality/learning_curve.png
    python scripts/learning_curve.py --points results/quality/learning_curve.json \\
        --eval-point align "dmpo-k3, 2 epochs" 8354 runs/eval-valid-dmpo-e2 \\
        --out results/quality/learning_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefrec.io import atomic_write_json
from prefrec.study import (
    baseline_curve_points,
    eval_curve_point,
    learning_curve_plot,
    learning_curve_points,
    load_study,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", nargs=2, action="append", metavar=("CONFIG", "STUDY_JSON"),
                        default=[])
    parser.add_argument("--baselines", default=None, help="results.json:experiment")
    parser.add_argument("--baseline-curve", nargs=2, action="append", default=[],
                        metavar=("SFT_PAIRS", "FOLDER"),
                        help="a `prefrec baselines --out` folder trained on SFT_PAIRS pairs")
    parser.add_argument("--eval-point", nargs=4, action="append", default=[],
                        metavar=("STAGE", "SERIES", "EXAMPLES", "FOLDER"),
                        help="an eval folder (sft|align stage) at EXAMPLES examples seen")
    parser.add_argument("--points", type=Path, default=None,
                        help="an earlier run's JSON whose points (and baselines) to start from")
    parser.add_argument("--out", type=Path, required=True, help="PNG; the points go beside it")
    args = parser.parse_args(argv)
    points, metric, baselines = [], "pairwise_accuracy", {}
    if args.points:
        try:
            earlier = json.loads(args.points.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: --points {args.points}: {err}") from None
        points, baselines = list(earlier["points"]), dict(earlier.get("baselines", {}))
        metric = points[0]["name"] if points else metric
    for config, study_json in args.study:
        study = load_study(config)
        metric = study["metric"]
        rows = json.loads(Path(study_json).read_text(encoding="utf-8"))["rows"]
        # Several studies (CPU, H100) rerun the same variants: keep their points apart.
        tag = f" [{Path(study['out']).name}]" if len(args.study) > 1 else ""
        points += [{**p, "series": p["series"] + tag, "study": config}
                   for p in learning_curve_points(study, rows)]
    if args.baselines:
        path, exp = args.baselines.rsplit(":", 1)
        models = json.loads(Path(path).read_text(encoding="utf-8"))["experiments"][exp]["models"]
        baselines = {name: e["metrics"][metric]["value"] for name, e in models.items()
                     if e["kind"] == "baseline"}
    new = [eval_curve_point(Path(folder), stage, series, int(n), metric)
           for stage, series, n, folder in args.eval_point]
    new += baseline_curve_points({int(n): Path(f) for n, f in args.baseline_curve}, metric)
    replaced = {(p["stage"], p["series"], p["examples"]) for p in new}
    points = [p for p in points if (p["stage"], p["series"], p["examples"]) not in replaced] + new
    learning_curve_plot(points, baselines, args.out, metric)
    atomic_write_json(args.out.with_suffix(".json"), {"points": points, "baselines": baselines})
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} ({len(points)} points)")


if __name__ == "__main__":
    main()
