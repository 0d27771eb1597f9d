"""The run report: ``results.json`` for machines, ``report.md`` and ``report.html`` for people.

It reads only what the stages left on disk (eval folders with ``metrics.json`` and
``scores.jsonl``, training ``log.jsonl`` files, the audit, ``stages.jsonl``), so it can be
rebuilt at any time with ``prefrec run CONFIG --report-only``. Missing stages show as
missing; nothing is filled in.

Significance: for the headline comparisons (best preference model vs SFT, vs zero-shot,
vs the best baseline) on the examples both models scored, a paired bootstrap p-value of
the primary metric's difference and an exact McNemar test on per-example hits
(pairwise: chosen log-prob strictly above rejected; selection: target ranked first).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from prefrec.evaluate import position_bias_warning
from prefrec.io import atomic_open, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

HEADLINE = {
    # given order: the published protocol (one listing per pair), beside the both-listings one
    "pairwise": ["pairwise_accuracy", "pairwise_accuracy_given_order", "dmpo_auc",
                 "candidate_roc_auc",
                 "pairwise_accuracy_positive_listed_first",
                 "pairwise_accuracy_positive_listed_second", "listed_first_preference"],
    "selection": ["hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr", "valid_ratio", "gen_hr@1"],
}
PRIMARY = {"pairwise": "pairwise_accuracy", "selection": "hr@1"}
SHORT = {
    "pairwise_accuracy": "accuracy",
    "pairwise_accuracy_given_order": "acc (given order)",
    "dmpo_auc": "DMPO AUC",
    "candidate_roc_auc": "ROC-AUC",
    "pairwise_accuracy_positive_listed_first": "acc (pos. 1st)",
    "pairwise_accuracy_positive_listed_second": "acc (pos. 2nd)",
    "listed_first_preference": "listed-1st pref.",
    "gen_hr@1": "gen HR@1",
    "valid_ratio": "ValidRatio",
}
CURVE_KEYS = ["loss", "rewards/margins", "logps/chosen", "logps/rejected"]


# --------------------------------------------------------------------------- collection


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def model_entry(folder: Path, kind: str, out: Path) -> dict[str, Any] | None:
    """A finished evaluation folder as a report row (None while it has no metrics.json)."""
    result = _read_json(folder / "metrics.json")
    if result is None:
        return None
    return {
        "kind": kind,
        "dir": str(folder.relative_to(out)),
        "task": result["settings"]["task"],
        "wall_time_s": result["wall_time_s"],
        "metrics": result["metrics"],
        # From the metrics, so evaluations written before the check carry it too.
        "warnings": [w] if (w := position_bias_warning(result["metrics"])) else [],
    }


def per_example_outcomes(folder: Path, task: str) -> dict[int, tuple[np.ndarray, ...]]:
    """Example index -> the arrays the primary metric takes, from ``scores.jsonl``.

    Pairwise: (chosen, rejected) log-probs as the evaluation ranked them (summed over both
    candidate orders when it scored both); selection: (rank of the target,).
    """
    from prefrec.evaluate import ranking_logps
    from prefrec.metrics import target_ranks

    path = folder / "scores.jsonl"
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]
    if task == "pairwise":
        return {r["index"]: ranking_logps(r) for r in rows}
    ranks = target_ranks(np.array([r["logps"] for r in rows], dtype=np.float64),
                         np.array([r["target_index"] for r in rows]))
    return {r["index"]: (int(rank),) for r, rank in zip(rows, ranks, strict=True)}


def compare(folder_a: Path, folder_b: Path, task: str, n_boot: int, seed: int) -> dict[str, Any]:
    """Paired bootstrap and McNemar p-values of A vs B on the examples both scored."""
    from prefrec.metrics import METRICS, mcnemar_pvalue, paired_bootstrap_pvalue

    a = per_example_outcomes(folder_a, task)
    b = per_example_outcomes(folder_b, task)
    common = sorted(set(a) & set(b))
    metric = METRICS[PRIMARY[task]]
    cols_a = [np.array(c, dtype=np.float64) for c in zip(*(a[i] for i in common), strict=True)]
    cols_b = [np.array(c, dtype=np.float64) for c in zip(*(b[i] for i in common), strict=True)]
    if task == "pairwise":
        hit_a, hit_b = cols_a[0] > cols_a[1], cols_b[0] > cols_b[1]
        # Accuracy counts a tie (e.g. a baseline that never saw either item) as half a
        # hit; McNemar needs 0/1 outcomes, so it uses the pairs neither model tied.
        decided = (cols_a[0] != cols_a[1]) & (cols_b[0] != cols_b[1])
        hit_a, hit_b = hit_a[decided], hit_b[decided]
    else:
        hit_a, hit_b = cols_a[0] == 1, cols_b[0] == 1
    value_a, value_b = metric.fn(*cols_a), metric.fn(*cols_b)
    return {
        "metric": metric.name,
        "n": len(common),
        "a": value_a,
        "b": value_b,
        "delta": value_a - value_b,
        "p_bootstrap": paired_bootstrap_pvalue(metric.fn, cols_a, cols_b, n_boot=n_boot,
                                               seed=seed, batched_fn=metric.batched_fn),
        "p_mcnemar": mcnemar_pvalue(hit_a, hit_b),
        "n_mcnemar": len(hit_a),
    }


def _significance(models: dict[str, dict], out: Path, task: str, n_boot: int,
                  seed: int) -> list[dict[str, Any]]:
    primary = PRIMARY[task]

    def value(label: str) -> float:
        return models[label]["metrics"].get(primary, {}).get("value") or float("-inf")

    preference = [m for m, e in models.items()
                  if e["kind"] == "llm" and m not in ("zero-shot", "sft") and "same_as" not in e]
    baselines = [m for m, e in models.items() if e["kind"] == "baseline"]
    if not preference:
        return []
    best = max(preference, key=value)
    rivals = [r for r in ("sft", "zero-shot") if r in models]
    if baselines:
        rivals.append(max(baselines, key=value))
    rows = []
    for rival in rivals:
        row = compare(out / models[best]["dir"], out / models[rival]["dir"], task, n_boot, seed)
        rows.append({"model": best, "versus": rival, **row})
    return rows


def cross_significance(cross: dict[str, dict[str, dict]], experiments: dict[str, dict],
                       out: Path, n_boot: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """The headline comparisons on another experiment's eval set: an experiment's best
    preference model there against its SFT model there, and against that experiment's own
    zero-shot model and best baseline (all scored the same examples)."""
    rows = {}
    for other, models in cross.items():
        target = experiments.get(other, {}).get("models", {})
        pool = {label: e for label, e in target.items()
                if label == "zero-shot" or e["kind"] == "baseline"}
        pool.update(models)
        task = next(iter(models.values()))["task"]
        found = _significance(pool, out, task, n_boot, seed)
        if found:
            rows[other] = found
    return rows


def _ablation(models: dict[str, dict], task: str) -> dict[str, dict[str, dict]]:
    """loss -> {K: primary metric} from labels ``<loss>-k<K>``."""
    out: dict[str, dict[str, dict]] = {}
    for label, entry in models.items():
        key = _loss_and_k(label)
        if entry["kind"] != "llm" or key is None:
            continue
        m = entry["metrics"].get(PRIMARY[task])
        if m:
            out.setdefault(key[0], {})[str(key[1])] = m
    return {loss: dict(sorted(ks.items(), key=lambda kv: int(kv[0])))
            for loss, ks in out.items()}


def reported_llms(config: dict[str, Any], exp: Any, out: Path, folder: Path) -> dict[str, str]:
    """Label -> evaluation folder name (in ``folder``) of every LLM the report shows.

    The config's models and every other model evaluated in ``folder``: a run narrowed to one
    cell (``align.losses=[dpo] align.negatives=[2]``) or without zero-shot still reports the
    whole run, not only what it trained now. At K = 1 a loss of the run (config or folder)
    with no folder of its own is the K = 1 model that was trained
    (:func:`prefrec.runner.model_aliases`). Order: zero-shot, SFT, then the preference
    models by K, losses in the config's order, then any other evaluated folder.
    """
    from prefrec.losses import SAME_AT_ONE_NEGATIVE
    from prefrec.runner import model_aliases, model_label, trained_models

    aliases = model_aliases(config)
    labels = {label: aliases.get(label, label) for label in trained_models(config, exp, out)}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if (p / "metrics.json").is_file():
                labels.setdefault(p.name, p.name)
    align = config.get("align") or {}
    losses = list(dict.fromkeys([*align.get("losses", []),
                                 *sorted(key[0] for label in labels
                                         if (key := _loss_and_k(label)))]))
    trained_at_one = [loss for loss in losses if loss in SAME_AT_ONE_NEGATIVE
                      and labels.get(model_label(loss, 1)) == model_label(loss, 1)]
    if trained_at_one:
        for loss in losses:
            if loss in SAME_AT_ONE_NEGATIVE:
                labels.setdefault(model_label(loss, 1), model_label(trained_at_one[0], 1))

    def order(label: str) -> tuple:
        if label in ("zero-shot", "sft"):
            return (0, label != "zero-shot")
        if key := _loss_and_k(label):
            return (1, key[1], losses.index(key[0]))
        return (2, label)

    return {label: labels[label] for label in sorted(labels, key=order)}


def _loss_and_k(label: str) -> tuple[str, int] | None:
    """(loss, K) of a preference model's label ``<loss>-k<K>``, else None."""
    loss, _, k = label.rpartition("-k")
    return (loss, int(k)) if loss and k.isdigit() else None


