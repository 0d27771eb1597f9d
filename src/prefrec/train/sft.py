"""SFT stage: LoRA fine-tuning on the preferred completion, loss on completion tokens only.

Built on ``transformers.Trainer``: gradient accumulation, the cosine schedule, mixed
precision, ``report_to``, checkpoints and resume come from the ecosystem. Prompt and
completion are tokenised exactly as the scorer tokenises them (``tokenize_items``),
so the SFT model is trained on the token sequences it is later scored on. The loss is
computed by the scorer too (:class:`PackedSFTTrainer`: one pair per row, or a user's pairs
that share a history in one packed row); :func:`sft_features` and :func:`collate_sft` give
the same loss through ``transformers``' causal-LM head, the reference the tests and
``benchmarks/bench_packing.py`` compare it with.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import Trainer

from prefrec.data.prompts import model_input
from prefrec.data.schema import PairwiseExample, SelectionExample
from prefrec.errors import PrefrecError
from prefrec.train.common import ItemProjectorLr
from prefrec.train.config import SFTConfig, config_from_args
from prefrec.train.distributed import is_main_process

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def sft_pairs(examples: Sequence[PairwiseExample | SelectionExample]) -> list[tuple[str, str]]:
    """(instruction, preferred completion) for every example."""
    pairs = []
    for ex in examples:
        if isinstance(ex, PairwiseExample):
            pairs.append((ex.prompt, ex.chosen))
        else:
            pairs.append((ex.prompt, ex.completion_for(ex.target)))
    return pairs


def sft_features(
    tokenizer, pairs: Sequence[tuple[str, str]], template: str, max_length: int
) -> list[dict[str, list[int]]]:
    """Token ids and labels; prompt positions are masked with -100 so only the completion
    (and its EOS) is learned. Tokenised by the scorer's :func:`tokenize_items`."""
    from prefrec.scoring import tokenize_items

    items = tokenize_items(
        tokenizer,
        [model_input(instruction, template, tokenizer) for instruction, _ in pairs],
        [completion for _, completion in pairs],
        max_length=max_length,
    )
    return [
        {
            "input_ids": list(item.ids),
            "labels": [IGNORE_INDEX] * item.n_prompt + list(item.ids[item.n_prompt :]),
        }
        for item in items
    ]


def collate_sft(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked in attention and labels."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def user_packed_units(
    examples: Sequence[PairwiseExample | SelectionExample],
    pairs: Sequence[tuple[str, str]],
    pack_size: int,
) -> list[dict[str, list[tuple[str, str]]]]:
    """The SFT pairs of each user in chunks of at most ``pack_size``: one packed row each."""
    from prefrec.train.common import pack_units

    return [
        {"pairs": [pairs[i] for i in unit]}
        for unit in pack_units([ex.user for ex in examples], pack_size)
    ]


def collate_packed_sft(batch: list[dict[str, list[tuple[str, str]]]]) -> dict[str, list]:
    """Packed units as the scorer's inputs: instructions, completions and the row of each."""
    pairs = [(p, c, row) for row, unit in enumerate(batch) for p, c in unit["pairs"]]
    return {
        "instructions": [p for p, _, _ in pairs],
        "completions": [c for _, c, _ in pairs],
        "rows": [row for _, _, row in pairs],
    }


