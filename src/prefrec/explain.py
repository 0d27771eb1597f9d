"""Explanations: which completion tokens the model likes, and what alignment changed.

For each candidate, :func:`explain` gives the per-token log-probs of its completion under
the recommender (``score_completions(..., per_token=True)``), with the tokens as strings;
they sum to the candidate's score. With a reference model (the aligned adapter's parent,
i.e. the SFT model, the base model, or another adapter) it also gives the per-token
difference

    d_t = log pi_aligned(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t),

whose sum is the implicit DPO reward divided by beta: the tokens alignment pushed up
(d_t > 0) or down (d_t < 0), as in the DMPO paper's case study.

Renderings: a terminal table (:func:`format_table`), JSON (:meth:`Explanation.to_dict`), a
self-contained HTML heatmap (:func:`render_html`: inline CSS, one colour per token, a
legend, exact values on hover) and a PNG heatmap through matplotlib (:func:`render_png`).
Colours: the difference on a diverging scale centred on 0 (red down, blue up); without a
reference, the log-prob on viridis from the lowest value to 0.
"""

from __future__ import annotations

import argparse
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefrec.errors import PrefrecError
from prefrec.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from prefrec.recommender import (
    Recommender,
    add_model_options,
    add_request_options,
    recommender_from_args,
)

REFERENCES = ("parent", "base")
_DIFF_CMAP = "RdBu"
_LOGP_CMAP = "viridis"


@dataclass
class CandidateExplanation:
    """One candidate's completion, token by token.

    ``reference_logps`` is None without a reference model.
    """

    title: str
    completion: str
    tokens: list[str]
    logps: list[float]
    reference_logps: list[float] | None = None

    @property
    def logp(self) -> float:
        """The candidate's score: the sum of its token log-probs."""
        return sum(self.logps)

    @property
    def reference_logp(self) -> float | None:
        return None if self.reference_logps is None else sum(self.reference_logps)

    @property
    def diffs(self) -> list[float] | None:
        """Per token: log-prob under the model minus under the reference."""
        if self.reference_logps is None:
            return None
        return [a - b for a, b in zip(self.logps, self.reference_logps, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "title": self.title,
            "completion": self.completion,
            "logp": self.logp,
            "tokens": [{"token": t, "logp": lp} for t, lp in zip(self.tokens, self.logps,
                                                                   strict=True)],
        }
        if self.reference_logps is not None:
            out["reference_logp"] = self.reference_logp
            out["diff"] = self.logp - self.reference_logp
            for row, ref, d in zip(out["tokens"], self.reference_logps, self.diffs, strict=True):
                row["reference_logp"] = ref
                row["diff"] = d
        return out


@dataclass
class Explanation:
    """Per-token explanations of every candidate of one request (candidate order)."""

    task: str
    history: list[str]
    candidates: list[str]
    model: str
    adapters: list[str]
    template: str
    items: list[CandidateExplanation]
    reference: str | None = None
    reference_adapters: list[str] = field(default_factory=list)

    @property
    def has_reference(self) -> bool:
        return self.reference is not None

    def ranked(self) -> list[CandidateExplanation]:
        """The items best first (stable), as the recommender ranks them."""
        return sorted(self.items, key=lambda it: -it.logp)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "history": self.history,
            "candidates": self.candidates,
            "model": self.model,
            "adapters": self.adapters,
            "template": self.template,
            "reference": self.reference,
            "reference_adapters": self.reference_adapters,
            "items": [it.to_dict() for it in self.items],
        }


# --------------------------------------------------------------------------- computing


def completion_tokens(recommender: Recommender, prompts: Sequence[str],
                      completions: Sequence[str]) -> list[list[int]]:
    """The completion token ids (EOS included) exactly as the scorer tokenises them."""
    from prefrec.scoring import tokenize_items

    max_length = getattr(recommender.model.config, "max_position_embeddings", None)
    items = tokenize_items(recommender.tokenizer, prompts, completions, max_length=max_length)
    return [list(it.ids[it.n_prompt :]) for it in items]