def collect_results(out: Path, config: dict[str, Any], exps: list) -> dict[str, Any]:
    """Everything the report shows, from the files the stages wrote."""
    from prefrec.runner import stage_rows

    seed = config["eval"]["seed"]
    n_boot = (config.get("significance") or {}).get("n_boot", 1000)

    def llm_entries(exp: Any, folder: Path) -> dict[str, dict]:
        entries = {}
        for label, name in reported_llms(config, exp, out, folder).items():
            entry = model_entry(folder / name, "llm", out)
            if entry:
                if name != label:
                    entry["same_as"] = name
                entries[label] = entry
        return entries

    results: dict[str, Any] = {"experiments": {}}
    for exp in exps:
        models = llm_entries(exp, out / exp.name / "eval")
        base_dir = out / exp.name / "baselines"
        if base_dir.is_dir():
            for folder in sorted(p for p in base_dir.iterdir() if p.is_dir()):
                entry = model_entry(folder, "baseline", out)
                if entry:
                    models[folder.name] = entry
        task = next((e["task"] for e in models.values()), None)
        cross: dict[str, dict] = {}
        for other in exp.cross_eval:
            if found := llm_entries(exp, out / exp.name / "cross" / other):
                cross[other] = found
        audit = _read_json(out / exp.name / "audit.json")
        results["experiments"][exp.name] = {
            "task": task,
            "eval_data": exp.eval,
            "models": models,
            "cross": cross,
            "significance": _significance(models, out, task, n_boot, seed) if task else [],
            "ablation": _ablation(models, task) if task else {},
            "audit": audit,
        }
    for res in results["experiments"].values():
        res["cross_significance"] = cross_significance(res["cross"], results["experiments"],
                                                       out, n_boot, seed)
    stages = stage_rows(out)
    results.update({
        "name": config["name"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": config,
        "versions": versions(),
        "stages": stages,
        "stage_seconds_total": round(sum(s["seconds"] for s in stages), 1),
    })
    return results


def versions() -> dict[str, str]:
    """Software and machine the run used."""
    import importlib.metadata as md
    import os

    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": str(os.cpu_count())}
    for pkg in ("prefrec", "torch", "transformers", "peft", "accelerate", "numpy"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    try:
        import torch

        info["device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                          else f"cpu ({torch.get_num_threads()} threads)")
    except ImportError:  # pragma: no cover
        pass
    return info


# --------------------------------------------------------------------------- figures


def save_png(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` as a PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    with atomic_open(path, "wb") as fh:
        # tight: legends placed outside the axes are kept, not cut at the figure's edge
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def bar_chart(models: dict[str, dict], task: str, path: Path, title: str) -> bool:
    """Primary metric per model with its 95% CI as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = PRIMARY[task]
    items = [(label, e["metrics"][primary], e["kind"]) for label, e in models.items()
             if e["metrics"].get(primary, {}).get("value") is not None]
    if not items:
        return False
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(items) + 1.5), 3.6))
    xs = np.arange(len(items))
    vals = np.array([m["value"] for _, m, _ in items])
    err = np.array([[m["value"] - m["ci_low"] for _, m, _ in items],
                    [m["ci_high"] - m["value"] for _, m, _ in items]])
    colors = ["#4C72B0" if kind == "llm" else "#999999" for _, _, kind in items]
    ax.bar(xs, vals, yerr=err, capsize=4, color=colors)
    if task == "pairwise":
        ax.axhline(0.5, color="#C44E52", linestyle="--", linewidth=1, label="chance")
        ax.legend(loc="lower right")
    ax.set_xticks(xs, [label for label, _, _ in items], rotation=30, ha="right")
    ax.set_ylabel(f"{primary} (95% CI)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    return True


def training_curves(out: Path, exp_name: str, labels: list[str], path: Path) -> bool:
    """Loss, reward margin and chosen/rejected log-probs of every training stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for label in labels:
        log_path = out / exp_name / label / "log.jsonl"
        if log_path.is_file():
            series[label] = [json.loads(x) for x in
                             log_path.read_text(encoding="utf-8").splitlines() if x]
    if not series:
        return False
    fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(4.2 * len(CURVE_KEYS), 3.3))
    for ax, key in zip(axes, CURVE_KEYS, strict=True):
        for label, rows in series.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", linewidth=1, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{exp_name}: training curves")
    fig.tight_layout()
    save_png(fig, path)
    return True


def ablation_plot(ablation: dict[str, dict[str, dict]], task: str, path: Path, title: str) -> bool:
    """Primary metric against the number of negatives K, one line per loss (95% CI band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(len(ks) > 1 for ks in ablation.values()):
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for loss, ks in ablation.items():
        x = [int(k) for k in ks]
        y = [m["value"] for m in ks.values()]
        ax.plot(x, y, marker="o", label=loss)
        ax.fill_between(x, [m["ci_low"] for m in ks.values()],
                        [m["ci_high"] for m in ks.values()], alpha=0.15)
    ax.set_xticks(sorted({int(k) for ks in ablation.values() for k in ks}))  # K is whole
    ax.set_xlabel("negatives K")
    ax.set_ylabel(PRIMARY[task])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
    return True


# --------------------------------------------------------------------------- rendering


def _cell(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "–"
    return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def results_table(models: dict[str, dict], task: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows: model, kind, headline metrics (value [95% CI]), n, eval time."""
    names = [n for n in HEADLINE[task] if any(n in e["metrics"] for e in models.values())]
    header = ["model", "kind", *[SHORT.get(n, n) for n in names], f"n ({PRIMARY[task]})",
              "eval time"]
    rows = []
    for label, e in models.items():
        n = (e["metrics"].get(PRIMARY[task]) or {}).get("n", "")
        cells = [_cell(e["metrics"].get(name)) for name in names]
        if "listed_first_preference" in names and position_bias_warning(e["metrics"]):
            cells[names.index("listed_first_preference")] += " ⚠ degenerate"
        name = f"{label} (= {e['same_as']})" if "same_as" in e else label
        rows.append([name, e["kind"], *cells, str(n), f"{e['wall_time_s']:.0f} s"])
    return header, rows


def degenerate_models(models: dict[str, dict]) -> list[str]:
    """'label: warning' for every model whose listed-first preference is out of bounds."""
    found = []
    for label, e in models.items():
        warning = position_bias_warning(e["metrics"])
        if warning:
            found.append(f"{label}: {warning}")
    return found


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _significance_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "versus", "metric", "model value", "versus value", "delta", "n",
              "p (paired bootstrap)", "p (McNemar)"]
    body = [[r["model"], r["versus"], r["metric"], f"{r['a']:.3f}", f"{r['b']:.3f}",
             f"{r['delta']:+.3f}", str(r["n"]), f"{r['p_bootstrap']:.3g}",
             f"{r['p_mcnemar']:.3g}"] for r in rows]
    return header, body


def _sections(out: Path, results: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """Report content as (kind, title, payload) items shared by the markdown and HTML."""
    from prefrec.runner import experiments as parse_experiments

    config = results["config"]
    items: list[tuple[str, str, Any]] = []
    fig_dir = out / "figures"
    for exp in parse_experiments(config):
        res = results["experiments"][exp.name]
        items.append(("h2", f"Experiment {exp.name}", None))
        items.append(("p", "", f"Evaluated on {exp.eval}"
                      + (f"; trained on {exp.sft} (SFT) and {exp.preference} (preference)"
                         if exp.sft else "") + "."))
        task = res["task"]
        if not task:
            items.append(("p", "", "No finished evaluation yet."))
            continue
        items.append(("table", "Results (95% bootstrap CI)", results_table(res["models"], task)))
        for line in degenerate_models(res["models"]):
            items.append(("p", "", f"**Warning** ({line}). Its accuracy mostly reflects where "
                          "the prompt lists the liked title; score with `eval.orders: both`."))
        bars = fig_dir / f"{exp.name}_bars.png"
        if bar_chart(res["models"], task, bars, f"{exp.name}: {PRIMARY[task]}"):
            items.append(("img", f"{PRIMARY[task]} by model", bars))
        if res["significance"]:
            items.append(("table", "Significance of the headline comparisons",
                          _significance_table(res["significance"])))
        labels = ["sft", *[label for label in res["models"] if "-k" in label]]
        curves = fig_dir / f"{exp.name}_curves.png"
        if training_curves(out, exp.name, labels, curves):
            items.append(("img", "Training curves", curves))
        abl = fig_dir / f"{exp.name}_ablation.png"
        if ablation_plot(res["ablation"], task, abl, f"{exp.name}: negatives ablation"):
            items.append(("img", "Negatives ablation", abl))
        for other, models in res["cross"].items():
            other_task = next(iter(models.values()))["task"]
            items.append(("table", f"Cross-domain: {exp.name} models on {other}'s eval set",
                          results_table(models, other_task)))
            for line in degenerate_models(models):
                items.append(("p", "", f"**Warning** ({line})."))
            if other in res.get("cross_significance", {}):
                items.append(("table", f"Significance on {other}'s eval set",
                              _significance_table(res["cross_significance"][other])))
        audit_md = out / exp.name / "audit.md"
        if audit_md.is_file():
            items.append(("doc", "Data audit", audit_md.read_text(encoding="utf-8")))
    stages = [[s["stage"], f"{s['seconds']:.1f} s", s.get("finished", "")]
              for s in results["stages"]]
    items.append(("h2", "Run", None))
    items.append(("table", f"Wall time per stage (total {results['stage_seconds_total']:.0f} s; "
                  "a resumed run lists each invocation)", (["stage", "time", "finished"], stages)))
    items.append(("table", "Versions", (["", "value"],
                                        [[k, v] for k, v in results["versions"].items()])))
    items.append(("pre", "Config", yaml.safe_dump(config, sort_keys=False)))
    return items


def _demote(markdown: str, levels: int) -> str:
    """Push a document's headings down so it nests under a report section."""
    return "\n".join("#" * levels + line if line.startswith("#") else line
                     for line in markdown.splitlines())


def _markdown(out: Path, results: dict[str, Any], items: list) -> str:
    parts = [f"# prefrec run: {results['name']}", "",
             f"Report written {results['created']} from the files in `{out}`.", ""]
    for kind, title, payload in items:
        if kind == "h2":
            parts += [f"## {title}", ""]
        elif kind == "p":
            parts += [payload, ""]
        elif kind == "table":
            parts += [f"### {title}", "", _md_table(*payload)]
        elif kind == "img":
            parts += [f"### {title}", "", f"![{title}]({payload.relative_to(out)})", ""]
        elif kind == "doc":
            body = payload.rstrip()
            if body.startswith("# "):  # the document's own title repeats the section's
                body = body.split("\n", 1)[1] if "\n" in body else ""
            parts += [f"### {title}", "", _demote(body.strip(), 3), ""]
        elif kind == "pre":
            parts += [f"### {title}", "", "```", payload.rstrip(), "```", ""]
    return "\n".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1400px;color:#222;line-height:1.45;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;white-space:nowrap}
th{background:#f3f3f3} tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;border:1px solid #eee;margin:.3em 0 1.5em}
pre{background:#f6f8fa;padding:1em;overflow-x:auto;font-size:12px}
h2{border-bottom:2px solid #4C72B0;padding-bottom:.2em;margin-top:2em}
"""


def markdown_to_html(markdown: str, out: Path, title: str) -> str:
    """The report's markdown as one self-contained HTML page (figures inlined as data URIs)."""
    import re

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def inline(match: re.Match) -> str:
        data = base64.b64encode((out / html.unescape(match.group(1))).read_bytes())
        return f'src="data:image/png;base64,{data.decode("ascii")}"'

    body = re.sub(r'src="(figures/[^"]+\.png)"', inline, body)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body>\n{body}</body></html>\n")


def write_report(out: Path, config: dict[str, Any], exps: list,
                 run_seconds: float | None = None) -> Path:
    """Write results.json, figures/, report.md and report.html; returns report.md's path."""
    out = Path(out)
    results = collect_results(out, config, exps)
    if run_seconds is not None:
        results["run_seconds"] = round(run_seconds, 1)
    items = _sections(out, results)
    atomic_write_json(out / "results.json", results)
    markdown = _markdown(out, results, items)
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.html",
                      markdown_to_html(markdown, out, f"prefrec run: {results['name']}"))
    return out / "report.md"
