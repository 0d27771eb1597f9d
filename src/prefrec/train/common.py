"""What both training stages share: Trainer arguments, resume, logs, curves, final save.

Output folder layout of a stage (``--out``)::

    config.yaml       the resolved configuration
    checkpoints/      Trainer checkpoints (adapter + optimizer + RNG); resume reads these
    log.jsonl         one row per logging step (main process only; metrics over all ranks)
    loss.png          training curves
    adapter/          the final PEFT adapter (+ prefrec_adapter.json lineage), written last
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback, TrainingArguments

from prefrec.errors import PrefrecError
from prefrec.io import append_jsonl, atomic_write_text
from prefrec.train.distributed import is_main_process

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# Settings that change where and how often a run writes, not what it trains: a run resumed
# with other values is still the same run.
BOOKKEEPING_KEYS = frozenset(
    {"out", "save_steps", "save_minutes", "save_total_limit", "logging_steps", "report_to"}
)


def training_arguments(cfg: Any, out_dir: Path, use_cuda: bool) -> TrainingArguments:
    """Map a prefrec config onto ``transformers.TrainingArguments``."""
    bf16 = use_cuda if cfg.bf16 is None else cfg.bf16
    # transformers 5 checkpoints with use_reentrant=False and makes the embeddings' output
    # require grad, which LoRA (frozen embeddings) needs.
    extra = {"activation_checkpointing": True} if cfg.gradient_checkpointing else {}
    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio in transformers 5
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        label_names=[],
        use_cpu=not use_cuda,
        # Every LoRA weight gets a gradient every step; DDP's search for unused parameters
        # would only cost time, and it fails together with activation checkpointing.
        ddp_find_unused_parameters=False,
        **extra,
    )


def pack_units(keys: Sequence[Hashable], size: int) -> list[list[int]]:
    """Indices of equal ``keys`` (users) in order of first appearance, in chunks of at
    most ``size``: the training units of ``pack_by_user`` (one packed row each).

    The chunk cap bounds a row's length, and so the attention's L^2 memory.
    """
    if size < 1:
        raise ValueError(f"pack size must be >= 1, got {size}")
    by_key: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    return [idx[s : s + size] for idx in by_key.values() for s in range(0, len(idx), size)]


def checkpoint_state_is_complete(path: Path) -> bool:
    """True when ``path`` (a ``trainer_state.json``) exists and parses: Trainer writes it
    in place, so a kill during the write leaves an empty or torn file."""
    import json

    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(out_dir: Path) -> str | None:
    """The newest checkpoint whose ``trainer_state.json`` exists and parses.

    Trainer writes that file last, so a checkpoint killed mid-save (no state file, or a
    half-written one) is skipped instead of crashing the resume.
    """
    ckpt_dir = out_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    done = [
        p
        for p in ckpt_dir.iterdir()
        if p.name.startswith(CHECKPOINT_PREFIX)
        and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        and checkpoint_state_is_complete(p / "trainer_state.json")
    ]
    if not done:
        return None
    return str(max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :])))


class TimedCheckpoints(TrainerCallback):
    """Ask the Trainer for a checkpoint once ``minutes`` have passed since the last one.

    ``save_steps`` alone is a poor fit for CPU runs, where a step can take 20 s and a run
    killed just before its 50th step loses a quarter of an hour. In a distributed run rank
    0's clock decides for every rank, since all of them must enter the save together.
    """

    def __init__(self, minutes: float, clock=time.monotonic) -> None:
        self.seconds = minutes * 60.0
        self.clock = clock
        self.last = clock()

    def on_step_end(self, args, state, control, **kwargs):
        due = self.clock() - self.last >= self.seconds
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from accelerate.utils import broadcast_object_list

            due = broadcast_object_list([due], from_process=0)[0]
        if due:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last = self.clock()


def stage_callbacks(cfg: Any, out_dir: Path) -> list[TrainerCallback]:
    """The callbacks every training stage runs: the jsonl log and timed checkpoints."""
    callbacks: list[TrainerCallback] = [JsonlLogCallback(out_dir / "log.jsonl")]
    if cfg.save_minutes > 0:
        callbacks.append(TimedCheckpoints(cfg.save_minutes))
    return callbacks


class JsonlLogCallback(TrainerCallback):
    """Append each Trainer log row to ``log.jsonl`` (main process only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        with open(self.path, "a", encoding="utf-8") as fh:
            append_jsonl(fh, row)


def move_to_own_group(optimizer, params: Sequence, **settings: Any) -> None:
    """Take ``params`` out of the optimizer's parameter groups into one group of their
    own with ``settings`` (e.g. ``lr``). Before the first step and before the scheduler
    is built, so the schedule scales that group's ``lr`` like every other group's."""
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.add_param_group({"params": list(params), **settings})


class ItemProjectorLr:
    """Trainer mixin: the item projector's own learning rate and warm-up.

    With ``projector_lr`` or ``projector_warmup_steps`` set, the projector's parameters go
    into a parameter group of their own, at ``projector_lr`` (default: the run's ``lr``).
    For the first ``projector_warmup_steps`` optimizer steps every other group's learning
    rate is held at 0, so only the projector trains (LLaVA's feature-alignment stage); the
    schedule then goes on for all groups from where it is.
    """

    projector_lr: float | None = None
    projector_warmup_steps: int = 0

    def create_optimizer(self, model=None):
        from prefrec.item_tokens import item_projector_of

        optimizer = super().create_optimizer(model)
        projector = item_projector_of(self.model)
        if (self.projector_lr is not None or self.projector_warmup_steps) and projector is not None:
            move_to_own_group(optimizer, [p for p in projector.parameters() if p.requires_grad],
                              lr=self.args.learning_rate if self.projector_lr is None
                              else self.projector_lr,
                              weight_decay=self.args.weight_decay, item_projector=True)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        groups = scheduler.optimizer.param_groups
        # Without a projector group (no item tokens) there is nothing to warm up.
        if self.projector_warmup_steps and any(g.get("item_projector") for g in groups):
            if not hasattr(scheduler, "lr_lambdas"):
                raise PrefrecError(f"--scheduler {self.args.lr_scheduler_type}: the item "
                                   "projector's warm-up needs a per-group (LambdaLR) schedule")
            n = self.projector_warmup_steps
            for i, group in enumerate(groups):
                if not group.get("item_projector"):
                    scheduler.lr_lambdas[i] = _held_at_zero(scheduler.lr_lambdas[i], n)
                    group["lr"] = group["initial_lr"] * scheduler.lr_lambdas[i](
                        scheduler.last_epoch)
        return scheduler


def _held_at_zero(schedule: Callable[[int], float], steps: int) -> Callable[[int], float]:
    """``schedule`` with its factor 0 for the first ``steps`` steps."""
    return lambda step: 0.0 if step < steps else schedule(step)


class ItemProjectorCheckpoints(TrainerCallback):
    """Save the item projector into every Trainer checkpoint: PEFT checkpoints hold only
    the LoRA weights, and a resumed run must continue the projector it trained."""

    def __init__(self, projector) -> None:
        self.projector = projector

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            self.projector.save(folder)


def restore_item_projector(projector, checkpoint: str) -> None:
    """Load the projector weights a checkpoint holds into ``projector`` (in place)."""
    from prefrec.item_tokens import ItemProjector

    saved = ItemProjector.load(checkpoint)
    if saved is None:
        raise PrefrecError(f"{checkpoint}: checkpoint has no item projector (killed while "
                           "saving?); delete that checkpoint folder and run again")
    projector.load_state_dict(saved.state_dict())


def save_config(cfg: Any, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``config.yaml`` (main process only)."""
    if not is_main_process():
        return
    data = {**dataclasses.asdict(cfg), **(extra or {})}
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(data, sort_keys=False))


def stage_is_done(cfg: Any, out_dir: Path) -> bool:
    """True when ``out_dir`` already holds the final adapter of a run with this config.

    Re-running a finished command is then a no-op, so a pipeline that crashed later can be
    re-run from the top. An ``out_dir`` whose ``config.yaml`` has other settings is refused
    rather than resumed or overwritten. ``out`` itself is not compared: a finished stage
    folder that was moved or copied (as ``prefrec study`` does) is still the same run.
    """
    from prefrec.errors import PrefrecError

    saved_path = out_dir / "config.yaml"
    if not saved_path.is_file():
        return False
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    current = dataclasses.asdict(cfg)
    # A key missing from an older config.yaml had its field's default then.
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    changed = sorted(
        k for k, v in current.items()
        if k not in BOOKKEEPING_KEYS and saved.get(k, defaults[k]) != v
    )
    if changed:
        raise PrefrecError(
            f"{out_dir} holds a run with other settings ({', '.join(changed)}); "
            "use another --out or delete it"
        )
    return (out_dir / "adapter" / "adapter_config.json").is_file()


def save_adapter_atomically(model, out_dir: Path, write_meta, state_dict=None) -> Path:
    """Save the PEFT adapter to ``out_dir/adapter`` via a temporary folder and a rename.

    ``write_meta(folder)`` adds prefrec's lineage file before the rename, so a complete
    ``adapter/`` always has both PEFT's files and the lineage. ``state_dict``: the full
    (gathered) weights when the model's own are sharded.
    """
    final = out_dir / "adapter"
    tmp = out_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), **({} if state_dict is None else {"state_dict": state_dict}))
    write_meta(tmp)
    if final.exists():
        old = out_dir / ".adapter.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def plot_curves(log_path: Path, png_path: Path, keys: list[str], title: str) -> None:
    """One panel per logged key against the step; written atomically as PNG."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefrec.io import atomic_open

    if not log_path.exists():
        return
    rows = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line]
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present, strict=True):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", linewidth=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(png_path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def trim_log(log_path: Path, checkpoint: str | None) -> None:
    """Drop log rows past the checkpoint a run resumes from (they will be logged again)."""
    import json

    if not log_path.exists():
        return
    step = int(Path(checkpoint).name[len(CHECKPOINT_PREFIX) :]) if checkpoint else 0
    kept = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
        if row.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write_text(log_path, "".join(kept))


