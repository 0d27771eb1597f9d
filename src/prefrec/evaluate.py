"""Evaluation: score a dataset with the shared-prefix scorer and report metrics with CIs.

Output folder layout (``--out``)::

    eval_config.json   what was evaluated (data, model, adapters, template, subset)
    eval_time.json     wall time, summed over the invocations of a resumed evaluation
    scores.jsonl       one row per example: the raw log-probs, so any metric can be recomputed
    generations.jsonl  selection data in generation mode: the greedy answer per example
    metrics.json       every metric with its 95% bootstrap CI and n
    metrics.md         the same as a markdown table

Per-example rows are appended and flushed as they are scored; an interrupted run resumes
from them (a torn last line is recomputed) as long as ``eval_config.json`` matches.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prefrec.data.prompts import model_input
from prefrec.data.schema import PairwiseExample, SelectionExample
from prefrec.errors import PrefrecError
from prefrec.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    read_jsonl_tolerant,
)

log = logging.getLogger(__name__)

Example = PairwiseExample | SelectionExample


@dataclass
class EvalSettings:
    """Everything that determines the per-example scores (checked before resuming)."""

    data: str
    model: str
    adapters: list[str]
    template: str
    limit: int | None
    seed: int
    n_examples: int
    task: str
    modes: list[str]
    max_new_tokens: int
    dtype: str = "float32"
    orders: str = "given"


# Settings keys added after evaluations were already on disk, with the value those
# evaluations implicitly had (every earlier one ran in float32 on the given order).
LEGACY_SETTINGS = {"dtype": "float32", "orders": "given"}
ORDERS = ("given", "both")


def same_settings(previous: dict[str, Any] | None, settings: EvalSettings) -> bool:
    """Whether a stored settings dict describes the same evaluation as ``settings``."""
    return previous is not None and {**LEGACY_SETTINGS, **previous} == asdict(settings)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="eval file or dataset name (e.g. ml1m-eval)")
    p.add_argument("--adapter", default=None, help="PEFT adapter folder (its parents follow)")
    p.add_argument("--out", default=None, help="output folder (default: runs/eval/<data>)")
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset")
    p.add_argument("--seed", type=int, default=0, help="subset and bootstrap seed")
    p.add_argument("--batch-size", type=int, default=8, help="groups per forward pass")
    p.add_argument("--orders", default="given", choices=ORDERS,
                   help="pairwise data: score the prompt as given, or under both candidate "
                        "orders and sum (cancels position bias; twice the cost)")
    p.add_argument(
        "--mode",
        default="likelihood",
        choices=["likelihood", "generate", "both"],
        help="selection data: rank by likelihood, greedy generation, or both",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation mode budget")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--overwrite", action="store_true", help="discard earlier scores in --out")


def subset_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """A seeded random subset of ``range(n)`` in ascending order (all of it without limit)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


# --------------------------------------------------------------------------- scoring loops


class EvalClock:
    """Wall time of one evaluation summed over its invocations (``eval_time.json``).

    Saved every ``every_s`` seconds while rows are written, not only at the end, so the
    time a killed invocation spent on the rows it left on disk still counts after a resume.
    """

    def __init__(self, path: Path, every_s: float = 30.0) -> None:
        self.path = path
        self.every_s = every_s
        self.before = json.loads(path.read_text())["wall_time_s"] if path.exists() else 0.0
        self.started = self.saved = time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def save(self, force: bool = False) -> float:
        """Write the running total (at most every ``every_s`` s unless ``force``); return it."""
        elapsed = self.elapsed()
        if force or time.perf_counter() - self.saved >= self.every_s:
            atomic_write_json(self.path, {"wall_time_s": elapsed})
            self.saved = time.perf_counter()
        return elapsed


def _resume(rows_path: Path, indices: Sequence[int]) -> tuple[dict[int, dict], list[int]]:
    """Rows already on disk (by example index) and the indices still to do.

    The file is rewritten atomically without a torn last line before new rows are appended.
    """
    done = {r["index"]: r for r in read_jsonl_tolerant(rows_path)}
    atomic_write_jsonl(rows_path, done.values())
    todo = [i for i in indices if i not in done]
    if done:
        log.info("resuming %s: %d of %d examples done", rows_path.name,
                 len(indices) - len(todo), len(indices))
    return done, todo


