"""Evaluation throughput and memory: shared-prefix against naive per-sequence scoring.

Wraps ``bench_scoring.py`` (its shapes, methods and interleaved timing) with evaluation
defaults: the ML-1M eval file (one pair = 2 sequences per group), ML-1M K=3 users
(``orderings``: 3 pairs = 6 sequences per group, the "K=3" figure) and LastFM
20-candidate lists, each scored ``shared`` and ``naive``. Throughput is reported as
examples/s (pairs for ML-1M, candidate lists for LastFM) and sequences/s.

Memory, per (shape, method):

- in-process: each timed row carries ``rss_before_mb`` and ``peak_rss_mb`` (RSS
  high-water mark reset before the call), and ``cuda_peak_mb`` on GPU;
- isolated (unless ``--no-isolated-memory``): a fresh subprocess loads the model and
  scores the shape once with that method only; its ``peak_rss_mb`` is the method's whole
  peak (model, tokenizer and libraries included).

    python benchmarks/bench_eval.py --threads 1 --groups 8 --shape-groups lastfm=4 \\
        --reps 3 --out results/bench_eval_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_scoring import (
    BUILDERS,
    SHAPES,
    add_scoring_args,
    measure_shape,
    run_method,
    speedup_fields,
)
from common import (
    Recorder,
    add_common_args,
    header,
    measured,
    peak_rss_mb,
    probe_args,
    run_isolated,
    setup_threads,
)

from prefrec.model import load

# What the design aims for (reported, not asserted): naive median / shared median.
TARGETS = {"orderings": 3.0, "lastfm": 3.0}


def shape_groups(text: str) -> dict[str, int]:
    """``"lastfm=4,orderings=8"`` -> ``{"lastfm": 4, "orderings": 8}`` (argparse type)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in SHAPES or not value.isdigit():
            raise argparse.ArgumentTypeError(f"expected SHAPE=N with SHAPE in {SHAPES}: {part!r}")
        out[name] = int(value)
    return out


def probe(args, model, tokenizer) -> None:
    """Child process: score one shape once with one method; print the peaks."""
    device = next(model.parameters()).device
    shape, method = args.shapes[0], args.methods[0]
    batch = BUILDERS[shape](args.data, args.groups)
    load_peak = peak_rss_mb()  # before measured() resets the mark
    seconds, _, memory = measured(
        lambda: run_method(method, model, tokenizer, batch, args.batch_size, args.naive_batch_size),
        device,
    )
    print(json.dumps({"probe": True, "shape": shape, "method": method, "groups": args.groups,
                      "seconds": round(seconds, 3), **memory, "peak_rss_load_mb": load_peak,
                      "peak_rss_process_mb": max(load_peak, memory["peak_rss_mb"])}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, groups=8, reps=3)
    add_scoring_args(parser, "ml1m-eval,orderings,lastfm", "shared,naive")
    parser.add_argument("--shape-groups", type=shape_groups, default={},
                        help="per-shape group counts overriding --groups, e.g. lastfm=4")
    parser.add_argument("--isolated-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="measure each method's peak RSS in a fresh subprocess")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    if args.probe:
        probe(args, model, tokenizer)
        return
    with Recorder(args.out) as rec:
        rec.emit(header("bench_eval", args, model))
        speedups = {}
        for shape in args.shapes:
            n = args.shape_groups.get(shape, args.groups)
            times = measure_shape(args, rec, model, tokenizer, shape, n)
            for method in args.methods:
                if method != "shared" and "shared" in args.methods:
                    fields = speedup_fields(times, method)
                    speedup = fields[f"{method}_over_shared"]
                    speedups[f"{shape}:{method}_over_shared"] = speedup
                    row = {"shape": shape, "speedup": True, "method": method, "groups": n,
                           **fields}
                    if method == "naive" and shape in TARGETS:
                        row["target"] = TARGETS[shape]
                        row["target_met"] = speedup >= TARGETS[shape]
                    rec.emit(row)
        del model  # the probes below load their own
        if args.isolated_memory:
            script = Path(__file__).resolve()
            for shape in args.shapes:
                n = args.shape_groups.get(shape, args.groups)
                for method in args.methods:
                    argv_child = [*probe_args(args), "--groups", str(n), "--shapes", shape,
                                  "--methods", method, "--batch-size", str(args.batch_size),
                                  "--naive-batch-size", str(args.naive_batch_size), "--probe"]
                    rows = run_isolated(script, argv_child)
                    rec.emit({**next(r for r in rows if r.get("probe")), "memory": True,
                              "how": "fresh subprocess: load + one scoring pass"})
        rec.emit({"final": True, "reps": args.reps, "speedup": speedups})


if __name__ == "__main__":
    main()