def train_and_save(
    trainer, out_dir: Path, write_meta, curve_keys: list[str], title: str, projector=None
) -> Path:
    """Resume from the last complete checkpoint (if any), train, then on the main process
    save the final adapter atomically and plot the curves. Returns ``out_dir/adapter``.

    ``projector``: the item projector the run trains; checkpointed and restored with the
    adapter, and saved into the final adapter folder."""
    resume = last_complete_checkpoint(out_dir)
    if trainer.is_world_process_zero():
        trim_log(out_dir / "log.jsonl", resume)
    if projector is not None:
        trainer.add_callback(ItemProjectorCheckpoints(projector))
        if resume:
            restore_item_projector(projector, resume)
        meta = write_meta

        def write_meta(folder: Path) -> None:
            meta(folder)
            projector.save(folder)
    if resume:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    # Sharded weights (DeepSpeed ZeRO-3, FSDP) are gathered by all ranks together.
    state_dict = (
        trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
        else None
    )
    if trainer.is_world_process_zero():
        adapter = save_adapter_atomically(trainer.model, out_dir, write_meta, state_dict)
        plot_curves(out_dir / "log.jsonl", out_dir / "loss.png", curve_keys, title)
        log.info("saved adapter to %s", adapter)
    # Every rank returns only once the adapter exists (a pipeline's next stage reads it).
    trainer.accelerator.wait_for_everyone()
    return out_dir / "adapter"
