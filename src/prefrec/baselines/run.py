"""``prefrec baselines``: fit each baseline on training files, score an eval file, report.

Output folder layout (``--out``)::

    <method>/scores.jsonl   one row per eval example, in ``prefrec eval``'s format: pairwise
                            rows carry the method's score of the positive / negative item in
                            ``chosen_logp`` / ``rejected_logp`` (token counts 1, plus
                            ``score_kind``), selection rows the candidates' scores in ``logps``
    <method>/metrics.json   {settings, wall_time_s, cpu_time_s, metrics, hyperparameters,
                            search}: the layout of ``prefrec eval``'s, plus the chosen
                            hyperparameters and every validation trial
    <method>/metrics.md     the metrics table (prefrec.evaluate.metrics_markdown)
    baselines.md            all methods side by side (prefrec.evaluate.summary_table)

The eval subset (``limit``) and the bootstrap use ``subset_seed`` exactly as
``prefrec eval --limit N --seed S`` does, so rows are paired with a model's eval rows by
``index``. A method whose ``metrics.json`` holds the same settings is not recomputed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from prefrec.baselines import METHODS
from prefrec.baselines.base import search
from prefrec.baselines.config import BaselinesConfig, config_from_dict, load_config
from prefrec.baselines.items import (
    baskets_from_examples,
    carries_item_ids,
    item_titles,
    query_from_example,
)
from prefrec.data.schema import PairwiseExample, SelectionExample
from prefrec.errors import PrefrecError
from prefrec.evaluate import (
    metrics_markdown,
    pairwise_metrics,
    selection_metrics,
    subset_indices,
    summary_table,
)
from prefrec.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

log = logging.getLogger(__name__)

Example = PairwiseExample | SelectionExample
DEFAULT_METHODS = tuple(METHODS)


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Method names from a comma list or a sequence; unknown names raise PrefrecError."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    names = [m for m in names if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise PrefrecError(
            f"unknown baseline method(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(METHODS)}"
        )
    if not names:
        raise PrefrecError(f"no baseline method given; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def score_rows(
    method: str, examples: Sequence[Example], indices: Sequence[int], scores: Sequence[np.ndarray]
) -> list[dict[str, Any]]:
    """Per-example rows in ``prefrec eval``'s ``scores.jsonl`` format."""
    rows = []
    for i, s in zip(indices, scores, strict=True):
        ex = examples[i]
        if isinstance(ex, PairwiseExample):
            rows.append({
                "index": i,
                "user": ex.user,
                "positive_first": ex.positive_listed_first,
                "chosen_logp": float(s[ex.positive]),
                "rejected_logp": float(s[1 - ex.positive]),
                "chosen_tokens": 1,
                "rejected_tokens": 1,
                "score_kind": method,
            })
        else:
            rows.append({
                "index": i,
                "user": ex.user,
                "target_index": ex.target_index,
                "logps": [float(v) for v in s],
                "n_tokens": [1] * len(s),
                "score_kind": method,
            })
    return rows


