"""Time shared-prefix scoring against naive per-sequence scoring on real data (no grad).

Group shapes:

- ``ml1m-eval``: DMPO ML-1M ``eval_ranking`` (what ``prefrec eval`` scores), per pair its
  prompt with both orderings = 2 sequences; one group per pair, as ``evaluate`` groups.
- ``orderings``: DMPO ML-1M ``dpo_ranking_3``, per user the 3 prompts x 2 orderings
  = 6 sequences (pairwise evaluation of K=3 users).
- ``preference``: the same users as training groups, chosen + 3 rejected = 4 sequences,
  each negative under its own prompt (what DMPO training scores).
- ``lastfm``: S-DPO LastFM, one prompt and its 20 candidate titles = 20 sequences.
- ``both-orders``: DMPO Amazon Movies ``eval_ranking`` scored under both listings (what
  ``prefrec eval --orders both`` scores), per pair 2 prompts x 2 orderings = 4 sequences.

Methods: ``shared`` (score_completions, default), ``naive`` (shared_prefix=False, every
sequence alone through ``model(...)``) and optionally ``single`` (shared path with every
sequence its own group: vocabulary head at completion positions only, no prefix sharing),
which splits the gain between its two causes, and ``per-prompt`` (shared path, a group per
distinct prompt: sharing within a prompt only, as evaluation grouped both listings before).

After a warm-up (which also checks that the methods agree), repetitions interleave the
methods in ABBA order so that machine load hits all of them alike. Output is JSON lines
(see ``common.py``): a header, one row per measurement with the memory it took, one
summary per (shape, method) with median/min/max, and a final line with the speedups
(naive median / shared median). ``bench_eval.py`` wraps this module for evaluation
throughput and per-method peak memory.

    python benchmarks/bench_scoring.py --groups 16 --reps 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import (
    Recorder,
    add_common_args,
    choice_list,
    header,
    interleaved,
    measured,
    paired_ratios,
    ratio,
    setup_threads,
    spread,
)

from prefrec.data.dmpo import read_dmpo, swap_candidate_order
from prefrec.data.prompts import model_input
from prefrec.data.schema import group_pairs_by_user
from prefrec.data.sdpo import read_sdpo
from prefrec.model import load
from prefrec.scoring import default_group_ids, score_completions

SHAPES = ("ml1m-eval", "orderings", "preference", "lastfm", "both-orders")
METHODS = ("shared", "naive", "single", "per-prompt")

Batch = tuple[list[str], list[str], list[int | str]]  # prompts, completions, group ids


def eval_pairs_batch(data: Path, n_groups: int) -> Batch:
    """Per ML-1M eval pair: its prompt with the chosen and the rejected ordering."""
    prompts, completions, groups = [], [], []
    for i, ex in enumerate(read_dmpo(data / "dmpo" / "rec_data_ml_1m_eval_ranking.json")[:n_groups]):
        for completion in (ex.chosen, ex.rejected):
            prompts.append(model_input(ex.prompt))
            completions.append(completion)
            groups.append(i)
    return prompts, completions, groups


def orderings_batch(data: Path, n_groups: int) -> Batch:
    """Per user: each of the K prompts with both orderings of its pair."""
    rows = read_dmpo(data / "dmpo" / "rec_data_ml_1m_dpo_ranking_3.json")
    users = list(dict.fromkeys(r.user for r in rows))[:n_groups]
    prompts, completions, groups = [], [], []
    for row in rows:
        if row.user in users:
            for completion in (row.chosen, row.rejected):
                prompts.append(model_input(row.prompt))
                completions.append(completion)
                groups.append(row.user)
    return prompts, completions, groups


def preference_batch(data: Path, n_groups: int) -> Batch:
    """Per user: the chosen completion and its K=3 rejected ones, each under its prompt."""
    rows = read_dmpo(data / "dmpo" / "rec_data_ml_1m_dpo_ranking_3.json")
    prompts, completions, groups = [], [], []
    for g in group_pairs_by_user(rows)[:n_groups]:
        for prompt, completion in [
            (g.prompt, g.chosen),
            *zip(g.rejected_prompts, g.rejected, strict=True),
        ]:
            prompts.append(model_input(prompt))
            completions.append(completion)
            groups.append(g.user)
    return prompts, completions, groups


def lastfm_batch(data: Path, n_groups: int) -> Batch:
    """Per record: one selection prompt and each of its 20 candidates as a completion."""
    prompts, completions, groups = [], [], []
    for i, ex in enumerate(read_sdpo(data / "sdpo-lastfm" / "lastfm-val.json")[:n_groups]):
        for candidate in ex.candidates:
            prompts.append(model_input(ex.prompt))
            completions.append(ex.completion_for(candidate))
            groups.append(i)
    return prompts, completions, groups


def both_orders_batch(data: Path, n_groups: int) -> Batch:
    """Per Amazon Movies eval pair: its prompt and the swapped-listing prompt, each with the
    chosen and the rejected ordering."""
    prompts, completions, groups = [], [], []
    rows = read_dmpo(data / "dmpo" / "rec_Amazon_Movie_eval_ranking.json")[:n_groups]
    for i, ex in enumerate(rows):
        for variant in (ex, swap_candidate_order(ex)):
            for completion in (variant.chosen, variant.rejected):
                prompts.append(model_input(variant.prompt))
                completions.append(completion)
                groups.append(i)
    return prompts, completions, groups


BUILDERS = {
    "ml1m-eval": eval_pairs_batch,
    "orderings": orderings_batch,
    "preference": preference_batch,
    "lastfm": lastfm_batch,
    "both-orders": both_orders_batch,
}


def n_examples(shape: str, batch: Batch) -> int:
    """Evaluation examples in a batch: pairs for the pairwise shapes, lists for LastFM,
    groups for ``preference``."""
    if shape in ("ml1m-eval", "orderings"):
        return len(batch[0]) // 2
    if shape == "both-orders":
        return len(batch[0]) // 4
    return len(set(batch[2]))


def run_method(method: str, model, tokenizer, batch: Batch, batch_size: int, naive_batch_size: int):
    prompts, completions, groups = batch
    if method == "shared":
        kwargs = {"group_ids": groups, "batch_size": batch_size}
    elif method == "per-prompt":
        kwargs = {"group_ids": default_group_ids(prompts), "batch_size": batch_size}
    elif method == "single":
        kwargs = {"group_ids": list(range(len(prompts))), "batch_size": naive_batch_size}
    else:
        kwargs = {"shared_prefix": False, "batch_size": naive_batch_size}
    return score_completions(model, tokenizer, prompts, completions, **kwargs)


def add_scoring_args(parser: argparse.ArgumentParser, shapes: str, methods: str) -> None:
    """This module's flags (besides the common ones), with the given defaults."""
    parser.add_argument("--batch-size", type=int, default=8, help="groups per forward (shared)")
    parser.add_argument(
        "--naive-batch-size",
        type=int,
        default=8,
        help="sequences per forward (naive, single); naive holds full-vocabulary logits",
    )
    parser.add_argument("--shapes", type=choice_list(SHAPES), default=shapes.split(","))
    parser.add_argument("--methods", type=choice_list(METHODS), default=methods.split(","))


