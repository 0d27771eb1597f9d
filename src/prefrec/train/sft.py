"""SFT stage: LoRA fine-tuning on the preferred completion, loss on completion tokens only.

Built on ``transformers.Trainer``: gradient accumulation, the cosine schedule, mixed
precision, ``report_to``, checkpoints and resume come from the ecosystem. Prompt and
completion are tokenised exactly as the scorer tokenises them (``tokenize_items``),
so the SFT model is trained on the token sequences it is later scored on.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from prefrec.data.prompts import model_input
from prefrec.data.schema import PairwiseExample, SelectionExample
from prefrec.errors import PrefrecError
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


def train_sft(
    cfg: SFTConfig,
    model_name: str,
    template: str,
    dtype=None,
    device=None,
    data_dir: str | None = None,
) -> Path:
    """Run the SFT stage; returns the final adapter folder. Resumes from checkpoints."""
    from transformers import Trainer, set_seed

    from prefrec.adapters import write_adapter_meta
    from prefrec.data.formats import load_examples
    from prefrec.data.resolve import resolve_dataset
    from prefrec.model import LoraSettings, attach_lora, load, resolve_device
    from prefrec.train.common import (
        JsonlLogCallback,
        save_config,
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
        ),
    )
    model.train()
    feats = sft_features(tokenizer, sft_pairs(examples), template, cfg.max_length)
    save_config(cfg, out, {"stage": "sft", "model": model_name, "template": template,
                           "data_path": str(data_path), "n_examples": len(feats)})
    use_cuda = next(model.parameters()).is_cuda
    args = training_arguments(cfg, out, use_cuda)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=feats,
        data_collator=lambda batch: collate_sft(batch, tokenizer.pad_token_id),
        callbacks=[JsonlLogCallback(out / "log.jsonl")],
    )
    return train_and_save(
        trainer,
        out,
        lambda folder: write_adapter_meta(folder, model_name, [], template, {"stage": "sft"}),
        ["loss", "learning_rate", "grad_norm"],
        "SFT",
    )


def sft_command(args: argparse.Namespace) -> None:
    cfg = config_from_args(SFTConfig, args)
    adapter = train_sft(cfg, args.model, args.template, dtype=args.dtype, device=args.device,
                        data_dir=args.data_dir)
    if is_main_process():
        print(f"SFT adapter: {adapter}")
