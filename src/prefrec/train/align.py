"""Preference stage: multi-negative DPO / DMPO / S-DPO on top of the SFT model.

The reference policy is the SFT model (base + SFT adapter, merged), never the base model.
The policy is that merged model plus a fresh LoRA adapter whose B matrices start at zero,
so at step 0 policy == reference. Reference log-probs of every completion the run can see
are computed once, before training, with the shared-prefix scorer, and cached on disk
(``$PREFREC_CACHE/ref_logps/<sha256>.safetensors``, keyed by the scored texts, the
template, and the fingerprint of base model + SFT adapter). The training loop never runs
the reference model. Under ``accelerate launch`` the ranks split that scoring between them
(:mod:`prefrec.train.distributed`).

One training step (``AlignTrainer.compute_loss``)::

    groups -> score_completions(policy, chosen + K rejected per group, grad=True)
           -> combined_loss(loss, policy logps, cached ref logps, beta, ftx)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback, set_seed

from prefrec.data.prompts import model_input
from prefrec.data.schema import (
    PairwiseExample,
    PreferenceGroup,
    SelectionExample,
    group_pairs_by_user,
    selection_to_group,
)
from prefrec.errors import PrefrecError
from prefrec.train.common import ItemProjectorLr
from prefrec.train.config import AlignConfig, config_from_args
from prefrec.train.distributed import forward_through, is_main_process, sum_across_processes

if TYPE_CHECKING:
    from accelerate import PartialState

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (instruction, completion)


# --------------------------------------------------------------------------- groups


class GroupDataset(torch.utils.data.Dataset):
    """Training units of preference groups, rebuilt per epoch by ``make_group(index, epoch)``.

    A unit is one group, or with ``units`` (``pack_by_user``) the groups of one user that
    are scored in one packed row. Selection data resamples its K negatives each epoch
    from a generator seeded by (seed, epoch, index), so a resumed run sees exactly the
    groups an uninterrupted run would.
    """

    def __init__(
        self,
        n: int,
        make_group: Callable[[int, int], PreferenceGroup],
        units: list[list[int]] | None = None,
    ) -> None:
        self.units = units if units is not None else [[i] for i in range(n)]
        self.make_group = make_group
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"groups": [self.make_group(i, self.epoch) for i in self.units[index]]}


class EpochCallback(TrainerCallback):
    def __init__(self, dataset: GroupDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(state.epoch or 0)


def build_groups(
    examples: Sequence[PairwiseExample | SelectionExample],
    negatives: int | None,
    seed: int,
    resample: bool,
) -> tuple[int, Callable[[int, int], PreferenceGroup], list[Key]]:
    """Turn examples into a group factory, and list every (prompt, completion) it can emit.

    DMPO pairwise rows regroup by user (K pairwise prompts sharing the history); ``negatives``
    keeps each user's first K. Selection examples pit the target against K other
    candidates of the same prompt, resampled per epoch when ``resample``.
    """
    if negatives is not None and negatives < 1:
        raise PrefrecError(f"--negatives {negatives}: expected at least 1")
    if isinstance(examples[0], PairwiseExample):
        groups = group_pairs_by_user(examples)  # type: ignore[arg-type]
        k = negatives or min(g.k for g in groups)
        too_small = [g.user for g in groups if g.k < k]
        if too_small:
            raise PrefrecError(
                f"--negatives {k}: {len(too_small)} users have fewer pairwise rows than that"
            )
        fixed = [g.with_negatives(k) for g in groups]
        keys = sorted({(c.prompt, c.completion) for g in fixed for c in g.completions()})
        return len(fixed), (lambda i, epoch: fixed[i]), keys

    selection: list[SelectionExample] = list(examples)  # type: ignore[arg-type]
    k = negatives or (len(selection[0].candidates) - 1)
    # Checked here, not when the Trainer first draws a group (a traceback mid-training).
    too_small = [ex for ex in selection if sum(c != ex.target for c in ex.candidates) < k]
    if too_small:
        raise PrefrecError(
            f"--negatives {k}: {len(too_small)} examples have fewer other candidates than that"
        )

    def make(i: int, epoch: int) -> PreferenceGroup:
        rng = random.Random(f"{seed}:{epoch}:{i}") if resample else None
        return selection_to_group(selection[i], k, rng)

    keys = sorted(
        {(ex.prompt, ex.completion_for(c)) for ex in selection for c in ex.candidates}
    )
    return len(selection), make, keys


def limit_examples(
    examples: Sequence[PairwiseExample | SelectionExample], limit: int
) -> list[PairwiseExample | SelectionExample]:
    """The examples of the first ``limit`` users (pairwise) or the first ``limit`` examples."""
    if isinstance(examples[0], SelectionExample):
        return list(examples[:limit])
    users: list[str] = []
    for ex in examples:
        if ex.user not in users:
            users.append(ex.user)
    keep = set(users[:limit])
    return [ex for ex in examples if ex.user in keep]


# --------------------------------------------------------------------------- reference


def reference_cache_key(
    fingerprint: str, template: str, keys: Sequence[Key], max_length: int | None = None
) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([fingerprint, template, max_length], ensure_ascii=False).encode())
    for prompt, completion in keys:
        h.update(json.dumps([prompt, completion], ensure_ascii=False).encode())
    return h.hexdigest()


def reference_logps(
    model,
    tokenizer,
    keys: Sequence[Key],
    template: str,
    cache_file: Path,
    batch_size: int = 8,
    state: PartialState | None = None,
    max_length: int | None = None,
    save_every_s: float = 60.0,
) -> dict[Key, tuple[float, int]]:
    """Log-prob and token count of every (instruction, completion) under the reference.

    Loaded from ``cache_file`` when present; otherwise scored once (shared prefixes:
    completions of one instruction history are grouped) and saved atomically. A single
    process also saves its progress every ``save_every_s`` seconds beside the cache
    (``*.partial.safetensors``), so a killed pass resumes where it stopped instead of
    starting over (LastFM's pass is ~45 min of one core).

    Several processes (``state``: accelerate's ``PartialState``): the file is loaded only
    when every rank sees it; otherwise each rank scores a contiguous shard of ``keys``, the
    shards are gathered on every rank, and one process per machine writes the file (so a
    machine-local ``$PREFREC_CACHE`` gets its copy). No rank reads a file being written.
    """
    from safetensors.torch import load_file
    from safetensors.torch import save as safetensors_bytes

    from prefrec.io import atomic_open
    from prefrec.train.distributed import on_every_rank, score_sharded

    n_processes = 1 if state is None else state.num_processes
    cached = cache_file.exists() if n_processes == 1 else on_every_rank(state, cache_file.exists())
    if cached:
        tensors = load_file(str(cache_file))
        log.info("reference log-probs: loaded %d from %s", len(keys), cache_file)
    else:

        def as_tensors(scored: list[tuple[float, int]]) -> dict[str, torch.Tensor]:
            return {
                "logps": torch.tensor([lp for lp, _ in scored], dtype=torch.float32),
                "n_tokens": torch.tensor([n for _, n in scored], dtype=torch.long),
            }

        def write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
            with atomic_open(path, "wb") as fh:
                fh.write(safetensors_bytes(tensors))

        if n_processes == 1:
            partial_file = cache_file.with_suffix(".partial.safetensors")
            done: list[tuple[float, int]] = []
            if partial_file.exists():
                part = load_file(str(partial_file))
                done = list(zip(part["logps"].tolist(), part["n_tokens"].tolist(), strict=True))
                if len(done) > len(keys):
                    raise PrefrecError(f"{partial_file}: more reference log-probs than the data "
                                       f"has completions ({len(done)} > {len(keys)})")
                log.info("reference log-probs: resuming after %d of %d from %s",
                         len(done), len(keys), partial_file)
            scored = _score_reference(model, tokenizer, keys, template, batch_size, max_length,
                                      done=done,
                                      checkpoint=lambda s: write(partial_file, as_tensors(s)),
                                      save_every_s=save_every_s)
        else:

            def score(part: list[Key]) -> list[tuple[float, int]]:
                return _score_reference(model, tokenizer, part, template, batch_size,
                                        max_length)

            scored = score_sharded(state, keys, score)
        tensors = as_tensors(scored)
        if state is None or state.is_local_main_process:
            write(cache_file, tensors)
            log.info("reference log-probs: computed %d, cached at %s", len(keys), cache_file)
        if n_processes == 1:
            partial_file.unlink(missing_ok=True)
    if tensors["logps"].shape[0] != len(keys):
        raise PrefrecError(f"{cache_file}: cached reference log-probs do not match the data")
    return {
        key: (float(lp), int(n))
        for key, lp, n in zip(keys, tensors["logps"].tolist(), tensors["n_tokens"].tolist(),
                              strict=True)
    }


def _score_reference(
    model, tokenizer, keys: Sequence[Key], template: str, batch_size: int,
    max_length: int | None = None,
    done: Sequence[tuple[float, int]] = (),
    checkpoint: Callable[[list[tuple[float, int]]], None] | None = None,
    save_every_s: float = 60.0,
) -> list[tuple[float, int]]:
    """(log-prob, completion tokens) of each key, in chunks of 64 with a progress bar.

    The first ``len(done)`` keys are taken from ``done`` (a resumed pass); ``checkpoint``
    receives everything scored so far every ``save_every_s`` seconds. Chunks start at
    multiples of 64 either way, so a resumed pass groups shared prefixes as a fresh one.
    """
    from tqdm.auto import tqdm

    from prefrec.scoring import score_completions

    chunk = 64
    out: list[tuple[float, int]] = list(done)
    resume_at = len(out) - len(out) % chunk if len(out) < len(keys) else len(out)
    del out[resume_at:]
    saved = time.perf_counter()
    for start in tqdm(range(resume_at, len(keys), chunk), desc="reference log-probs",
                      unit="chunk", initial=resume_at // chunk, total=-(-len(keys) // chunk)):
        part = keys[start : start + chunk]
        prompts = [model_input(p, template, tokenizer) for p, _ in part]
        scores = score_completions(
            model,
            tokenizer,
            prompts,
            [c for _, c in part],
            group_ids=[_history_key(p) for p, _ in part],
            batch_size=batch_size,
            max_length=max_length,
        )
        out.extend(zip(scores.logps.detach().float().cpu().tolist(),
                       scores.n_tokens.cpu().tolist(), strict=True))
        if checkpoint is not None and time.perf_counter() - saved >= save_every_s:
            checkpoint(out)
            saved = time.perf_counter()
    return out


def _history_key(instruction: str) -> str:
    """Group prompts that share a user history (everything before the candidates)."""
    return instruction.rsplit("Rank the likelihood", 1)[0]


# --------------------------------------------------------------------------- trainer


def collate_groups(
    batch: list[dict[str, Any]], ref: dict[Key, tuple[float, int]]
) -> dict[str, Any]:
    """Groups plus their cached reference log-probs, padded to the batch's largest K.

    ``rows`` names each group's training unit: the groups of one unit share a packed row.
    """
    groups: list[PreferenceGroup] = [g for b in batch for g in b["groups"]]
    rows = [row for row, b in enumerate(batch) for _ in b["groups"]]
    k = max(g.k for g in groups)
    ref_chosen = torch.tensor([ref[(g.prompt, g.chosen)][0] for g in groups])
    ref_rejected = torch.zeros(len(groups), k)
    mask = torch.zeros(len(groups), k, dtype=torch.bool)
    for i, g in enumerate(groups):
        for j, (p, c) in enumerate(zip(g.rejected_prompts, g.rejected, strict=True)):
            ref_rejected[i, j] = ref[(p, c)][0]
            mask[i, j] = True
    return {"groups": groups, "rows": rows, "ref_chosen": ref_chosen,
            "ref_rejected": ref_rejected, "mask": mask}


class AlignTrainer(ItemProjectorLr, Trainer):
    """``Trainer`` whose loss is a multi-negative preference loss on shared-prefix scores."""

    def __init__(self, *args, align: AlignConfig, template: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.align = align
        self.template = template
        self._stored: dict[str, float] = {}
        self._groups_seen = 0
        self._last_log_time = time.perf_counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from prefrec.losses import combined_loss
        from prefrec.scoring import score_completions

        groups: list[PreferenceGroup] = inputs["groups"]
        tok = self.processing_class
        prompts, completions, gids = [], [], []
        for g, row in zip(groups, inputs["rows"], strict=True):
            for item in g.completions():
                prompts.append(model_input(item.prompt, self.template, tok))
                completions.append(item.completion)
                gids.append(row)
        # Through the wrapper's forward: under DDP that is what all-reduces the gradients.
        # The scorer bypasses model.forward, so --bf16's autocast is entered here.
        with self.accelerator.autocast():
            scores = forward_through(
                model,
                lambda inner: score_completions(
                    inner, tok, prompts, completions, group_ids=gids, batch_size=gids[-1] + 1,
                    grad=True, max_length=self.align.max_length,  # as the reference was scored
                ),
            )
        k = inputs["mask"].shape[1]
        chosen = torch.empty(len(groups), dtype=scores.logps.dtype, device=scores.logps.device)
        chosen_n = torch.empty(len(groups), dtype=torch.float32, device=scores.logps.device)
        rejected_rows = []
        pos = 0
        for gi, g in enumerate(groups):
            chosen[gi] = scores.logps[pos]
            chosen_n[gi] = scores.n_tokens[pos]
            row = scores.logps[pos + 1 : pos + 1 + g.k]
            if g.k < k:
                row = torch.cat([row, row.new_zeros(k - g.k)])
            rejected_rows.append(row)
            pos += 1 + g.k
        rejected = torch.stack(rejected_rows)
        device = chosen.device
        out = combined_loss(
            self.align.loss,
            chosen,
            rejected,
            inputs["ref_chosen"].to(device, chosen.dtype),
            inputs["ref_rejected"].to(device, chosen.dtype),
            beta=self.align.beta,
            mask=inputs["mask"].to(device),
            ftx=self.align.ftx,
            chosen_n_tokens=chosen_n,
        )
        metrics = out.metrics()
        metrics["logps/chosen"] = chosen.detach().mean().item()
        mask = inputs["mask"].to(device)
        metrics["logps/rejected"] = (
            (rejected.detach() * mask).sum() / mask.sum()
        ).item()
        # Group-weighted sums, so the logged mean is over every group of every rank.
        for key, value in metrics.items():
            if key != "loss":
                self._stored[key] = self._stored.get(key, 0.0) + value * len(groups)
        self._groups_seen += len(groups)
        return (out.loss, out) if return_outputs else out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Trainer calls log() on every rank (its loss is already gathered); the metrics
        # gathered here are the mean over all groups all ranks saw since the last row.
        if "loss" in logs and self._stored:
            keys = sorted(self._stored)
            *sums, groups = sum_across_processes(
                self.accelerator, [self._stored[k] for k in keys] + [self._groups_seen]
            )
            for key, total in zip(keys, sums, strict=True):
                logs[key] = total / max(groups, 1)
            now = time.perf_counter()
            logs["groups_per_second"] = groups / max(now - self._last_log_time, 1e-9)
            self._stored, self._groups_seen, self._last_log_time = {}, 0, now
        super().log(logs, start_time)


# --------------------------------------------------------------------------- stage


def train_align(
    cfg: AlignConfig,
    model_name: str,
    template: str,
    dtype=None,
    device=None,
    data_dir: str | None = None,
) -> Path:
    """Run the preference stage; returns the final adapter folder. Resumes from checkpoints."""
    from prefrec.adapters import adapter_chain, write_adapter_meta
    from prefrec.data.formats import load_examples
    from prefrec.data.resolve import resolve_dataset
    from prefrec.model import (
        LoraSettings,
        attach_lora,
        cache_root,
        load_for_scoring,
        model_fingerprint,
        resolve_device,
    )
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
    if cfg.loss not in ("dpo", "dmpo", "sdpo"):
        raise PrefrecError(f"--loss {cfg.loss}: expected dpo, dmpo or sdpo")
    data_path = resolve_dataset(cfg.data, data_dir=data_dir)
    examples = load_examples(data_path)
    if not examples:
        raise PrefrecError(f"{data_path}: no training examples")

    chain = adapter_chain(cfg.sft, model_name)
    if cfg.sft is None:
        log.warning("no --sft adapter: the reference is the base model itself")
    template = chain.template or template
    device = rank_device(device)
    state = process_state(cpu=resolve_device(device) == "cpu")
    # One rank per machine first: a download or embedded conversion happens once.
    with state.local_main_process_first():
        reference, tokenizer = load_for_scoring(
            chain.base_model, [str(a) for a in chain.adapters], dtype=dtype, device=device
        )

    if cfg.limit:
        examples = limit_examples(examples, cfg.limit)
    if cfg.both_orders:
        from prefrec.data.dmpo import require_pairwise, with_both_orders

        examples = with_both_orders(require_pairwise(examples, data_path, "--both-orders"))
    from prefrec.item_tokens import attach_item_projector, build_projector, item_projector_of

    # Item tokens: the SFT adapter's projector (the reference scores with it, the policy
    # trains it further); a fresh one only when that chain has none.
    projector = item_projector_of(reference)
    if projector is None and cfg.item_embeddings != "none":
        hidden = reference.get_input_embeddings().embedding_dim
        projector = build_projector(examples, cfg.item_embeddings, hidden, cfg.seed)
        attach_item_projector(reference, projector, trainable=False)
    from prefrec.data.lengths import LengthLimit, check_examples_fit  # states truncation

    check_examples_fit(examples, LengthLimit(tokenizer, template, cfg.max_length, "max_length"),
                       data_path)
    n, make_group, keys = build_groups(examples, cfg.negatives, cfg.seed, cfg.resample_negatives)
    fingerprint = model_fingerprint(chain.base_model, [str(a) for a in chain.adapters])
    cache_key = reference_cache_key(fingerprint, template, keys, cfg.max_length)
    cache_file = cache_root() / "ref_logps" / f"{cache_key}.safetensors"
    ref = reference_logps(reference, tokenizer, keys, template, cache_file, cfg.batch_size,
                          state=state, max_length=cfg.max_length)

    # Seed before the LoRA A matrices are drawn (Trainer seeds only when it is built).
    set_seed(cfg.seed)
    if projector is not None:
        del reference.item_projector  # not a LoRA target ("all-linear" would wrap its MLP)
    policy = attach_lora(
        reference,
        LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     target_modules=cfg.target_modules, layers=cfg.lora_layers),
    )
    if projector is not None:
        # Trained from here on: the reference log-probs it shaped are already cached.
        attach_item_projector(policy, projector, trainable=True)
    policy.train()
    units = None
    if cfg.pack_by_user:
        from prefrec.train.common import pack_units

        units = pack_units([make_group(i, 0).user for i in range(n)], cfg.pack_size)
        log.info("align: %d groups packed into %d rows (users, at most %d groups each)",
                 n, len(units), cfg.pack_size)
    dataset = GroupDataset(n, make_group, units)
    save_config(cfg, out, {"stage": "align", "model": chain.base_model, "template": template,
                           "parents": [str(a) for a in chain.adapters],
                           "data_path": str(data_path), "n_groups": n,
                           "reference_cache": str(cache_file)})
    use_cuda = next(policy.parameters()).is_cuda
    args = training_arguments(cfg, out, use_cuda)
    trainer = AlignTrainer(
        model=policy,
        args=args,
        train_dataset=dataset,
        data_collator=lambda batch: collate_groups(batch, ref),
        processing_class=tokenizer,
        callbacks=[*stage_callbacks(cfg, out), EpochCallback(dataset)],
        align=cfg,
        template=template,
    )
    trainer.projector_lr = cfg.item_projector_lr
    trainer.projector_warmup_steps = cfg.item_projector_warmup_steps
    return train_and_save(
        trainer,
        out,
        lambda folder: write_adapter_meta(
            folder, chain.base_model, chain.adapters, template,
            {"stage": "align", "loss": cfg.loss, "beta": cfg.beta, "ftx": cfg.ftx},
        ),
        ["loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"],
        f"{cfg.loss.upper()} (K={cfg.negatives or 'all'}, beta={cfg.beta}, ftx={cfg.ftx})",
        projector=projector,
    )


def align_command(args: argparse.Namespace) -> None:
    cfg = config_from_args(AlignConfig, args)
    adapter = train_align(cfg, args.model, args.template, dtype=args.dtype, device=args.device,
                          data_dir=args.data_dir)
    if is_main_process():
        print(f"aligned adapter: {adapter}")