def measure_shape(
    args, rec: Recorder, model, tokenizer, shape: str, n_groups: int
) -> dict[str, list[float]]:
    """Warm up, check agreement, time every method interleaved; returns the seconds of
    each method's repetitions."""
    device = next(model.parameters()).device
    batch = BUILDERS[shape](args.data, n_groups)
    n_seq, n_groups, n_ex = len(batch[0]), len(set(batch[2])), n_examples(shape, batch)
    base = {"shape": shape, "groups": n_groups, "examples": n_ex, "sequences": n_seq}

    def call(method: str):
        return run_method(method, model, tokenizer, batch, args.batch_size, args.naive_batch_size)

    reference = None
    for method in args.methods:  # warm-up, and a check that every method agrees
        seconds, scores, memory = measured(lambda m=method: call(m), device)
        logps = scores.logps.float().cpu()
        reference = logps if reference is None else reference
        rec.emit({**base, "method": method, "warmup": True, "seconds": round(seconds, 4),
                  "max_abs_diff_vs_first": (logps - reference).abs().max().item(), **memory})
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for rep, method in interleaved(args.methods, args.reps):
        seconds, _, memory = measured(lambda m=method: call(m), device)
        times[method].append(seconds)
        rec.emit({**base, "method": method, "rep": rep, "seconds": round(seconds, 4),
                  "examples_per_s": round(n_ex / seconds, 3),
                  "sequences_per_s": round(n_seq / seconds, 3), **memory})
    for method, ts in times.items():
        stats = spread(ts)
        rec.emit({**base, "method": method, "summary": True, **stats,
                  "sequences_per_group": round(n_seq / n_groups, 2),
                  "groups_per_s": round(n_groups / stats["median_s"], 3),
                  "examples_per_s": round(n_ex / stats["median_s"], 3),
                  "sequences_per_s": round(n_seq / stats["median_s"], 3)})
    return times


def speedup_fields(times: dict[str, list[float]], method: str) -> dict[str, float]:
    """``method`` against ``shared``: ratio of medians and per-repetition paired ratios."""
    paired = paired_ratios(times[method], times["shared"])
    return {
        f"{method}_over_shared": ratio(spread(times[method])["median_s"],
                                       spread(times["shared"])["median_s"]),
        **{f"{method}_over_shared_{key}": value for key, value in paired.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, groups=16, reps=3)
    add_scoring_args(parser, "orderings,preference,lastfm", "shared,naive")
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    with Recorder(args.out) as rec:
        rec.emit(header("bench_scoring", args, model))
        times = {s: measure_shape(args, rec, model, tokenizer, s, args.groups) for s in args.shapes}
        speedups = {
            f"{shape}:{key}": value
            for shape in args.shapes
            for method in args.methods
            if method != "shared" and "shared" in args.methods
            for key, value in speedup_fields(times[shape], method).items()
        }
        rec.emit({"final": True, "groups": args.groups, "reps": args.reps, "speedup": speedups})


if __name__ == "__main__":
    main()
