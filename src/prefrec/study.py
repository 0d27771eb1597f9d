"""Settings studies: ``prefrec study STUDY.yaml [--only NAME ...]``.

A study runs one run config (:mod:`prefrec.runner`) under several named variants, each a
list of ``key=value`` overrides changed one at a time from the first (the default), and
tabulates every model's validation metrics side by side. The study file::

    base: configs/ml100k-data-rich.yaml     # the run config
    out: runs/quality-study
    overrides: [...]                        # applied to every variant (e.g. eval on valid)
    metric: pairwise_accuracy               # the column the table ranks by
    variants:
      default: []
      lr-1e-4: [align.lr=1.0e-4]

The default is the variant named ``default`` (else the first). Variant ``V`` runs in ``<out>/V`` with its data built once in ``<out>/data`` (or in
``<out>/V/data`` when it changes the ``build`` section). A variant
whose SFT settings equal the default's starts from a copy of the default's finished SFT
adapter (and of its zero-shot evaluation, when those settings match too) instead of
training it again: the same config and seed give the same adapter. Outputs:
``<out>/study.md``, ``<out>/study.json`` and the plot ``<out>/study.png``, rewritten
after every variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prefrec.config_io import ConfigSource, check_section, dataclass_hints, read_yaml_mapping
from prefrec.errors import PrefrecError
from prefrec.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

@dataclass
class StudyFile:
    """The keys of a study file and their types (variants are checked in detail below)."""

    base: str
    out: str
    variants: dict[Any, Any]
    overrides: list[str] = field(default_factory=list)
    metric: str = "pairwise_accuracy"


def load_study(path: str | Path) -> dict[str, Any]:
    """Read and check a study file, and every variant's run config (base + overrides), so
    that a bad value in any variant fails now, not after the variants before it ran."""
    path = Path(path)
    study = read_yaml_mapping(path, "study")
    check_section(ConfigSource(path), "", study, dataclass_hints(StudyFile))
    for key in ("base", "out", "variants"):
        if key not in study:
            raise PrefrecError(f"{path}: missing {key}")
    variants = study["variants"]
    if not variants:
        raise PrefrecError(f"{path}: variants must be a non-empty mapping of name -> overrides")
    for name, overrides in variants.items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise PrefrecError(f"{path}: variants.{name} must be a list of key=value strings")
        if "/" in str(name) or str(name).startswith("."):
            raise PrefrecError(f"{path}: variants.{name}: not a folder name")
    study.setdefault("overrides", [])
    study.setdefault("metric", "pairwise_accuracy")
    for name in variants:
        try:
            variant_config(study, name)
        except PrefrecError as err:
            raise PrefrecError(f"{path}: variant {name}: {err}") from None
    return study


def default_variant(study: dict[str, Any]) -> str:
    """The variant the others change one setting of: ``default``, else the first listed."""
    return "default" if "default" in study["variants"] else next(iter(study["variants"]))


def variant_config(study: dict[str, Any], name: str) -> dict[str, Any]:
    """The run config of one variant: base + study overrides + the variant's overrides."""
    from prefrec.runner import load_config

    out = Path(study["out"])
    changes = study["variants"][name]
    # Variants share one data build unless they change it.
    data = out / name / "data" if any(o.startswith("build.") for o in changes) else out / "data"
    overrides = [*study["overrides"], *changes, f"out={out / name}", f"data_dir={data}",
                 f"name={name}"]
    return load_config(study["base"], overrides)


def _same(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...]) -> bool:
    return all(a.get(k) == b.get(k) for k in keys)