def explain(
    recommender: Recommender,
    history: Sequence[str],
    candidates: Sequence[str],
    task: str = "selection",
    domain: str | None = None,
    reference: Recommender | None = None,
    reference_name: str | None = None,
) -> Explanation:
    """Per-token log-probs of every candidate's completion, and optionally the difference
    to ``reference`` (which must tokenise the same way; it is prompted with the
    recommender's template and domain).

    For the pairwise task a candidate's completion is the ordering that ranks it first.
    """
    request = recommender.request(history, candidates, task, domain)
    prompts, completions = recommender.inputs(request)
    ids = completion_tokens(recommender, prompts, completions)
    scores = recommender.score(prompts, completions, per_token=True)
    ref_logps = None
    if reference is not None:
        if completion_tokens(reference, prompts, completions) != ids:
            raise PrefrecError("the reference model tokenises the completions differently; "
                               "it must share the model's tokenizer")
        ref_logps = [t.tolist() for t in reference.score(prompts, completions,
                                                          per_token=True).token_logps]
    decode = recommender.tokenizer.decode
    items = []
    for i, title in enumerate(request.candidates):
        logps = scores.token_logps[i].tolist()
        if len(logps) != len(ids[i]):  # the scorer and tokenize_items must agree
            raise RuntimeError(f"{len(logps)} log-probs for {len(ids[i])} tokens")
        items.append(CandidateExplanation(
            title=title,
            completion=completions[i],
            tokens=[decode([t]) for t in ids[i]],
            logps=logps,
            reference_logps=None if ref_logps is None else ref_logps[i],
        ))
    return Explanation(
        task=request.task,
        history=list(request.history),
        candidates=list(request.candidates),
        model=recommender.model_name,
        adapters=list(recommender.adapters),
        template=recommender.template,
        items=items,
        reference=None if reference is None else (reference_name or "custom"),
        reference_adapters=[] if reference is None else list(reference.adapters),
    )


def load_reference(recommender: Recommender, spec: str, **load_kwargs: Any) -> Recommender:
    """The reference model named by ``spec``.

    ``parent``: the chain without its last adapter (for an aligned adapter, the SFT model
    it was trained against: the DPO reference); ``base``: the base model alone; otherwise
    an adapter folder (its own lineage applies). Prompted like ``recommender``.
    """
    if spec == "parent":
        if not recommender.adapters:
            raise PrefrecError("--reference parent needs --adapter: a model without adapters "
                               "has no parent; use --reference-adapter or omit the reference")
        adapters: list[str] = recommender.adapters[:-1]
    elif spec == "base":
        adapters = []
    else:
        adapters = [spec]
    return Recommender.load(
        recommender.model_name, adapters, template=recommender.template,
        domain=recommender.domain, limits=recommender.limits,
        batch_size=recommender.batch_size, **load_kwargs,
    )


# --------------------------------------------------------------------------- rendering


def display_token(token: str) -> str:
    """A token as shown in tables and heatmaps: newlines and tabs made visible."""
    return token.replace("\n", "\u21b5").replace("\t", "\u2192")


def heat_values(expl: Explanation) -> list[list[float]]:
    """What the heatmap colours, per item and token: the difference, else the log-prob."""
    return [it.diffs if expl.has_reference else it.logps for it in expl.items]


def color_scale(expl: Explanation):
    """(matplotlib colormap, Normalize, legend label) for the explanation's values."""
    import matplotlib
    from matplotlib.colors import Normalize

    values = [v for row in heat_values(expl) for v in row]
    if expl.has_reference:
        bound = max((abs(v) for v in values), default=0.0) or 1e-6
        return (matplotlib.colormaps[_DIFF_CMAP], Normalize(-bound, bound),
                "log-prob difference, model - reference (red: alignment pushed the token "
                "down; blue: up)")
    low = min(values, default=-1.0)
    return (matplotlib.colormaps[_LOGP_CMAP], Normalize(min(low, -1e-6), 0.0),
            "token log-prob under the model (dark: unlikely; yellow: likely)")


