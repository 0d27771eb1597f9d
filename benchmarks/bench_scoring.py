"""Time shared-prefix scoring against naive per-sequence scoring on real data (no grad).

Group shapes:

- ``orderings``: DMPO ML-1M ``dpo_ranking_3``, per user the 3 prompts x 2 orderings
  = 6 sequences (what pairwise evaluation scores).
- ``preference``: the same users as training groups, chosen + 3 rejected = 4 sequences,
  each negative under its own prompt (what DMPO training scores).
- ``lastfm``: S-DPO LastFM, one prompt and its 20 candidate titles = 20 sequences.

Methods: ``shared`` (score_completions, default), ``naive`` (shared_prefix=False, every
sequence alone through ``model(...)``) and optionally ``single`` (shared path with every
sequence its own group: vocabulary head at completion positions only, no prefix sharing),
which splits the gain between its two causes.

After a warm-up, repetitions alternate between methods so that machine load hits all of
them alike. Output is JSON lines: one per measurement, one summary per (shape, method)
with median/min/max, and a final line with the speedups (naive median / shared median).
``peak_rss_mb`` is the process's peak resident memory so far (``resource.getrusage``).

    python benchmarks/bench_scoring.py --groups 16 --reps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from prefrec.data.dmpo import read_dmpo
from prefrec.data.prompts import model_input
from prefrec.data.schema import group_pairs_by_user
from prefrec.data.sdpo import read_sdpo
from prefrec.model import load
from prefrec.scoring import score_completions

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAPES = ("orderings", "preference", "lastfm")
METHODS = ("shared", "naive", "single")


def orderings_batch(data: Path, n_groups: int):
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


def preference_batch(data: Path, n_groups: int):
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


def lastfm_batch(data: Path, n_groups: int):
    """Per record: one selection prompt and each of its 20 candidates as a completion."""
    prompts, completions, groups = [], [], []
    for i, ex in enumerate(read_sdpo(data / "sdpo-lastfm" / "lastfm-val.json")[:n_groups]):
        for candidate in ex.candidates:
            prompts.append(model_input(ex.prompt))
            completions.append(ex.completion_for(candidate))
            groups.append(i)
    return prompts, completions, groups


BUILDERS = {"orderings": orderings_batch, "preference": preference_batch, "lastfm": lastfm_batch}


def run_method(method: str, model, tokenizer, batch, batch_size: int, naive_batch_size: int):
    prompts, completions, groups = batch
    if method == "shared":
        kwargs = {"group_ids": groups, "batch_size": batch_size}
    elif method == "single":
        kwargs = {"group_ids": list(range(len(prompts))), "batch_size": naive_batch_size}
    else:
        kwargs = {"shared_prefix": False, "batch_size": naive_batch_size}
    return score_completions(model, tokenizer, prompts, completions, **kwargs)


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded name, dir or hub id")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shipped data folder")
    parser.add_argument("--groups", type=int, default=16, help="groups per shape")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per method")
    parser.add_argument("--batch-size", type=int, default=8, help="groups per forward (shared)")
    parser.add_argument(
        "--naive-batch-size",
        type=int,
        default=8,
        help="sequences per forward (naive, single); naive holds full-vocabulary logits",
    )
    parser.add_argument("--shapes", default="orderings,preference,lastfm")
    parser.add_argument("--methods", default="shared,naive", help=f"from {','.join(METHODS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda")
    args = parser.parse_args(argv)
    shapes, methods = args.shapes.split(","), args.methods.split(",")
    for name, allowed in ((shapes, SHAPES), (methods, METHODS)):
        unknown = set(name) - set(allowed)
        if unknown:
            parser.error(f"unknown {sorted(unknown)}; choose from {', '.join(allowed)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load(args.model, device=args.device)
    device = next(model.parameters()).device
    emit(
        {
            "model": args.model,
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype),
            "threads": torch.get_num_threads(),
            "attn": model.config._attn_implementation,
        }
    )
    summary = {}
    for shape in shapes:
        batch = BUILDERS[shape](args.data, args.groups)
        n_seq, n_groups = len(batch[0]), len(set(batch[2]))
        reference = None
        for method in methods:  # warm-up, and a check that every method agrees
            logps = run_method(
                method, model, tokenizer, batch, args.batch_size, args.naive_batch_size
            ).logps.cpu()
            reference = logps if reference is None else reference
            emit(
                {
                    "shape": shape,
                    "method": method,
                    "warmup": True,
                    "max_abs_diff_vs_first": (logps - reference).abs().max().item(),
                }
            )
        times: dict[str, list[float]] = {m: [] for m in methods}
        for rep in range(args.reps):
            for method in methods:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run_method(method, model, tokenizer, batch, args.batch_size, args.naive_batch_size)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                times[method].append(seconds)
                emit(
                    {
                        "shape": shape,
                        "method": method,
                        "rep": rep,
                        "groups": n_groups,
                        "sequences": n_seq,
                        "seconds": round(seconds, 4),
                        "groups_per_s": round(n_groups / seconds, 3),
                        "sequences_per_s": round(n_seq / seconds, 3),
                        "peak_rss_mb": round(peak_rss_mb(), 1),
                    }
                )
        for method, ts in times.items():
            med = statistics.median(ts)
            summary[(shape, method)] = med
            emit(
                {
                    "shape": shape,
                    "method": method,
                    "summary": True,
                    "sequences_per_group": n_seq / n_groups,
                    "median_s": round(med, 4),
                    "min_s": round(min(ts), 4),
                    "max_s": round(max(ts), 4),
                    "groups_per_s": round(n_groups / med, 3),
                    "sequences_per_s": round(n_seq / med, 3),
                    "peak_rss_mb": round(peak_rss_mb(), 1),
                }
            )
    speedups = {
        f"{shape}:{method}_over_shared": round(
            summary[(shape, method)] / summary[(shape, "shared")], 2
        )
        for shape in shapes
        for method in methods
        if method != "shared" and "shared" in methods
    }
    emit({"final": True, "groups": args.groups, "reps": args.reps, "speedup": speedups})


if __name__ == "__main__":
    main()
