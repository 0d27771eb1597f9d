"""Preference-training throughput: prefrec's AlignTrainer against TRL's DPOTrainer.

Data: DMPO ML-1M ``dpo_ranking_K`` (``ml1m-dpo-K``), K negatives per user. One preference
group (a user, the chosen ordering and K rejected ones) is what one DMPO/S-DPO loss term
consumes; TRL, which knows only pairs, gets the same user's K pairwise rows
(``schema.trl_rows``), and its sigmoid loss averaged over them is prefrec's ``dpo`` loss.

Both sides get the same model (``--model``, loaded fresh per side and setting), the same
LoRA adapter (``LoraSettings()`` defaults: r=16, alpha=32, dropout 0.05, all linear
layers), AdamW at the same learning rate, the same groups in the same order, and
*precomputed* reference log-probs (TRL: ``precompute_ref_log_probs=True``; prefrec: its
cached ``reference_logps``), so no reference forward runs inside a timed step. The
reference is the base model with the adapter disabled, on both sides. A setting is
``G`` groups per optimizer step: prefrec steps on G groups, TRL on the G*K rows of the
same users. prefrec runs with ``ftx=0`` (no SFT term), TRL with ``loss_type=["sigmoid"]``.

One timed step = collate the batch + ``Trainer.training_step`` (forward, loss, backward)
+ gradient clipping + ``optimizer.step()`` + ``zero_grad``, driven by the same code for
both trainers (no ``trainer.train()``: that would add data-loader, logging and
checkpoint work of different sizes). After one warm-up step per method, each repetition
runs ``--steps`` steps of every method, interleaved in ABBA order. Also reported: the
one-off reference precompute (prefrec: shared-prefix scoring of the unique completions;
TRL: ``DPOTrainer.__init__``, i.e. tokenising the rows + its precompute pass) and the
tokens each side feeds the model per group.

Memory (``--memory-ks``): each method's peak RSS from a fresh subprocess that loads the
model and runs one warm-up and one timed step of that method only (``--probe``); on CUDA
also ``torch.cuda.max_memory_allocated`` per timed step, in-process.

    python benchmarks/bench_align_vs_trl.py --threads 1 --ks 1,3,5 --batch-groups 1,2 \\
        --reps 3 --out results/bench_align_vs_trl_cpu.jsonl
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from common import (
    Recorder,
    add_common_args,
    choice_list,
    current_rss_mb,
    header,
    int_list,
    interleaved,
    measured,
    memory_fields,
    paired_ratios,
    probe_args,
    ratio,
    run_isolated,
    setup_threads,
    spread,
    timed,
)

LOSSES = ("dmpo", "dpo", "sdpo")
TRL = "trl"
BETA, LR, MAX_LENGTH, SEED = 0.1, 5e-5, 1024, 0


def pairwise_rows(data: Path, k: int, n_groups: int):
    """The first ``n_groups`` users' rows of ML-1M ``dpo_ranking_k``."""
    from prefrec.data.formats import load_examples
    from prefrec.data.resolve import resolve_dataset
    from prefrec.train.align import limit_examples

    examples = load_examples(resolve_dataset(f"ml1m-dpo-{k}", data_dir=str(data)))
    return limit_examples(examples, n_groups)


def batch_indices(step: int, per_step: int, n: int) -> list[int]:
    """Group indices of optimizer step ``step`` (G per step, cycling over n groups)."""
    return [(step * per_step + j) % n for j in range(per_step)]


def optimizer_step(trainer, batches: Sequence[dict[str, Any]]) -> float:
    """One optimizer step the way ``Trainer`` takes it, gradients accumulated over
    ``batches`` (micro-batches); returns the loss."""
    trainer.current_gradient_accumulation_steps = len(batches)
    loss = sum(float(trainer.training_step(trainer.model, b).detach()) for b in batches)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)
    return loss


def _ready(trainer):
    """Build the optimizer and the state ``training_step`` reads outside ``train()``."""
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