def _css_colors(cmap, norm, value: float) -> tuple[str, str]:
    """Background and a readable text colour (by relative luminance) for one value."""
    from matplotlib.colors import to_hex

    r, g, b, _ = cmap(norm(value))
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return to_hex((r, g, b)), "#000000" if luminance > 0.5 else "#ffffff"


def format_table(expl: Explanation) -> str:
    """A terminal table: each candidate (best first) and its tokens."""
    ref = expl.has_reference
    lines = [f"model: {expl.model}" + (f" + {', '.join(expl.adapters)}" if expl.adapters else "")]
    if ref:
        lines.append(f"reference: {expl.reference}"
                     + (f" ({', '.join(expl.reference_adapters)})" if expl.reference_adapters
                        else " (no adapters)"))
    lines.append(f"task: {expl.task}; history: {len(expl.history)} titles")
    for rank, item in enumerate(expl.ranked(), start=1):
        head = f"[{rank}] {item.title}  log-prob {item.logp:.3f}"
        if ref:
            head += f"  reference {item.reference_logp:.3f}  diff {item.logp - item.reference_logp:+.3f}"
        lines += ["", head + f"  ({len(item.tokens)} tokens)"]
        shown = [repr(display_token(t)) for t in item.tokens]
        width = max(8, *(len(s) for s in shown))
        lines.append(f"    {'token':<{width}}  {'log-prob':>9}"
                     + (f"  {'reference':>9}  {'diff':>8}" if ref else ""))
        for k, text in enumerate(shown):
            row = f"    {text:<{width}}  {item.logps[k]:>9.3f}"
            if ref:
                row += f"  {item.reference_logps[k]:>9.3f}  {item.diffs[k]:>+8.3f}"
            lines.append(row)
    return "\n".join(lines)


_HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px;
       color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 8px; }