def _score_rows(
    model,
    tokenizer,
    examples: Sequence[Example],
    indices: Sequence[int],
    template: str,
    batch_size: int,
    rows_path: Path,
    orders: str = "given",
    max_length: int | None = None,
    clock: EvalClock | None = None,
) -> list[dict[str, Any]]:
    """Score every selected example, appending one row each; skip rows already on disk.

    ``orders="both"`` also scores each pairwise example under the prompt that lists its
    candidates the other way round (``*_swapped`` fields). ``max_length``: prompts of
    longer sequences lose tokens from their start (the oldest history).
    """
    from tqdm.auto import tqdm

    from prefrec.data.dmpo import swap_candidate_order
    from prefrec.scoring import score_completions

    done, todo = _resume(rows_path, indices)
    with open(rows_path, "a", encoding="utf-8") as fh, tqdm(
        total=len(indices), initial=len(indices) - len(todo), unit="ex", desc="scoring"
    ) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            prompts, completions, groups = [], [], []
            for i in chunk:
                ex = examples[i]
                variants = [ex]
                if isinstance(ex, PairwiseExample) and orders == "both":
                    variants.append(swap_candidate_order(ex))
                for variant in variants:
                    text = model_input(variant.prompt, template, tokenizer)
                    outs = (
                        [variant.chosen, variant.rejected]
                        if isinstance(variant, PairwiseExample)
                        else [variant.completion_for(c) for c in variant.candidates]
                    )
                    prompts += [text] * len(outs)
                    completions += outs
                    # Both listings in one group: the trie scores the history they share
                    # once (benchmarks/bench_scoring.py, shape both-orders).
                    groups += [i] * len(outs)
            scores = score_completions(
                model, tokenizer, prompts, completions, group_ids=groups, batch_size=batch_size,
                max_length=max_length,
            )
            logps = scores.logps.tolist()
            ntok = scores.n_tokens.tolist()
            pos = 0
            for i in chunk:
                ex = examples[i]
                if isinstance(ex, PairwiseExample):
                    row = {
                        "index": i,
                        "user": ex.user,
                        "positive_first": ex.positive_listed_first,
                        "chosen_logp": logps[pos],
                        "rejected_logp": logps[pos + 1],
                        "chosen_tokens": ntok[pos],
                        "rejected_tokens": ntok[pos + 1],
                    }
                    pos += 2
                    if orders == "both":
                        row["chosen_logp_swapped"] = logps[pos]
                        row["rejected_logp_swapped"] = logps[pos + 1]
                        pos += 2
                else:
                    m = len(ex.candidates)
                    row = {
                        "index": i,
                        "user": ex.user,
                        "target_index": ex.target_index,
                        "logps": logps[pos : pos + m],
                        "n_tokens": ntok[pos : pos + m],
                    }
                    pos += m
                append_jsonl(fh, row)
                done[i] = row
            bar.update(len(chunk))
            if clock:
                clock.save()
    return [done[i] for i in indices]