class OursSide:
    """prefrec's AlignTrainer, one per loss, on one LoRA policy."""

    def __init__(self, args, examples, k: int, per_step: int, losses: Sequence[str], tmp: Path):
        from transformers import set_seed

        from prefrec.model import LoraSettings, attach_lora, load
        from prefrec.train.align import (
            AlignTrainer,
            GroupDataset,
            build_groups,
            collate_groups,
            reference_logps,
        )
        from prefrec.train.common import training_arguments
        from prefrec.train.config import AlignConfig

        model, self.tokenizer = load(args.model, dtype=args.dtype, device=args.device)
        self.device = next(model.parameters()).device
        set_seed(SEED)
        policy = attach_lora(model, LoraSettings())
        self.n, self.make_group, keys = build_groups(examples, k, SEED, resample=False)
        self.per_step = per_step
        with policy.disable_adapter():  # the reference: the base model, as TRL's
            self.ref_seconds, self.ref = timed(
                lambda: reference_logps(
                    policy, self.tokenizer, keys, "alpaca", tmp / "ref.safetensors", per_step
                ),
                self.device,
            )
        self.collate = collate_groups
        self.trainers = {}
        for loss in losses:
            cfg = AlignConfig(
                data="bench", out=str(tmp), loss=loss, beta=BETA, ftx=0.0, negatives=k, lr=LR,
                batch_size=per_step, max_length=MAX_LENGTH, bf16=False, seed=SEED,
            )
            self.trainers[loss] = _ready(
                AlignTrainer(
                    model=policy,
                    args=training_arguments(cfg, tmp / loss, self.device.type == "cuda"),
                    train_dataset=GroupDataset(self.n, self.make_group),
                    data_collator=lambda b: collate_groups(b, self.ref),
                    processing_class=self.tokenizer,
                    align=cfg,
                    template="alpaca",
                )
            )

    def batch(self, step: int) -> dict[str, Any]:
        groups = [{"groups": [self.make_group(i, 0)]} for i in batch_indices(step, self.per_step, self.n)]
        return self.collate(groups, self.ref)

    def step(self, loss: str, step: int) -> float:
        return optimizer_step(self.trainers[loss], [self.batch(step)])

    def tokens_per_group(self, step: int) -> float:
        """Tokens in the packed rows (the shared history counted once per group)."""
        from prefrec.data.prompts import model_input
        from prefrec.scoring import pack_group, tokenize_items

        groups = self.batch(step)["groups"]
        total = 0
        for g in groups:
            items = tokenize_items(
                self.tokenizer,
                [model_input(c.prompt) for c in g.completions()],
                [c.completion for c in g.completions()],
            )
            total += len(pack_group(items, list(range(len(items)))).ids)
        return total / len(groups)