.meta { color: #555; font-size: 13px; margin: 2px 0; }
.history { font-size: 14px; margin: 10px 0 16px; }
.legend { margin: 8px 0 18px; font-size: 13px; max-width: 560px; }
.bar { height: 14px; border: 1px solid #999; border-radius: 2px; }
.ticks { display: flex; justify-content: space-between; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 10px; text-align: left; vertical-align: middle; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.tokens { line-height: 2.1; }
.tok { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; white-space: pre;
       padding: 2px 1px; margin-right: 1px; border-radius: 3px; border: 1px solid rgba(0,0,0,.15); }
"""


def render_html(expl: Explanation) -> str:
    """A self-contained HTML page: one row per candidate, its tokens coloured by value."""
    cmap, norm, label = color_scale(expl)
    esc = html.escape
    stops = ", ".join(_css_colors(cmap, norm, norm.vmin + (norm.vmax - norm.vmin) * k / 10)[0]
                      for k in range(11))
    ticks = [norm.vmin, (norm.vmin + norm.vmax) / 2, norm.vmax]
    ref = expl.has_reference
    sign = "+" if ref else ""  # differences carry a sign; log-probs are never positive
    meta = [f"model: {esc(expl.model)}",
            "adapters: " + (esc(", ".join(expl.adapters)) or "none"),
            f"template: {esc(expl.template)}", f"task: {esc(expl.task)}"]
    if ref:
        meta.append(f"reference: {esc(expl.reference)} ("
                    + (esc(", ".join(expl.reference_adapters)) or "no adapters") + ")")
    head = ["#", "candidate", "log-prob"] + (["reference", "difference"] if ref else [])
    rows = []
    for rank, item in enumerate(expl.ranked(), start=1):
        values = item.diffs if ref else item.logps
        spans = []
        for k, (token, value) in enumerate(zip(item.tokens, values, strict=True)):
            bg, fg = _css_colors(cmap, norm, value)
            tip = f"log-prob {item.logps[k]:.4f}"
            if ref:
                tip += f"; reference {item.reference_logps[k]:.4f}; difference {value:+.4f}"
            spans.append(f'<span class="tok" style="background:{bg};color:{fg}" '
                         f'title="{esc(tip)}">{esc(display_token(token))}</span>')
        cells = [f"<td class=num>{rank}</td>", f"<td>{esc(item.title)}</td>",
                 f"<td class=num>{item.logp:.3f}</td>"]
        if ref:
            cells += [f"<td class=num>{item.reference_logp:.3f}</td>",
                      f"<td class=num>{item.logp - item.reference_logp:+.3f}</td>"]
        cells.append(f'<td class="tokens">{"".join(spans)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    history = " &middot; ".join(esc(t) for t in expl.history)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>prefrec explanation</title>
<style>{_HTML_STYLE}</style></head>
<body>
<h1>Per-token log-probabilities of each candidate</h1>
{"".join(f'<p class="meta">{m}</p>' for m in meta)}
<p class="history"><b>History</b> ({len(expl.history)} titles): {history}</p>
<div class="legend"><div>{esc(label)}</div>
<div class="bar" style="background:linear-gradient(to right, {stops})"></div>
<div class="ticks">{"".join(f"<span>{t:{sign}.3f}</span>" for t in ticks)}</div></div>
<table>
<tr>{"".join(f"<th>{h}</th>" for h in head)}<th>completion tokens (hover for values)</th></tr>
{chr(10).join(rows)}
</table>
</body></html>
"""


def render_png(expl: Explanation, path: str | Path, dpi: int = 150) -> None:
    """A heatmap PNG: one row per candidate (best first), one cell per token."""
    import numpy as np
    from matplotlib.figure import Figure

    cmap, norm, label = color_scale(expl)
    ranked = expl.ranked()
    values = [it.diffs if expl.has_reference else it.logps for it in ranked]
    width = max(len(v) for v in values)
    grid = np.full((len(ranked), width), np.nan)
    for r, row in enumerate(values):
        grid[r, : len(row)] = row
    fig = Figure(figsize=(min(3 + 0.9 * width, 40), 1.4 + 0.5 * len(ranked)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    for r, item in enumerate(ranked):
        for c, token in enumerate(item.tokens):
            _, fg = _css_colors(cmap, norm, values[r][c])
            text = display_token(token)
            ax.text(c, r, text if len(text) <= 10 else text[:9] + "\u2026", ha="center",
                    va="center", fontsize=7, color=fg, parse_math=False)
    ax.set_xticks(range(width))
    ax.set_xlabel("completion token")
    ax.set_yticks(range(len(ranked)))
    ax.set_yticklabels([f"{it.title} ({it.logp:.2f})" for it in ranked], fontsize=8)
    for tick in ax.get_yticklabels():
        tick.set_parse_math(False)
    fig.colorbar(image, ax=ax, label=label.split(" (")[0])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------- CLI


def add_explain_args(p: argparse.ArgumentParser) -> None:
    """Options of ``prefrec explain``."""
    add_model_options(p)
    add_request_options(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--reference", choices=REFERENCES, default=None,
                       help="also score under a reference: parent (the aligned adapter's SFT "
                       "model) or base (no adapters)")
    group.add_argument("--reference-adapter", default=None, metavar="DIR",
                       help="also score under this adapter (with its lineage) as reference")
    p.add_argument("--json", default=None, metavar="OUT", help="write the explanation as JSON")
    p.add_argument("--html", default=None, metavar="OUT.html", help="write an HTML heatmap")
    p.add_argument("--png", default=None, metavar="OUT.png", help="write a PNG heatmap")


def explain_command(args: argparse.Namespace) -> None:
    """``prefrec explain``: print the per-token table and write the requested files."""
    from prefrec.recommender import Limits, command_line_request

    request = command_line_request(args, Limits())
    recommender = recommender_from_args(args)
    spec = args.reference_adapter or args.reference
    reference = None
    if spec is not None:
        reference = load_reference(recommender, spec, device=args.device, dtype=args.dtype)
    expl = explain(recommender, request.history, request.candidates, request.task,
                   args.domain, reference, spec)
    print(format_table(expl))
    if args.json:
        atomic_write_json(args.json, expl.to_dict())
        print(f"wrote {args.json}")
    if args.html:
        atomic_write_text(args.html, render_html(expl))
        print(f"wrote {args.html}")
    if args.png:
        render_png(expl, args.png)
        print(f"wrote {args.png}")