def _load(paths: Sequence[str | Path], data_dir: str | Path | None) -> tuple[list[Path], list]:
    from prefrec.data.formats import load_examples
    from prefrec.data.resolve import resolve_dataset

    resolved = [resolve_dataset(p, data_dir=data_dir) for p in paths]
    examples = []
    for path in resolved:
        rows = load_examples(path)
        if not rows:
            raise PrefrecError(f"{path}: no examples")
        examples.extend(rows)
    return resolved, examples


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _previous(folder: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The stored result when it was computed with ``settings``; None to (re)compute."""
    path = folder / "metrics.json"
    if not path.is_file() or overwrite:
        return None
    stored = json.loads(path.read_text(encoding="utf-8"))
    if stored.get("settings") == settings:
        return stored
    raise PrefrecError(
        f"{folder} holds results with other settings; use another --out or --overwrite"
    )


def run_method(
    name: str,
    config: BaselinesConfig,
    baskets: list,
    titles: dict[str, str],
    examples: Sequence[Example],
    indices: Sequence[int],
    folder: Path,
    settings: dict[str, Any],
    seed: int,
    n_boot: int,
) -> dict[str, Any]:
    """Search, fit and score one method; write its folder; return its metrics.json content."""
    started, cpu_started = time.perf_counter(), time.process_time()
    method_config = config.method(name)
    if name == "content" and method_config.cache is None:
        method_config = replace(method_config, cache=str(folder / "title_embeddings.npz"))
    method = METHODS[name]
    log.info("%s: fitting on %d training users", name, len(baskets))
    chosen, trials = search(
        method.build, method_config, baskets, titles, config.validation_fraction, seed
    )
    model = method.build(chosen, seed)
    model.fit(baskets, titles)
    use_ids = settings["item_identity"] == "id"
    queries = [query_from_example(examples[i], use_ids) for i in indices]
    rows = score_rows(name, examples, indices, model.score(queries))
    atomic_write_jsonl(folder / "scores.jsonl", rows)
    if settings["task"] == "pairwise":
        metrics = pairwise_metrics(rows, n_boot, settings["subset_seed"])
    else:
        metrics = selection_metrics(rows, n_boot, settings["subset_seed"])
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    hyperparameters = {k: v for k, v in asdict(chosen).items() if k != "grid"}
    result = {
        "settings": settings,
        "wall_time_s": elapsed,
        "cpu_time_s": cpu,
        "metrics": {k: v.to_dict() for k, v in metrics.items()},
        "hyperparameters": _jsonable(hyperparameters),
        "search": _jsonable([{"params": t.params, "validation_pair_auc": t.score} for t in trials]),
    }
    atomic_write_json(folder / "metrics.json", result)
    notes = [
        f"method: {name} ({method.description})",
        "train: " + ", ".join(settings["train"]),
        f"eval: {settings['eval']}",
        f"hyperparameters: {json.dumps(result['hyperparameters'])}",
        f"wall time: {elapsed:.1f} s (CPU {cpu:.1f} s) for {len(indices)} examples",
    ]
    atomic_write_text(folder / "metrics.md", metrics_markdown(f"Baseline {name}", metrics, notes))
    log.info("%s: done in %.1f s (%s)", name, elapsed, json.dumps(result["hyperparameters"]))
    return result


def run_baselines(
    train_paths: Sequence[str | Path],
    eval_path: str | Path,
    methods: str | Sequence[str],
    out_dir: str | Path,
    config: BaselinesConfig | dict | str | Path | None = None,
    seed: int = 42,
    limit: int | None = None,
    *,
    subset_seed: int = 0,
    n_boot: int = 1000,
    overwrite: bool = False,
    data_dir: str | Path | None = None,
) -> dict[str, dict]:
    """Fit and score each method; returns ``{method: metrics.json content}``.

    ``train_paths`` and ``eval_path`` are files or dataset names (``ml1m-sft``, ...);
    ``config`` a :class:`BaselinesConfig`, a YAML-like dict or a YAML file; ``seed`` seeds
    training and the validation split; ``limit`` / ``subset_seed`` pick the eval subset
    as ``prefrec eval --limit --seed`` does.
    """
    if not train_paths:
        raise PrefrecError("no training file given")
    train_files, train = _load(train_paths, data_dir)
    (eval_file,), examples = _load([eval_path], data_dir)
    return run_baselines_on_examples(
        train, examples, methods, out_dir, config, seed, limit,
        train_names=[str(p) for p in train_files], eval_name=str(eval_file),
        subset_seed=subset_seed, n_boot=n_boot, overwrite=overwrite,
    )


def run_baselines_on_examples(
    train: Sequence[Example],
    examples: Sequence[Example],
    methods: str | Sequence[str],
    out_dir: str | Path,
    config: BaselinesConfig | dict | str | Path | None = None,
    seed: int = 42,
    limit: int | None = None,
    *,
    train_names: Sequence[str] = ("<examples>",),
    eval_name: str = "<examples>",
    subset_seed: int = 0,
    n_boot: int = 1000,
    overwrite: bool = False,
) -> dict[str, dict]:
    """:func:`run_baselines` on examples in memory, e.g. straight from
    :func:`prefrec.data.protocols.build_dmpo`, whose examples carry raw item ids (then
    items are keyed by id, not title). ``train_names`` / ``eval_name`` go in the settings."""
    names = parse_methods(methods)
    if limit is not None and limit < 1:
        raise PrefrecError(f"--limit {limit}: expected at least 1")
    if not train or not examples:
        raise PrefrecError("no training or no eval examples")
    if not isinstance(config, BaselinesConfig):
        config = config_from_dict(config) if isinstance(config, dict) or config is None else \
            load_config(config)
    task = "pairwise" if isinstance(examples[0], PairwiseExample) else "selection"
    use_ids = carries_item_ids([*train, *examples])
    baskets = baskets_from_examples(train, use_ids)
    titles = item_titles([*train, *examples], use_ids)
    indices = subset_indices(len(examples), limit, subset_seed)
    log.info(
        "baselines: %d training examples (%d users), %d of %d eval examples (%s), items by %s",
        len(train), len(baskets), len(indices), len(examples), task,
        "raw id" if use_ids else "normalised title",
    )
    out = Path(out_dir)
    results = {}
    for name in names:
        folder = out / name
        settings = _jsonable({
            "method": name,
            "train": list(train_names),
            "eval": eval_name,
            "seed": seed,
            "limit": limit,
            "subset_seed": subset_seed,
            "n_boot": n_boot,
            "n_examples": len(examples),
            "task": task,
            "item_identity": "id" if use_ids else "title",
            "validation_fraction": config.validation_fraction,
            "config": asdict(config.method(name)),
        })
        previous = _previous(folder, settings, overwrite)
        if previous is not None:
            log.info("%s: %s/metrics.json has these settings; skipped", name, folder)
            results[name] = previous
            continue
        results[name] = run_method(
            name, config, baskets, titles, examples, indices, folder, settings, seed, n_boot
        )
    table = summary_table([out / name for name in names])
    header = (
        f"# Baselines on {Path(eval_name).name}\n\n"
        f"train: {', '.join(Path(n).name for n in train_names)}; "
        f"seed {seed}; {len(indices)} eval examples\n\n"
    )
    atomic_write_text(out / "baselines.md", header + table)
    return results


# --------------------------------------------------------------------------- CLI


def add_baselines_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", nargs="+", required=True,
                   help="training files or dataset names (e.g. ml1m-sft ml1m-dpo-5)")
    p.add_argument("--eval", required=True, help="eval file or dataset name (e.g. ml1m-eval)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma list of methods (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: runs/baselines/<eval>)")
    p.add_argument("--config", default=None, help="YAML file of method hyperparameters")
    p.add_argument("--seed", type=int, default=42,
                   help="training and validation-split seed (default: 42)")
    p.add_argument("--limit", type=int, default=None,
                   help="score a seeded random subset of the eval file, as prefrec eval --limit")
    p.add_argument("--subset-seed", type=int, default=0,
                   help="subset and bootstrap seed, as prefrec eval --seed (default: 0)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--overwrite", action="store_true", help="recompute results already in --out")
    p.add_argument("--data-dir", default=None,
                   help="where named datasets live (default: $PREFREC_DATA, then ../shared/data)")


def baselines_command(args: argparse.Namespace) -> None:
    out = Path(args.out or Path("runs") / "baselines" / Path(str(args.eval)).stem)
    run_baselines(
        args.train, args.eval, args.methods, out, config=args.config, seed=args.seed,
        limit=args.limit, subset_seed=args.subset_seed, n_boot=args.n_boot,
        overwrite=args.overwrite, data_dir=args.data_dir,
    )
    print((out / "baselines.md").read_text(encoding="utf-8"))
    print(f"wrote {out}")