def _generate_rows(
    model,
    tokenizer,
    examples: Sequence[SelectionExample],
    indices: Sequence[int],
    template: str,
    batch_size: int,
    max_new_tokens: int,
    rows_path: Path,
    clock: EvalClock | None = None,
) -> list[dict[str, Any]]:
    """Greedy answers for selection prompts (S-DPO's generation protocol), resumable."""
    import torch
    from tqdm.auto import tqdm

    from prefrec.model import padding_side

    done, todo = _resume(rows_path, indices)
    device = next(model.parameters()).device
    with open(rows_path, "a", encoding="utf-8") as fh, tqdm(
        total=len(indices), initial=len(indices) - len(todo), unit="ex", desc="generating"
    ) as bar, padding_side(tokenizer, "left"):
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            texts = [model_input(examples[i].prompt, template, tokenizer) for i in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, answer in zip(chunk, answers, strict=True):
                row = {"index": i, "user": examples[i].user, "generated": answer}
                append_jsonl(fh, row)
                done[i] = row
            bar.update(len(chunk))
            if clock:
                clock.save()
    return [done[i] for i in indices]


# --------------------------------------------------------------------------- metrics


def ranking_logps(row: dict[str, Any]) -> tuple[float, float]:
    """The (chosen, rejected) scores a pairwise row is ranked by: the given-order log-probs,
    plus the swapped-order ones when the row has them (``--orders both``)."""
    if "chosen_logp_swapped" in row:
        return (row["chosen_logp"] + row["chosen_logp_swapped"],
                row["rejected_logp"] + row["rejected_logp_swapped"])
    return row["chosen_logp"], row["rejected_logp"]


def pairwise_metrics(rows: Sequence[dict[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    """Pairwise accuracy, DMPO-protocol AUC, candidate ROC-AUC, position-split accuracy and
    the listed-first preference (position bias).

    Rows scored under both candidate orders (``*_swapped``) are ranked by the sum of
    the two log-probs, log pi(y | x) + log pi(y | x_swapped), which cancels a preference
    for copying the prompt's order; ``pairwise_accuracy_given_order`` keeps the
    single-order number. ``listed_first_preference`` is the share of pairs whose
    listed-first title the model ranks first on the given order (0.5 = no position bias).
    """
    from prefrec.metrics import compute_all, evaluate_metric, pairwise_accuracy

    def column(key: str) -> np.ndarray:
        return np.array([r[key] for r in rows], dtype=np.float64)

    chosen_given, rejected_given = column("chosen_logp"), column("rejected_logp")
    both = all("chosen_logp_swapped" in r for r in rows)
    ranked = np.array([ranking_logps(r) for r in rows], dtype=np.float64).reshape(-1, 2)
    chosen, rejected = ranked[:, 0], ranked[:, 1]
    chosen_n = column("chosen_tokens") * (2 if both else 1)
    rejected_n = column("rejected_tokens") * (2 if both else 1)
    first = np.array([r["positive_first"] for r in rows], dtype=bool)

    metrics = compute_all("pairwise", chosen=chosen, rejected=rejected, n_boot=n_boot, seed=seed)
    if both:
        metrics["pairwise_accuracy_given_order"] = evaluate_metric(
            "pairwise_accuracy_given_order", pairwise_accuracy, chosen_given, rejected_given,
            n_boot=n_boot, seed=seed,
        )
    metrics["listed_first_preference"] = evaluate_metric(
        "listed_first_preference",
        pairwise_accuracy,
        np.where(first, chosen_given, rejected_given),
        np.where(first, rejected_given, chosen_given),
        n_boot=n_boot,
        seed=seed,
    )
    metrics["pairwise_accuracy_length_normalised"] = evaluate_metric(
        "pairwise_accuracy_length_normalised",
        pairwise_accuracy,
        chosen / chosen_n,
        rejected / rejected_n,
        n_boot=n_boot,
        seed=seed,
    )
    for name, mask in (("positive_listed_first", first), ("positive_listed_second", ~first)):
        if mask.any():
            key = f"pairwise_accuracy_{name}"
            metrics[key] = evaluate_metric(
                key, pairwise_accuracy, chosen[mask], rejected[mask], n_boot=n_boot, seed=seed
            )
    return metrics


# Listed-first preference outside these bounds: the model mostly copies (or reverses) the
# prompt's order, so its accuracy says little about what it learned of the user.
POSITION_BIAS_BOUNDS = (0.35, 0.65)


def position_bias_warning(metrics: dict[str, Any]) -> str | None:
    """A one-line warning when a pairwise model's listed-first preference lies outside
    :data:`POSITION_BIAS_BOUNDS` (``metrics``: metric name -> ``{"value": ...}`` as in
    ``metrics.json``, or :class:`~prefrec.metrics.MetricResult` objects); else None."""
    found = metrics.get("listed_first_preference")
    value = found.get("value") if isinstance(found, dict) else getattr(found, "value", None)
    low, high = POSITION_BIAS_BOUNDS
    if value is None or low <= value <= high:
        return None
    side = "listed-first" if value > high else "listed-second"
    return (f"degenerate ranking: listed-first preference {value:.3f} is outside "
            f"[{low}, {high}]; the model mostly ranks the {side} title first, whatever it is")


def selection_metrics(rows: Sequence[dict[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    """Likelihood ranking over all candidates: HR@k, NDCG@k, MRR (summed log-prob score)."""
    from prefrec.metrics import compute_all

    sizes = {len(r["logps"]) for r in rows}
    if len(sizes) != 1:
        raise PrefrecError(f"candidate lists differ in size ({sorted(sizes)}); cannot rank jointly")
    scores = np.array([r["logps"] for r in rows], dtype=np.float64)
    target = np.array([r["target_index"] for r in rows], dtype=np.int64)
    return compute_all(
        "selection", scores=scores, target_index=target, n_boot=n_boot, seed=seed
    )


def generation_metrics(
    rows: Sequence[dict[str, Any]],
    examples: Sequence[SelectionExample],
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """S-DPO's ValidRatio and HitRatio@1 from greedy answers."""
    from prefrec.metrics import compute_all

    generated = [r["generated"] for r in rows]
    candidates = [list(examples[r["index"]].candidates) for r in rows]
    targets = [examples[r["index"]].target for r in rows]
    return compute_all(
        "generation",
        generated_texts=generated,
        candidates_lists=candidates,
        targets=targets,
        n_boot=n_boot,
        seed=seed,
    )


def metrics_markdown(title: str, metrics: dict[str, Any], notes: Sequence[str] = ()) -> str:
    lines = [f"# {title}", "", "| metric | value | 95% CI | n |", "|---|---|---|---|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | {m.value:.4f} | [{m.ci_low:.4f}, {m.ci_high:.4f}] | {m.n} |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- orchestration


def evaluate(
    model,
    tokenizer,
    examples: Sequence[Example],
    out_dir: str | Path,
    settings: EvalSettings,
    batch_size: int = 8,
    n_boot: int = 1000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score ``examples`` (subset per ``settings``), write the outputs, return the metrics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "eval_config.json"
    if overwrite:
        for name in ("scores.jsonl", "generations.jsonl", "metrics.json", "metrics.md",
                     "eval_time.json"):
            (out / name).unlink(missing_ok=True)
    elif cfg_path.exists():
        previous = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not same_settings(previous, settings):
            raise PrefrecError(
                f"{out} holds an evaluation with other settings; use another --out or --overwrite"
            )
    atomic_write_json(cfg_path, asdict(settings))

    indices = subset_indices(len(examples), settings.limit, settings.seed)
    clock = EvalClock(out / "eval_time.json")
    metrics: dict[str, Any] = {}
    notes = [f"data: {settings.data}", f"model: {settings.model}"]
    if settings.adapters:
        notes.append("adapters: " + ", ".join(settings.adapters))
    # Sequences past the model's context would be scored at positions it never saw:
    # state the cut (oldest history first) and refuse records that cannot fit at all.
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context:
        from prefrec.data.lengths import LengthLimit, check_examples_fit

        check_examples_fit(examples,
                           LengthLimit(tokenizer, settings.template, context), settings.data)
    if settings.task == "pairwise":
        rows = _score_rows(model, tokenizer, examples, indices, settings.template, batch_size,
                           out / "scores.jsonl", orders=settings.orders, max_length=context,
                           clock=clock)
        metrics.update(pairwise_metrics(rows, n_boot, settings.seed))
        if settings.orders == "both":
            notes.append("scores: sum of the log-probs under both candidate orders")
    else:
        if "likelihood" in settings.modes:
            rows = _score_rows(model, tokenizer, examples, indices, settings.template,
                               batch_size, out / "scores.jsonl", max_length=context,
                               clock=clock)
            metrics.update(selection_metrics(rows, n_boot, settings.seed))
        if "generate" in settings.modes:
            rows = _generate_rows(model, tokenizer, examples, indices, settings.template,
                                  batch_size, settings.max_new_tokens, out / "generations.jsonl",
                                  clock=clock)
            metrics.update(generation_metrics(rows, examples, n_boot, settings.seed))
    elapsed = clock.save(force=True)
    notes.append(f"wall time: {elapsed:.1f} s for {len(indices)} examples")
    warning = position_bias_warning(metrics)
    if warning:
        log.warning("%s: %s", out, warning)
        notes.insert(0, f"**WARNING: {warning}**")
    result = {
        "settings": asdict(settings),
        "wall_time_s": elapsed,
        "metrics": {k: v.to_dict() for k, v in metrics.items()},
        "warnings": [warning] if warning else [],
    }
    atomic_write_json(out / "metrics.json", result)
    atomic_write_text(out / "metrics.md", metrics_markdown(f"Evaluation of {settings.model}",
                                                           metrics, notes))
    return result


def run_eval(
    data: str,
    out: str | Path | None = None,
    *,
    model: str = "smollm2-135m",
    adapter: str | Path | None = None,
    template: str = "alpaca",
    data_dir: str | None = None,
    limit: int | None = None,
    seed: int = 42,
    mode: str = "likelihood",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    n_boot: int = 1000,
    dtype: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    orders: str = "given",
) -> tuple[Path, dict[str, Any]]:
    """Resolve ``data``, load the model (+ adapter chain), evaluate; returns (out, metrics.json).

    A folder whose ``metrics.json`` already holds these settings is returned as it is,
    without loading the model, so pipelines can re-run finished evaluations for free.
    """
    from prefrec.adapters import adapter_chain
    from prefrec.data.formats import load_examples
    from prefrec.data.resolve import resolve_dataset
    from prefrec.model import load_for_scoring, resolve_device, resolve_dtype

    if limit is not None and limit < 1:
        raise PrefrecError(f"--limit {limit}: expected at least 1")
    path = resolve_dataset(data, data_dir=data_dir)
    examples = load_examples(path)
    if not examples:
        raise PrefrecError(f"{path}: no examples")
    task = "pairwise" if isinstance(examples[0], PairwiseExample) else "selection"
    chain = adapter_chain(adapter, model)
    template = template if chain.template is None else chain.template
    modes = ["likelihood", "generate"] if mode == "both" else [mode]
    if task == "pairwise" and modes != ["likelihood"]:
        raise PrefrecError("--mode generate applies to candidate-selection data only")
    if orders not in ORDERS:
        raise PrefrecError(f"--orders {orders}: expected one of {', '.join(ORDERS)}")
    if orders == "both" and task != "pairwise":
        raise PrefrecError("--orders both applies to pairwise data only")
    settings = EvalSettings(
        data=str(path),
        model=chain.base_model,
        adapters=[str(a) for a in chain.adapters],
        template=template,
        limit=limit,
        seed=seed,
        n_examples=len(examples),
        task=task,
        modes=modes,
        max_new_tokens=max_new_tokens,
        dtype=str(resolve_dtype(dtype, resolve_device(device))).removeprefix("torch."),
        orders=orders,
    )
    out = Path(out or Path("runs") / "eval" / path.stem)
    done = out / "metrics.json"
    if not overwrite and done.is_file():
        result = json.loads(done.read_text(encoding="utf-8"))
        if same_settings(result.get("settings"), settings):
            log.info("%s already holds this evaluation; nothing to do", out)
            return out, result
    loaded, tokenizer = load_for_scoring(
        chain.base_model, settings.adapters, dtype=dtype, device=device
    )
    result = evaluate(loaded, tokenizer, examples, out, settings, batch_size=batch_size,
                      n_boot=n_boot, overwrite=overwrite)
    return out, result


def eval_command(args: argparse.Namespace) -> None:
    out, result = run_eval(
        args.data, args.out, model=args.model, adapter=args.adapter, template=args.template,
        data_dir=args.data_dir, limit=args.limit, seed=args.seed, mode=args.mode,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, n_boot=args.n_boot,
        dtype=args.dtype, device=args.device, overwrite=args.overwrite, orders=args.orders,
    )
    print((out / "metrics.md").read_text(encoding="utf-8"))
    print(f"wrote {out}/metrics.json ({result['wall_time_s']:.1f} s)")


def summary_table(eval_dirs: Sequence[str | Path], metrics: Sequence[str] | None = None) -> str:
    """A markdown table, one row per evaluation folder, one column per metric (value [CI])."""
    rows = []
    for d in eval_dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise PrefrecError(f"{d}: no metrics.json (has this evaluation finished?)")
        rows.append((Path(d).name, json.loads(path.read_text(encoding="utf-8"))))
    names = list(metrics or dict.fromkeys(k for _, r in rows for k in r["metrics"]))
    lines = [
        "| run | " + " | ".join(names) + " | n | wall time |",
        "|---" * (len(names) + 3) + "|",
    ]
    for run, result in rows:
        cells = []
        n = ""
        for name in names:
            m = result["metrics"].get(name)
            if m is None or m["value"] is None:
                cells.append("–")
                continue
            cells.append(f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]")
            n = n or str(m["n"])
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {n} | {result['wall_time_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def summarize_command(args: argparse.Namespace) -> None:
    table = summary_table(args.dirs, args.metrics.split(",") if args.metrics else None)
    print(table)
    if args.output:
        atomic_write_text(args.output, table)
