"""Training examples per second: user-packed rows (``--pack-by-user``) vs one row per example.

Data: the DMPO protocol on raw MovieLens-100K with fixed training histories
(``train_history``, the data ``--pack-by-user`` is for): each benchmark user has one
history of their first ``--train-history`` liked titles and 64 SFT pairs and 64 preference
groups (K = ``--k``) drawn from the liked items after it. ``--per-target P`` gives every
target its own history instead (the ``--train-history`` liked titles just before it, the
eval protocol's) and draws P SFT pairs per target (``train_block=1``,
``pairs_per_history=P``): a user's row then shares the prompt header and each target's
history among that target's P pairs. At each point of ``--examples``
(examples per user) every method trains one optimizer step on the same users' first E
pairs (SFT) or groups (align):

- ``unpacked`` (the path before packing; SFT has since moved to the scorer's loss, which
  ``--pack-size 1`` measures): SFT through ``transformers.Trainer``'s causal-LM loss on
  right-padded sequences, align through ``AlignTrainer`` with one packed row per group
  (its K prompts already share the history inside the group); ``--micro`` sequences or
  groups per forward, gradients accumulated.
- ``packed``: a user's examples in one row (at most ``--pack-size`` examples per row;
  ``PackedSFTTrainer`` / ``AlignTrainer`` with user units), one row per forward
  (``--batch-size 1``, gradients accumulated; SFT: ``--packed-rows`` rows per forward):
  the history runs once per row.

One timed step = collate + forward + loss + backward over the E examples of every user,
then ``optimizer.step()`` and ``zero_grad()``. After a warm-up per (stage, E, method),
the methods run interleaved in ABBA order per repetition. Rows report seconds, examples
per second, tokens through the decoder per example, the loss and the memory peaks;
summaries the medians and the packed / unpacked speedups (ratio of medians and paired).

    python benchmarks/bench_packing.py --threads 1 --dtype bfloat16 --reps 3 \\
        --out results/bench_packing_cpu.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
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
from transformers import Trainer, TrainingArguments

from prefrec.data.prompts import model_input
from prefrec.data.protocols import DMPOConfig, build_dmpo
from prefrec.data.raw import read_movielens_100k
from prefrec.data.schema import PairwiseExample
from prefrec.data.titles import history_user_key
from prefrec.scoring import pack_group, tokenize_items
from prefrec.train.align import AlignTrainer, GroupDataset, build_groups, collate_groups
from prefrec.train.common import pack_units
from prefrec.train.config import AlignConfig
from prefrec.train.sft import (
    PackedSFTTrainer,
    collate_packed_sft,
    collate_sft,
    sft_features,
    sft_pairs,
    user_packed_units,
)

METHODS = ("unpacked", "packed")
STAGES = ("sft", "align")
TEMPLATE = "alpaca"
PER_USER = 64  # examples drawn per benchmark user; --examples points take a prefix


# --------------------------------------------------------------------------- data


def benchmark_users(data: Path, n_users: int, k: int, train_history: int, per_target: int = 0):
    """SFT pairs and DPO rows of the first ``n_users`` users that have ``PER_USER`` of each.

    Every qualifying user is built (sampling ``PER_USER`` pairs and groups each); users with
    fewer targets after the fixed history are skipped.
    """
    log = read_movielens_100k(data / "ml-100k")
    config = DMPOConfig(n_sft_users=900, n_dpo_users=900, n_eval_users=0,
                        max_interactions=None, max_negatives=k, min_negatives=max(k, 5),
                        pairs_per_user=PER_USER, groups_per_user=PER_USER,
                        max_history=train_history, train_history=train_history,
                        train_block=1 if per_target else None,
                        pairs_per_history=per_target or None)
    built = build_dmpo(log, config)
    sft: dict[str, list[PairwiseExample]] = {}
    for ex in built.sft:
        sft.setdefault(ex.user, []).append(ex)
    dpo: dict[str, list[PairwiseExample]] = {}
    for ex in built.dpo[k]:
        dpo.setdefault(ex.user, []).append(ex)
    users = [u for u in sft if len(sft[u]) == PER_USER and len(dpo.get(u, [])) == PER_USER * k]
    if len(users) < n_users:
        raise SystemExit(f"only {len(users)} users have {PER_USER} pairs and groups")
    sft_rows, dpo_rows = [sft[u] for u in users[:n_users]], [dpo[u] for u in users[:n_users]]
    if per_target:
        # Keyed as the training files key them when read back (the history), so a row
        # packs one target's pairs, as in training, not a user's many targets.
        def keyed(rows):
            return [dataclasses.replace(ex, user=history_user_key(ex.history)) for ex in rows]

        sft_rows, dpo_rows = [keyed(r) for r in sft_rows], [keyed(r) for r in dpo_rows]
    return sft_rows, dpo_rows


# --------------------------------------------------------------------------- one step


def _args(tmp: Path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp), use_cpu=not torch.cuda.is_available(),
                             report_to=[], remove_unused_columns=False, label_names=[])


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Stepper:
    """One optimizer step of a stage on a list of examples, packed or unpacked."""

    def __init__(self, model, tokenizer, tmp: Path, micro: int, pack_size: int,
                 packed_rows: int = 1) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.micro, self.pack_size, self.packed_rows = micro, pack_size, packed_rows
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-5
        )
        self.plain = Trainer(model=model, args=_args(tmp / "plain"))
        self.packed_sft = PackedSFTTrainer(model=model, args=_args(tmp / "sft"),
                                           processing_class=tokenizer, template=TEMPLATE,
                                           max_length=1024)
        self.align = AlignTrainer(model=model, args=_args(tmp / "align"),
                                  processing_class=tokenizer,
                                  align=AlignConfig(data="-", out="-", loss="dmpo"),
                                  template=TEMPLATE)

    def _backward(self, trainer, batches: list[dict]) -> float:
        total = 0.0
        for batch in batches:
            loss = trainer.compute_loss(self.model, batch) / len(batches)
            loss.backward()
            total += float(loss.detach())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def sft(self, method: str, rows: list[PairwiseExample]) -> float:
        pairs = sft_pairs(rows)
        if method == "packed":
            units = user_packed_units(rows, pairs, self.pack_size)
            return self._backward(self.packed_sft, [collate_packed_sft(list(c))
                                                    for c in _chunks(units, self.packed_rows)])
        feats = sft_features(self.tokenizer, pairs, TEMPLATE, 1024)
        pad = self.tokenizer.pad_token_id
        return self._backward(self.plain, [collate_sft(list(c), pad)
                                           for c in _chunks(feats, self.micro)])

    def align_step(self, method: str, rows: list[PairwiseExample]) -> float:
        n, make_group, keys = build_groups(rows, None, 0, resample=False)
        ref = dict.fromkeys(keys, (0.0, 1))  # the reference changes no computation
        users = [make_group(i, 0).user for i in range(n)]
        if method == "packed":
            units = pack_units(users, self.pack_size)
            dataset = GroupDataset(n, make_group, units)
            return self._backward(self.align, [collate_groups([dataset[i]], ref)
                                               for i in range(len(dataset))])
        dataset = GroupDataset(n, make_group)
        batches = [collate_groups([dataset[i] for i in chunk], ref)
                   for chunk in _chunks(range(len(dataset)), self.micro)]
        return self._backward(self.align, batches)


def tokens_per_example(method: str, stage: str, tokenizer, rows, pack_size: int) -> float:
    """Tokens each method runs through the decoder per training example (padding aside)."""
    if stage == "sft":
        items = tokenize_items(tokenizer, [model_input(ex.prompt) for ex in rows],
                               [ex.chosen for ex in rows])
        if method == "unpacked":
            return sum(len(it.ids) for it in items) / len(rows)
        units = pack_units([ex.user for ex in rows], pack_size)
        return sum(len(pack_group(items, u).ids) for u in units) / len(rows)
    n, make_group, _ = build_groups(rows, None, 0, resample=False)
    groups = [make_group(i, 0) for i in range(n)]
    units = (pack_units([g.user for g in groups], pack_size) if method == "packed"
             else [[i] for i in range(n)])
    total = 0
    for unit in units:
        completions = [c for i in unit for c in groups[i].completions()]
        items = tokenize_items(tokenizer, [model_input(c.prompt) for c in completions],
                               [c.completion for c in completions])
        total += len(pack_group(items, list(range(len(items)))).ids)
    return total / n


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, groups=1, reps=3)
    parser.add_argument("--examples", type=int_list, default=[4, 16, 64],
                        help="examples (SFT pairs / preference groups) per user, at most 64")
    parser.add_argument("--stages", type=choice_list(STAGES), default=list(STAGES))
    parser.add_argument("--methods", type=choice_list(METHODS), default=list(METHODS))
    parser.add_argument("--k", type=int, default=3, help="negatives per preference group")
    parser.add_argument("--micro", type=int, default=8,
                        help="unpacked: sequences (SFT) or groups (align) per forward")
    parser.add_argument("--pack-size", type=int, default=16,
                        help="packed: most examples per row (--pack-size of the trainers)")
    parser.add_argument("--train-history", type=int, default=10, help="fixed history length")
    parser.add_argument("--packed-rows", type=int, default=1,
                        help="packed SFT: rows per forward (--batch-size of the trainer; "
                             "per-target rows are short, so batch them) (default: 1)")
    parser.add_argument("--per-target", type=int, default=0,
                        help="P > 0: per-target histories with P SFT pairs per target "
                             "(default: 0, one fixed history per user)")
    parser.add_argument("--tmp", type=Path, default=Path("runs/bench_packing"))
    args = parser.parse_args(argv)
    if max(args.examples) > PER_USER:
        parser.error(f"--examples: at most {PER_USER} per user")
    setup_threads(args.threads)

    from prefrec.model import LoraSettings, attach_lora, load

    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    torch.manual_seed(0)
    model = attach_lora(model, LoraSettings()).train()
    sft_users, dpo_users = benchmark_users(args.data, args.groups, args.k, args.train_history,
                                           args.per_target)
    stepper = Stepper(model, tokenizer, args.tmp, args.micro, args.pack_size, args.packed_rows)
    device = next(model.parameters()).device

    with Recorder(args.out) as rec:
        rec.emit(header("bench_packing", args, model) | {
            "k": args.k, "micro": args.micro, "pack_size": args.pack_size,
            "packed_rows": args.packed_rows,
            "train_history": args.train_history, "per_target": args.per_target,
            "users": args.groups,
        })
        for stage in args.stages:
            for e in args.examples:
                if stage == "sft":
                    rows = [ex for u in sft_users for ex in u[:e]]
                    step = stepper.sft
                else:
                    rows = [ex for u in dpo_users for ex in u[: e * args.k]]
                    step = stepper.align_step
                n_examples = e * args.groups
                tokens = {m: tokens_per_example(m, stage, tokenizer, rows, args.pack_size)
                          for m in args.methods}
                for method in args.methods:  # warm-up
                    step(method, rows)
                times: dict[str, list[float]] = {m: [] for m in args.methods}
                for rep, method in interleaved(args.methods, args.reps):
                    seconds, loss, memory = measured(lambda m=method, f=step, r=rows: f(m, r), device)
                    times[method].append(seconds)
                    rec.emit({"stage": stage, "examples_per_user": e, "method": method,
                              "rep": rep, "seconds": round(seconds, 4),
                              "examples_per_s": round(n_examples / seconds, 3),
                              "tokens_per_example": round(tokens[method], 1),
                              "loss": round(loss, 5), **memory})
                for method in args.methods:
                    med = spread(times[method])
                    rec.emit({"summary": True, "stage": stage, "examples_per_user": e,
                              "method": method, **med,
                              "examples_per_s": round(n_examples / med["median_s"], 3),
                              "tokens_per_example": round(tokens[method], 1)})
                if set(METHODS) <= set(args.methods):
                    rec.emit({"speedup": True, "stage": stage, "examples_per_user": e,
                              "packed_vs_unpacked": ratio(
                                  spread(times["unpacked"])["median_s"],
                                  spread(times["packed"])["median_s"]),
                              **paired_ratios(times["unpacked"], times["packed"])})


if __name__ == "__main__":
    main()
