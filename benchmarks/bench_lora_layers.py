"""Training examples per second: LoRA on every decoder layer vs on the last N (``--lora-layers``).

With LoRA only on the last N layers nothing below them needs a gradient, so autograd keeps
no activations there and the backward pass stops at the lowest adapted layer. This measures
what that buys on the CPU training protocol (per-target histories packed per target,
``bench_packing.py --per-target``): one model per setting, each with the same seeded LoRA
init on the same users' rows, every setting one optimizer step of ``--examples`` SFT pairs
(or preference groups) per user, the settings interleaved in ABBA order per repetition
after a warm-up each. Rows as in ``bench_packing.py``; the summaries give each setting's
median and its speedup over ``all`` (ratio of medians and paired per repetition).

    python benchmarks/bench_lora_layers.py --threads 1 --dtype bfloat16 --layers 15,8 \\
        --out results/bench_lora_layers_cpu.jsonl
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from bench_packing import Stepper, benchmark_users
from common import (
    Recorder,
    add_common_args,
    choice_list,
    header,
    int_list,
    interleaved,
    measured,
    paired_ratios,
    ratio,
    setup_threads,
    spread,
)

STAGES = ("sft", "align")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, groups=4, reps=5)
    parser.add_argument("--layers", type=int_list, default=[15, 8],
                        help="LoRA on the last N decoder layers, compared with all of them")
    parser.add_argument("--examples", type=int, default=8, help="SFT pairs / groups per user")
    parser.add_argument("--per-target", type=int, default=2,
                        help="pairs per target history (bench_packing.py --per-target)")
    parser.add_argument("--stages", type=choice_list(STAGES), default=list(STAGES))
    parser.add_argument("--k", type=int, default=3, help="negatives per preference group")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank")
    parser.add_argument("--pack-size", type=int, default=16)
    parser.add_argument("--tmp", type=Path, default=Path("runs/bench_lora_layers"))
    args = parser.parse_args(argv)
    setup_threads(args.threads)

    from prefrec.model import LoraSettings, attach_lora, load

    base, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    settings = {"all": None, **{str(n): n for n in args.layers}}
    steppers = {}
    for name, layers in settings.items():
        torch.manual_seed(0)
        model = attach_lora(copy.deepcopy(base), LoraSettings(r=args.rank, alpha=2 * args.rank,
                                                                layers=layers)).train()
        steppers[name] = Stepper(model, tokenizer, args.tmp / name, micro=1,
                                 pack_size=args.pack_size)
    del base
    sft_users, dpo_users = benchmark_users(args.data, args.groups, args.k, 10, args.per_target)
    device = next(steppers["all"].model.parameters()).device
    methods = list(settings)

    with Recorder(args.out) as rec:
        rec.emit(header("bench_lora_layers", args, steppers["all"].model) | {
            "layers": args.layers, "examples_per_user": args.examples, "rank": args.rank,
            "per_target": args.per_target, "k": args.k, "users": args.groups,
            "trainable": {n: s.model.get_nb_trainable_parameters()[0]
                          for n, s in steppers.items()},
        })
        for stage in args.stages:
            if stage == "sft":
                rows = [ex for u in sft_users for ex in u[: args.examples]]
            else:
                rows = [ex for u in dpo_users for ex in u[: args.examples * args.k]]

            def step(name: str, stage: str = stage, rows: list = rows) -> float:
                s = steppers[name]
                return s.sft("packed", rows) if stage == "sft" else s.align_step("packed", rows)

            for name in methods:  # warm-up
                step(name)
            n_examples = args.examples * args.groups
            times: dict[str, list[float]] = {m: [] for m in methods}
            for rep, name in interleaved(methods, args.reps):
                seconds, loss, memory = measured(lambda n=name: step(n), device)
                times[name].append(seconds)
                rec.emit({"stage": stage, "lora_layers": name, "rep": rep,
                          "seconds": round(seconds, 4),
                          "examples_per_s": round(n_examples / seconds, 3),
                          "loss": round(loss, 5), **memory})
            for name in methods:
                med = spread(times[name])
                summary = {"summary": True, "stage": stage, "lora_layers": name, **med,
                           "examples_per_s": round(n_examples / med["median_s"], 3)}
                if name != "all":
                    summary |= {"speedup_vs_all": ratio(spread(times["all"])["median_s"],
                                                        med["median_s"]),
                                **paired_ratios(times["all"], times[name])}
                rec.emit(summary)


if __name__ == "__main__":
    main()