class TrlSide:
    """TRL's DPOTrainer on the same users' pairwise rows (K rows per group).

    A step covers the G*K rows of G groups, in micro-batches of ``micro_rows`` rows whose
    gradients are accumulated (0: all rows in one forward).
    """

    def __init__(self, args, examples, k: int, per_step: int, tmp: Path, micro_rows: int = 0):
        from datasets import Dataset
        from transformers import set_seed
        from trl import DPOConfig, DPOTrainer

        from prefrec.data.prompts import model_input
        from prefrec.model import LoraSettings, load
        from prefrec.train.align import build_groups

        model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
        self.device = next(model.parameters()).device
        n, make_group, _ = build_groups(examples, k, SEED, resample=False)
        # Group i's rows: the first k rows of its user, in file order (as build_groups keeps).
        rows, self.group_rows = [], []
        for i in range(n):
            user = make_group(i, 0).user
            mine = [ex for ex in examples if ex.user == user][:k]
            self.group_rows.append(list(range(len(rows), len(rows) + len(mine))))
            rows += [
                {"prompt": model_input(ex.prompt), "chosen": ex.chosen, "rejected": ex.rejected}
                for ex in mine
            ]
        self.n, self.per_step = n, per_step
        self.micro_rows = micro_rows or per_step * k
        config = DPOConfig(
            output_dir=str(tmp / "trl"),
            beta=BETA,
            loss_type=["sigmoid"],
            learning_rate=LR,
            per_device_train_batch_size=self.micro_rows,
            gradient_accumulation_steps=-(-per_step * k // self.micro_rows),
            max_length=MAX_LENGTH,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=self.micro_rows,
            report_to="none",
            use_cpu=self.device.type == "cpu",
            bf16=False,
            seed=SEED,
        )
        set_seed(SEED)
        self.ref_seconds, self.trainer = timed(
            lambda: DPOTrainer(
                model=model,
                args=config,
                train_dataset=Dataset.from_list(rows),
                processing_class=tokenizer,
                peft_config=LoraSettings().to_peft(),
            ),
            self.device,
        )
        _ready(self.trainer)
        self.dataset = self.trainer.train_dataset

    def batches(self, step: int) -> list[dict[str, Any]]:
        idx = [r for g in batch_indices(step, self.per_step, self.n) for r in self.group_rows[g]]
        chunks = [idx[i : i + self.micro_rows] for i in range(0, len(idx), self.micro_rows)]
        return [self.trainer.data_collator([self.dataset[r] for r in c]) for c in chunks]

    def step(self, step: int) -> float:
        return optimizer_step(self.trainer, self.batches(step))

    def tokens_per_group(self, step: int) -> float:
        """Non-padding tokens of the chosen and rejected sequences, per group."""
        return sum(int(b["attention_mask"].sum()) for b in self.batches(step)) / self.per_step


def measure_setting(args, rec: Recorder, k: int, per_step: int, methods: list[str]) -> None:
    """Warm up and time every method at one (K, G) setting; emit rows and summaries."""
    examples = pairwise_rows(args.data, k, args.groups)
    losses = [m.removeprefix("ours-") for m in methods if m.startswith("ours-")]
    with tempfile.TemporaryDirectory(prefix="bench_align_") as tmp_name:
        tmp = Path(tmp_name)
        ours = OursSide(args, examples, k, per_step, losses, tmp) if losses else None
        trl = (TrlSide(args, examples, k, per_step, tmp, args.trl_micro_rows)
               if TRL in methods else None)
        side = ours or trl
        device, n = side.device, side.n
        base = {"k": k, "groups_per_step": per_step, "n_groups": n}
        if trl is not None:
            base["trl_rows_per_forward"] = trl.micro_rows
        for name, obj in (("ours", ours), (TRL, trl)):
            if obj is not None:
                rec.emit({**base, "ref_precompute": True, "side": name,
                          "seconds": round(obj.ref_seconds, 3),
                          "tokens_per_group": obj.tokens_per_group(0)})

        steppers = {
            m: (trl.step if m == TRL else partial(ours.step, m.removeprefix("ours-")))
            for m in methods
        }

        counters = dict.fromkeys(methods, 0)  # every method walks the same groups in order
        for method in methods:  # warm-up
            seconds, loss, memory = measured(lambda m=method: steppers[m](counters[m]), device)
            counters[method] += 1
            rec.emit({**base, "method": method, "warmup": True, "seconds": round(seconds, 3),
                      "loss": round(loss, 5), **memory})
        per_group: dict[str, list[float]] = {m: [] for m in methods}
        for rep, method in interleaved(methods, args.reps):
            for _ in range(args.steps):
                seconds, loss, memory = measured(lambda m=method: steppers[m](counters[m]), device)
                counters[method] += 1
                per_group[method].append(seconds / per_step)
                rec.emit({**base, "method": method, "rep": rep, "seconds": round(seconds, 3),
                          "s_per_group": round(seconds / per_step, 3), "loss": round(loss, 5),
                          **memory})
        for method, values in per_group.items():
            rec.emit({**base, "method": method, "summary": True,
                      **{f"s_per_group_{key}": value for key, value in spread(values).items()},
                      "groups_per_s": round(1 / spread(values)["median_s"], 4)})
        if TRL in methods:
            for method in methods:
                if method != TRL:
                    paired = paired_ratios(per_group[TRL], per_group[method])
                    rec.emit({**base, "speedup": True, "method": method,
                              "trl_over_ours": ratio(spread(per_group[TRL])["median_s"],
                                                     spread(per_group[method])["median_s"]),
                              **{f"trl_over_ours_{key}": v for key, v in paired.items()}})


def probe(args) -> None:
    """Child process: one method at one setting, warm-up + one step; print its peaks."""
    method, k, per_step = args.probe, args.ks[0], args.batch_groups[0]
    examples = pairwise_rows(args.data, k, args.groups)
    with tempfile.TemporaryDirectory(prefix="bench_align_probe_") as tmp_name:
        tmp = Path(tmp_name)
        if method == TRL:
            side = TrlSide(args, examples, k, per_step, tmp, args.trl_micro_rows)
            run = side.step
        else:
            side = OursSide(args, examples, k, per_step, [method.removeprefix("ours-")], tmp)
            run = lambda s: side.step(method.removeprefix("ours-"), s)  # noqa: E731
        rss_ready = current_rss_mb()
        if side.device.type == "cuda":  # RSS keeps its peak: the whole child's is wanted
            torch.cuda.reset_peak_memory_stats(side.device)
        run(0)
        run(1)
        print(__import__("json").dumps({"probe": True, "method": method, "k": k,
                                         "groups_per_step": per_step,
                                         "rss_before_steps_mb": rss_ready,
                                         **memory_fields(side.device)}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, groups=8, reps=3)
    methods = [f"ours-{loss}" for loss in LOSSES] + [TRL]
    parser.add_argument("--ks", type=int_list, default=[1, 3, 5], help="negatives per group")
    parser.add_argument("--batch-groups", type=int_list, default=[1, 2],
                        help="groups per optimizer step (TRL: K times as many rows)")
    parser.add_argument("--methods", type=choice_list(methods), default=methods)
    parser.add_argument("--trl-micro-rows", type=int, default=0,
                        help="TRL rows per forward, gradients accumulated up to the step's "
                        "G*K rows (0: all in one forward; 1 bounds memory on CPU)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per method per rep")
    parser.add_argument("--memory-ks", type=int_list, default=[3],
                        help="K values whose per-method peak memory is probed in subprocesses "
                        "(empty: none)")
    parser.add_argument("--probe", choices=methods, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    if args.probe:
        probe(args)
        return
    with Recorder(args.out) as rec:
        rec.emit(header("bench_align_vs_trl", args) | {
            "lora": "r=16 alpha=32 dropout=0.05 all-linear", "beta": BETA, "lr": LR,
            "max_length": MAX_LENGTH, "reference": "precomputed on both sides (TRL: "
            "precompute_ref_log_probs=True)", "ours_ftx": 0.0, "trl_loss_type": "sigmoid",
            "dtype": args.dtype or "auto", "device": args.device or "auto"})
        for k in args.ks:
            for per_step in args.batch_groups:
                measure_setting(args, rec, k, per_step, args.methods)
                gc.collect()  # free this setting's models before the next loads
        script = Path(__file__).resolve()
        for k in args.memory_ks:
            for per_step in args.batch_groups:
                for method in [m for m in args.methods if m in ("ours-dmpo", TRL)]:
                    rows = run_isolated(script, [*probe_args(args), "--probe", method,
                                                 "--trl-micro-rows", str(args.trl_micro_rows),
                                                 "--ks", str(k), "--batch-groups", str(per_step),
                                                 "--groups", str(2 * per_step)])
                    rec.emit({**next(r for r in rows if r.get("probe")), "memory": True,
                              "how": "fresh subprocess: load + reference + 2 steps"})


if __name__ == "__main__":
    main()