def reuse_default_stages(default: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Copy the default variant's finished SFT adapters, zero-shot evaluations and SFT
    evaluations into a variant whose settings for them are the same; returns what was
    copied. A copied evaluation's settings name the copied adapter, as the variant's
    own evaluation would."""
    from prefrec.runner import experiments

    copied = []
    model_keys = ("model", "template", "dtype", "device", "build", "data_dir")
    if not _same(default, config, model_keys):
        return copied
    src_root, dst_root = Path(default["out"]), Path(config["out"])
    for exp, other in zip(experiments(config), experiments(default), strict=False):
        if (exp.name, exp.sft, exp.eval) != (other.name, other.sft, other.eval):
            continue
        pairs = []
        if config["sft"] == default["sft"]:
            pairs.append(f"{exp.name}/sft")
        if config["eval"] == default["eval"]:
            pairs.append(f"{exp.name}/eval/zero-shot")
            if config["sft"] == default["sft"]:
                pairs.append(f"{exp.name}/eval/sft")
        for rel in pairs:
            src, dst = src_root / rel, dst_root / rel
            finished = (src / "adapter" / "adapter_config.json").is_file() or (
                src / "metrics.json"
            ).is_file()
            if not finished or dst.exists():
                continue
            # Checkpoints are only for resuming a killed run; the final adapter is enough.
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
            _point_settings_at(dst, str(src_root), str(dst_root))
            copied.append(rel)
    return copied


def _point_settings_at(folder: Path, old_root: str, new_root: str) -> None:
    """Rewrite the adapter paths in a copied evaluation's settings from the default's
    folder to the variant's (the adapters there are copies of the same files)."""
    def moved(adapters: list[str]) -> list[str]:
        return [new_root + a[len(old_root):] if a.startswith(old_root) else a for a in adapters]

    config_path, metrics_path = folder / "eval_config.json", folder / "metrics.json"
    if config_path.is_file():
        settings = json.loads(config_path.read_text(encoding="utf-8"))
        atomic_write_json(config_path, {**settings, "adapters": moved(settings["adapters"])})
    if metrics_path.is_file():
        result = json.loads(metrics_path.read_text(encoding="utf-8"))
        settings = result["settings"]
        result["settings"] = {**settings, "adapters": moved(settings["adapters"])}
        atomic_write_json(metrics_path, result)


def _metric_cell(metrics: dict[str, Any], name: str) -> str:
    from prefrec.evaluate import position_bias_warning

    m = metrics.get(name)
    if not m or m.get("value") is None:
        return "–"
    cell = f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
    if name == "listed_first_preference" and position_bias_warning(metrics):
        cell += " ⚠ degenerate"
    return cell


def table_columns(metric: str) -> list[str]:
    """The metrics the study tables show: the study's metric, then the position-bias pair."""
    return [metric, "pairwise_accuracy_given_order", "listed_first_preference"]


def study_rows(study: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (variant, model) with a finished evaluation, in variant order.

    Only the study's own experiments and language models count: a later run of another
    config into a variant's folder (e.g. the final test-set evaluation with more losses)
    adds experiments and models to its results.json that are not part of the variant."""
    from prefrec.runner import experiments, trained_models

    rows = []
    out = Path(study["out"])
    for name, overrides in study["variants"].items():
        results = out / name / "results.json"
        if not results.is_file():
            continue
        data = json.loads(results.read_text(encoding="utf-8"))
        config = variant_config(study, name)
        own = {e.name: set(trained_models(config, e, out / name)) for e in experiments(config)}
        for exp_name, exp in data["experiments"].items():
            if exp_name not in own:
                continue
            for label, entry in exp["models"].items():
                if entry.get("kind") == "llm" and label not in own[exp_name]:
                    continue
                rows.append({
                    "variant": name,
                    "overrides": overrides,
                    "experiment": exp_name,
                    "model": label,
                    "kind": entry.get("kind"),
                    "metrics": entry.get("metrics", {}),
                    "eval_seconds": entry.get("wall_time_s"),
                })
    return rows


def study_markdown(study: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    metric = study["metric"]
    columns = table_columns(metric)
    lines = [
        f"# Study: {Path(study['out']).name}",
        "",
        f"Base config `{study['base']}`; every variant also gets "
        f"`{' '.join(study['overrides']) or '(nothing)'}`. Values are point estimates with "
        "95% bootstrap intervals.",
        "",
        "| variant | overrides | model | " + " | ".join(columns) + " | n |",
        "|---" * (len(columns) + 4) + "|",
    ]
    for r in rows:
        n = next((m["n"] for m in r["metrics"].values() if isinstance(m, dict) and "n" in m), "")
        cells = [_metric_cell(r["metrics"], c) for c in columns]
        lines.append(
            f"| {r['variant']} | {' '.join(r['overrides']) or '(default)'} | {r['model']} | "
            + " | ".join(cells) + f" | {n} |"
        )
    return "\n".join(lines) + "\n"


def final_models(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each variant's last-trained language model (preference > SFT > zero-shot): the
    model a variant's setting is meant to move."""
    last: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["kind"] == "llm":
            last[r["variant"]] = r  # rows come in training order
    return list(last.values())


def final_models_markdown(study: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """One line per variant: its final model's metrics and the seconds its own training
    stages took (stages it reused from the default take ~0 s and are left out)."""
    from prefrec.runner import experiments, stage_rows, trained_models

    metric = study["metric"]
    columns = table_columns(metric)
    lines = ["| variant | overrides | final model | " + " | ".join(columns)
             + " | training stages |", "|---" * (len(columns) + 4) + "|"]
    for r in final_models(rows):
        config = variant_config(study, r["variant"])
        folder = Path(study["out"]) / r["variant"]
        own = {f"{e.name}/{label}" for e in experiments(config)
               for label in trained_models(config, e, folder) if label != "zero-shot"}
        seconds = [f"{s['stage'].split('/', 1)[-1]} {s['seconds']:.0f} s"
                   for s in stage_rows(folder) if s["stage"] in own and s["seconds"] >= 5]
        cells = [_metric_cell(r["metrics"], c) for c in columns]
        lines.append(f"| {r['variant']} | {' '.join(r['overrides']) or '(default)'} | "
                     f"{r['model']} | " + " | ".join(cells) + f" | {', '.join(seconds) or '–'} |")
    return "\n".join(lines) + "\n"


def study_plot(study: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> bool:
    """Every variant's final model: the study metric with its 95% CI, against the
    default's zero-shot and SFT values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefrec.report import save_png

    metric = study["metric"]
    finals = [r for r in final_models(rows) if r["metrics"].get(metric, {}).get("value") is not None]
    if not finals:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 0.32 * len(finals) + 2.0))
    ys = np.arange(len(finals))[::-1]
    vals = np.array([r["metrics"][metric]["value"] for r in finals])
    err = np.array([[v - r["metrics"][metric]["ci_low"] for v, r in zip(vals, finals, strict=True)],
                    [r["metrics"][metric]["ci_high"] - v for v, r in zip(vals, finals, strict=True)]])
    ax.errorbar(vals, ys, xerr=err, fmt="o", capsize=3, color="#4C72B0")
    ax.set_yticks(ys, [f"{r['variant']} ({r['model']})" for r in finals], fontsize=8)
    first = default_variant(study)
    styles = {"zero-shot": ("#55A868", ":"), "sft": ("#8172B2", "-.")}
    for r in rows:
        if r["variant"] == first and r["model"] in styles and metric in r["metrics"]:
            color, line = styles[r["model"]]
            ax.axvline(r["metrics"][metric]["value"], color=color, linestyle=line,
                       linewidth=1, label=f"{first} {r['model']}")
    if metric.startswith("pairwise"):
        ax.axvline(0.5, color="#C44E52", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel(f"{metric} (95% CI)")
    ax.grid(axis="x", alpha=0.3)
    # Below the axes: inside, it would cover the whiskers of the last variants.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.tight_layout()
    save_png(fig, path)
    return True


# Overrides that change how much a variant trains on (or its LoRA rank, which names the
# curve), not how: only such variants are points of the learning curve.
_SIZE_OVERRIDES = ("build.pairs_per_user", "build.groups_per_user", "build.train_history",
                   "build.train_block", "build.pairs_per_history", "sft.limit", "align.limit",
                   "sft.epochs", "align.epochs", "sft.pack_by_user", "align.pack_by_user",
                   "sft.batch_size", "align.batch_size", "zero_shot",
                   "sft.lora_r", "sft.lora_alpha", "align.lora_r", "align.lora_alpha")


def examples_seen(config: dict[str, Any], stage: str) -> float | None:
    """Training examples one stage of a run config passes over: SFT pairs (``stage`` =
    "sft") or preference groups ("align"), as its data build draws them (users x per-user
    count, capped by the stage's ``limit``), times its epochs. None without a build or
    with ``pairs_per_user: all`` (the count then depends on the data)."""
    build, section = config.get("build"), config.get(stage)
    if not build or not section:
        return None
    per_user = build.get("pairs_per_user", 1) if stage == "sft" else build.get(
        "groups_per_user", 1)
    if per_user == "all":
        return None
    users = build.get("sft_users" if stage == "sft" else "dpo_users", 100)
    limit = section.get("limit")
    # align.limit counts users; sft.limit counts pairs.
    if stage == "sft":
        n = users * int(per_user) if limit is None else min(limit, users * int(per_user))
    else:
        n = (min(limit, users) if limit is not None else users) * int(per_user)
    from prefrec.train.config import AlignConfig, SFTConfig

    defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig if stage == "sft"
                                                              else AlignConfig)}
    epochs = section.get("epochs", defaults["epochs"])
    return n * epochs * (2 if section.get("both_orders") else 1)


def learning_curve_points(study: dict[str, Any], rows: list[dict[str, Any]],
                          metric: str | None = None) -> list[dict[str, Any]]:
    """(stage, series, examples seen, metric) of every trained model of the variants that
    only change the amount of training data (see ``_SIZE_OVERRIDES``). A series is a
    model label at one LoRA rank and history protocol, e.g. ``dmpo-k3 r64 fixed-history``."""
    metric = metric or study["metric"]
    points = []
    for r in rows:
        if r["kind"] != "llm" or r["model"] == "zero-shot" or metric not in r["metrics"]:
            continue
        if not all(o.split("=", 1)[0] in _SIZE_OVERRIDES for o in r["overrides"]):
            continue
        config = variant_config(study, r["variant"])
        stage = "sft" if r["model"] == "sft" else "align"
        seen = examples_seen(config, stage)
        if seen is None:
            continue
        rank = (config.get(stage) or {}).get("lora_r", 16)
        build = config.get("build") or {}
        fixed = ("" if not build.get("train_history") else
                 f" per-target, {build.get('pairs_per_history') or 1} pairs per target"
                 if build.get("train_block") == 1 else
                 f" history blocks of {build['train_block']}" if build.get("train_block") else
                 " fixed-history")
        points.append({"stage": stage, "series": f"{r['model']} r{rank}{fixed}",
                       "variant": r["variant"], "examples": seen, **r["metrics"][metric]})
    return points


def eval_curve_point(folder: Path, stage: str, series: str, examples: int,
                     metric: str) -> dict[str, Any]:
    """One evaluation folder (``metrics.json``) as a learning-curve point: for models
    trained outside a finished study (a variant stopped after its SFT stage)."""
    from prefrec.report import model_entry

    entry = model_entry(Path(folder), "llm", Path(folder))
    if entry is None or metric not in entry["metrics"]:
        raise PrefrecError(f"{folder}: no finished evaluation with {metric}")
    return _curve_point(entry["metrics"], metric, stage, series, examples)


def _curve_point(metrics: dict[str, Any], metric: str, stage: str, series: str,
                 examples: int) -> dict[str, Any]:
    """One metric of an evaluation's ``metrics`` (value, 95% CI, n) placed on the curve."""
    m = metrics[metric]
    return {"stage": stage, "series": series, "examples": examples, "name": metric,
            "value": m["value"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "n": m["n"]}


def baseline_curve_points(folders: dict[int, Path], metric: str) -> list[dict[str, Any]]:
    """Classical baselines trained on data of several sizes, as learning-curve points.

    ``folders`` maps the SFT pairs of a training set to a ``prefrec baselines --out``
    folder run on it (one ``<method>/metrics.json`` each), so the baselines' values can be
    drawn at the same x as the language models trained on the same files."""
    from prefrec.report import model_entry

    points = []
    for examples, folder in sorted(folders.items()):
        for method_dir in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
            entry = model_entry(method_dir, "baseline", Path(folder))
            if entry is None or metric not in entry["metrics"]:
                continue
            points.append({**_curve_point(entry["metrics"], metric, "sft", method_dir.name,
                                          examples), "baseline": True})
    return points


def learning_curve_plot(points: list[dict[str, Any]], baselines: dict[str, float],
                        path: Path, metric: str) -> bool:
    """Validation metric (95% CI) against training examples seen, one panel per stage and
    one line per series, with the baselines' values as horizontal lines. Points marked
    ``baseline`` (:func:`baseline_curve_points`) are drawn as grey curves, one line style
    each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefrec.report import save_png

    if not points:
        return False
    stages = [s for s in ("sft", "align") if any(p["stage"] == s for p in points)]
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 6.2), squeeze=False)
    titles = {"sft": "SFT: pairs seen", "align": "preference stage: groups seen"}
    for ax, stage in zip(axes[0], stages, strict=True):
        mine = [p for p in points if p["stage"] == stage]
        baseline_styles = iter([("#333333", "--", "s"), ("#777777", ":", "D"),
                                ("#aaaaaa", "-.", "^")] * 4)
        # tab10 then tab20's light shades, without their greys (the baselines use grey):
        # 18 colours before a repeat
        tab20 = plt.get_cmap("tab20").colors
        model_colors = itertools.cycle([tab20[i] for i in range(0, 20, 2) if i != 14]
                                       + [tab20[i] for i in range(1, 20, 2) if i != 15])
        for series in dict.fromkeys(p["series"] for p in mine):
            pts = sorted((p for p in mine if p["series"] == series), key=lambda p: p["examples"])
            xs = [p["examples"] for p in pts]
            ys = [p["value"] for p in pts]
            err = [[p["value"] - p["ci_low"] for p in pts], [p["ci_high"] - p["value"] for p in pts]]
            style: dict[str, Any] = {"marker": "o"}
            if pts[0].get("baseline"):
                color, line, marker = next(baseline_styles)
                style = {"color": color, "linestyle": line, "marker": marker}
            else:
                style["color"] = next(model_colors)
            ax.errorbar(xs, ys, yerr=err, capsize=3, label=series, **style)
        for (name, value), style in zip(baselines.items(), (":", "--", "-."), strict=False):
            ax.axhline(value, color="#777777", linestyle=style, linewidth=1,
                       label=f"{name} {value:.3f}")
        ax.set_xscale("log")
        ticks: list[float] = []
        for t in sorted({p["examples"] for p in mine}):
            if not ticks or t > ticks[-1] * 1.45:  # labels of near-equal counts overlap
                ticks.append(t)
        ax.set_xticks(ticks, [f"{t / 1000:.3g}k" if t >= 1000 else f"{t:g}" for t in ticks],
                      rotation=30)
        ax.minorticks_off()
        ax.set_xlabel(titles[stage] + " (log scale)")
        ax.set_ylabel(f"{metric} (95% CI)")
        ax.grid(alpha=0.3)
        # below the panel: with a dozen series, any spot inside hides points
        # (one column: two panels' legends side by side would run into each other)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=1)
    fig.suptitle("Learning curve: validation users")
    fig.tight_layout()
    save_png(fig, path)
    return True


def write_study_tables(study: dict[str, Any]) -> Path:
    """``study.json``, ``study.md`` and (with at least one finished model) ``study.png``."""
    rows = study_rows(study)
    out = Path(study["out"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "study.json", {"study": study, "rows": rows})
    markdown = study_markdown(study, rows)
    if final_models(rows):
        markdown += ("\n## Each variant's final model\n\n"
                     + final_models_markdown(study, rows))
    if study_plot(study, rows, out / "study.png"):
        markdown += "\nEach variant's final model: ![study](study.png)\n"
    metric = study["metric"]
    baselines = {r["model"]: r["metrics"][metric]["value"] for r in rows
                 if r["kind"] == "baseline" and metric in r["metrics"]}
    if learning_curve_plot(learning_curve_points(study, rows), baselines,
                           out / "learning_curve.png", metric):
        markdown += "\nLearning curve: ![learning curve](learning_curve.png)\n"
    atomic_write_text(out / "study.md", markdown)
    return out / "study.md"


def run_study(study: dict[str, Any], only: list[str] | None = None) -> Path:
    """Run the variants in order (the default first, so later ones can reuse it)."""
    from prefrec.runner import run

    names = list(study["variants"])
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise PrefrecError(f"--only {unknown}: not variants of this study ({', '.join(names)})")
    first = default_variant(study)
    names = [first] + [n for n in names if n != first]
    default = variant_config(study, first)
    for name in names:
        if only and name not in only:
            continue
        config = variant_config(study, name)
        if name != first:
            copied = reuse_default_stages(default, config)
            if copied:
                log.info("variant %s reuses the default's %s", name, ", ".join(copied))
        started = time.perf_counter()
        log.info("variant %s: %s", name, " ".join(study["variants"][name]) or "(default)")
        run(config)
        log.info("variant %s finished in %.0f s", name, time.perf_counter() - started)
        write_study_tables(study)
    return write_study_tables(study)


def add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study file (YAML), e.g. configs/quality-study.yaml")
    p.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                   help="run only these variants (the table keeps every finished one)")
    p.add_argument("--table-only", action="store_true",
                   help="rewrite study.md/json from finished variants without running")


def study_command(args: argparse.Namespace) -> None:
    study = load_study(args.study)
    table = write_study_tables(study) if args.table_only else run_study(study, args.only)
    print(table.read_text(encoding="utf-8"))
    print(f"wrote {table}")