class PackedSFTTrainer(ItemProjectorLr, Trainer):
    """``Trainer`` whose SFT loss scores each row's completions with the scorer: one pair,
    or a user's pairs that share a history in one packed row.

    The row is [history | suffix_1 | ... | suffix_m] under the scorer's block attention
    mask, so the loss equals the unpacked token-mean NLL on the same examples
    (:func:`prefrec.losses.sft_token_mean_loss`); only the history's compute is shared.
    """

    def __init__(self, *args, template: str, max_length: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.template = template
        self.max_length = max_length

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from prefrec.losses import sft_token_mean_loss
        from prefrec.scoring import score_completions
        from prefrec.train.distributed import forward_through

        tok = self.processing_class
        prompts = [model_input(p, self.template, tok) for p in inputs["instructions"]]
        rows = inputs["rows"]
        # Through the wrapper's forward (DDP's gradient all-reduce), inside --bf16's autocast.
        with self.accelerator.autocast():
            scores = forward_through(
                model,
                lambda inner: score_completions(
                    inner, tok, prompts, inputs["completions"], group_ids=rows,
                    batch_size=rows[-1] + 1, grad=True, max_length=self.max_length,
                ),
            )
        loss = sft_token_mean_loss(scores.logps, scores.n_tokens)
        return (loss, scores) if return_outputs else loss


def train_sft(
    cfg: SFTConfig,
    model_name: str,
    template: str,
    dtype=None,
    device=None,
    data_dir: str | None = None,
) -> Path:
    """Run the SFT stage; returns the final adapter folder. Resumes from checkpoints."""
    from transformers import set_seed

    from prefrec.adapters import write_adapter_meta
    from prefrec.data.formats import load_examples
    from prefrec.data.resolve import resolve_dataset
    from prefrec.model import LoraSettings, attach_lora, load, resolve_device
    from prefrec.train.common import (
        save_config,
        stage_callbacks,
        stage_is_done,
        train_and_save,
        training_arguments,
    )
    from prefrec.train.distributed import process_state, rank_device

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if stage_is_done(cfg, out):
        log.info("%s already holds the finished adapter of this config; nothing to do", out)
        return out / "adapter"
    data_path = resolve_dataset(cfg.data, data_dir=data_dir)
    examples = load_examples(data_path)
    if cfg.limit:
        examples = examples[: cfg.limit]
    if cfg.both_orders:
        from prefrec.data.dmpo import require_pairwise, with_both_orders

        examples = with_both_orders(require_pairwise(examples, data_path, "--both-orders"))
    if not examples:
        raise PrefrecError(f"{data_path}: no training examples")

    device = rank_device(device)
    state = process_state(cpu=resolve_device(device) == "cpu")
    # One rank per machine first: a download or embedded conversion happens once.
    with state.local_main_process_first():
        model, tokenizer = load(model_name, dtype=dtype, device=device)
    # Seed before the LoRA A matrices are drawn: Trainer seeds only when it is built, after
    # them, so unseeded runs (and a resumed run's fresh init) would start from other weights.
    set_seed(cfg.seed)
    model = attach_lora(
        model,
        LoraSettings(
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules,
            layers=cfg.lora_layers,
        ),
    )
    projector = None
    if cfg.item_embeddings != "none":
        from prefrec.item_tokens import attach_item_projector, build_projector

        hidden = model.get_base_model().get_input_embeddings().embedding_dim
        projector = build_projector(examples, cfg.item_embeddings, hidden, cfg.seed)
        attach_item_projector(model, projector, trainable=True)
    model.train()
    from prefrec.data.lengths import LengthLimit, check_examples_fit  # states truncation

    check_examples_fit(examples, LengthLimit(tokenizer, template, cfg.max_length, "max_length"),
                       data_path)
    pairs = sft_pairs(examples)
    save_config(cfg, out, {"stage": "sft", "model": model_name, "template": template,
                           "data_path": str(data_path), "n_examples": len(pairs)})
    use_cuda = next(model.parameters()).is_cuda
    args = training_arguments(cfg, out, use_cuda)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    common = {"model": model, "args": args, "callbacks": stage_callbacks(cfg, out)}
    # Every SFT row goes through the scorer's path, packed or one pair per row: it projects
    # only completion positions through the vocabulary head, 1.2x the pairs/s of Trainer's
    # causal-LM loss on the same rows (benchmarks/README.md), and item tokens need it.
    pack_size = cfg.pack_size if cfg.pack_by_user else 1
    units = user_packed_units(examples, pairs, pack_size)
    log.info("SFT: %d pairs in %d rows (at most %d pairs each)", len(pairs), len(units),
             pack_size)
    trainer = PackedSFTTrainer(
        **common, train_dataset=units, data_collator=collate_packed_sft,
        processing_class=tokenizer, template=template, max_length=cfg.max_length,
    )
    trainer.projector_lr = cfg.item_projector_lr
    trainer.projector_warmup_steps = cfg.item_projector_warmup_steps
    return train_and_save(
        trainer,
        out,
        lambda folder: write_adapter_meta(folder, model_name, [], template, {"stage": "sft"}),
        ["loss", "learning_rate", "grad_norm"],
        "SFT",
        projector=projector,
    )


def sft_command(args: argparse.Namespace) -> None:
    cfg = config_from_args(SFTConfig, args)
    adapter = train_sft(cfg, args.model, args.template, dtype=args.dtype, device=args.device,
                        data_dir=args.data_dir)
    if is_main_process():
        print(f"SFT adapter: {adapter}")
