"""Training configurations: one dataclass per stage whose fields carry their help text.

The CLI flags are generated from the fields (``--lora-r`` for ``lora_r``), so a field's
default and help live in one place, like TRL's ``DPOConfig``. The resolved config is saved
as ``config.yaml`` beside every adapter.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from prefrec.errors import PrefrecError


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Options shared by the SFT and preference stages."""

    data: str = _f(None, "training file or dataset name", required=True)
    out: str = _f(None, "output folder (adapter, config.yaml, log.jsonl, loss.png)", required=True)
    epochs: float = _f(3.0, "training epochs")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: use --epochs)")
    batch_size: int = _f(4, "groups (or examples) per device per step")
    grad_accum: int = _f(1, "gradient accumulation steps")
    lr: float = _f(2e-4, "peak learning rate (cosine schedule)")
    warmup_ratio: float = _f(0.05, "share of steps for linear warm-up (< 1)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    scheduler: str = _f("cosine", "learning-rate schedule (transformers' names)")
    max_length: int = _f(1024, "truncate prompt+completion to this many tokens (left side)")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    target_modules: str = _f("all-linear", "LoRA target modules: all-linear or comma list")
    lora_layers: int | None = _f(
        None, "LoRA on the last N decoder layers only (default: all); the layers below then "
        "need no backward pass: at 15 of SmolLM2's 30 a CPU training step is ~1.7x faster "
        "(benchmarks/README.md)"
    )
    limit: int | None = _f(None, "train on the first N examples / groups only")
    seed: int = _f(42, "seed for init, data order and negative sampling")
    logging_steps: int = _f(1, "log every N optimizer steps")
    save_steps: int = _f(50, "checkpoint every N optimizer steps (resume re-runs the command)")
    save_minutes: float = _f(
        10.0, "also checkpoint when this many minutes have passed since the last checkpoint "
        "(0: off), so a slow run killed between --save-steps loses at most this much"
    )
    save_total_limit: int = _f(2, "keep this many checkpoints")
    report_to: str = _f("none", "none | tensorboard")
    gradient_checkpointing: bool = _f(False, "trade compute for activation memory")
    bf16: bool | None = _f(None, "bf16 mixed precision (default: on with CUDA)")
    pack_by_user: bool = _f(
        False, "pairwise data: pack a user's examples that share a history (data built with "
        "--train-history) into one row under a block attention mask, so the history runs once "
        "per row; losses are unchanged, --batch-size then counts packed rows"
    )
    pack_size: int = _f(16, "with --pack-by-user: most examples (SFT pairs or preference "
                        "groups) in one packed row")
    item_embeddings: str = _f(
        "none", "none | bpr | sasrec | itemknn, or several joined by + (bpr+itemknn): "
        "collaborative item tokens (LLaRA's hybrid items) after every <Title:X> of a prompt, "
        "from a model fitted on this stage's training users; the preference stage keeps "
        "training the SFT adapter's, and fits its own only without one"
    )
    item_projector_lr: float | None = _f(
        None, "with --item-embeddings: the item projector's peak learning rate (default: "
        "--lr); a fresh projector learns only through the few completion tokens that rank"
    )
    item_projector_warmup_steps: int = _f(
        0, "with --item-embeddings: the first N optimizer steps train the item projector "
        "alone (every other weight's learning rate held at 0), LLaVA's feature-alignment "
        "stage, so the LoRA starts on item vectors that already mean something"
    )
    both_orders: bool = _f(
        False, "pairwise data: also train on every example with its two candidates listed "
        "the other way round (against position bias; twice the data)"
    )


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on the preferred completion (loss on completion tokens only)."""


@dataclass
class AlignConfig(TrainConfig):
    """Preference optimisation against K negatives on top of the SFT model."""

    sft: str | None = _f(None, "SFT adapter folder: the reference policy is base + this adapter")
    loss: str = _f("dmpo", "dpo | dmpo | sdpo")
    negatives: int | None = _f(None, "K negatives per group (default: all the data has)")
    beta: float = _f(0.1, "reward scale beta in r = beta * (log pi - log pi_ref)")
    ftx: float = _f(1.0, "weight of the SFT term on the preferred completion (DMPO: 1.0)")
    lr: float = _f(5e-5, "peak learning rate (cosine schedule)")
    epochs: float = _f(1.0, "training epochs")
    batch_size: int = _f(2, "preference groups per device per step")
    pack_size: int = _f(4, "with --pack-by-user: most preference groups in one packed row "
                        "(a row of 16 K=3 groups is ~3500 tokens, where the dense attention "
                        "mask's quadratic cost outweighs the shared history: benchmarks/README.md)")
    resample_negatives: bool = _f(
        True, "selection data: resample the K negatives each epoch (else the first K)"
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(p: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field of ``cls`` (skipping fields already defined)."""
    hints = get_type_hints(cls)
    existing = {a.dest for a in p._actions}
    for f in dataclasses.fields(cls):
        if f.name in existing:
            continue
        help_text = f.metadata.get("help", "")
        required = f.metadata.get("required", False)
        typ = hints[f.name]
        if typ is bool or typ == (bool | None):
            p.add_argument(
                _flag(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=help_text,
            )
            continue
        base = {int | None: int, float | None: float, str | None: str}.get(typ, typ)
        kw: dict[str, Any] = {"dest": f.name, "type": base, "help": help_text}
        if required:
            kw["required"] = True
        else:
            kw["default"] = f.default
            kw["help"] = f"{help_text} (default: {f.default})"
        p.add_argument(_flag(f.name), **kw)


def add_sft_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, SFTConfig)


def add_align_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, AlignConfig)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build ``cls`` from parsed flags (fields absent from ``args`` keep their default)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    from prefrec.item_tokens import check_item_source

    check_item_source(values.get("item_embeddings", "none"))
    warmup = values.get("item_projector_warmup_steps") or 0
    if warmup < 0 or (warmup and values.get("item_embeddings", "none") == "none"):
        raise PrefrecError(f"--item-projector-warmup-steps {warmup}: expected 0, or a positive "
                           "number with --item-embeddings")
    if values.get("pack_size") is not None and values["pack_size"] < 1:
        raise PrefrecError(f"--pack-size {values['pack_size']}: expected at least 1")
    if values.get("lora_layers") is not None and values["lora_layers"] < 1:
        raise PrefrecError(f"--lora-layers {values['lora_layers']}: expected at least 1 "
                           "(leave it out to adapt every layer)")
    if values.get("limit") is not None and values["limit"] < 1:
        # 0 would otherwise read as "no limit" and silently train on everything.
        raise PrefrecError(f"--limit {values['limit']}: expected at least 1")
    return cls(**values)
