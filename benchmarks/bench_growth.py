"""How the cost of one preference group grows with K and with the history length.

For DMPO ML-1M users (``dpo_ranking_5``) one training step's forward + backward through
a LoRA policy (``LoraSettings()`` defaults) is timed per group, for

- K = 1..5 negatives at the history the data has (``--ks``), and
- history lengths of 5, 10, 20, 40 titles at K = 3 (``--histories``, ``--history-k``):
  the prompt is rebuilt with ``prompts.pairwise_instruction`` from the user's most recent
  titles, or, when the user has fewer, their titles preceded by other users' titles
  (first come, no repeats), so every user's prompt reaches the length.

Methods:

- ``shared`` (prefrec): the group -- chosen + K rejected completions, each under its
  prompt -- scored as ONE packed prefix tree (``score_completions`` with the group's id),
  DMPO loss.
- ``per-pair`` (TRL-style): the K pairwise rows, each row's chosen and rejected scored as
  two separate sequences (one row per forward, like TRL at batch size 1), the vocabulary
  head at completion positions only (as TRL 1.16's fused head), mean sigmoid DPO loss.
- ``naive`` (optional): as ``per-pair`` but through ``model(...)`` with full-vocabulary
  logits (TRL before its fused head; prefrec's reference scorer).

The reference log-probs are the policy's own, detached (policy == reference, as at the
first step of the preference stage): they change no computation. After one warm-up per
method, each repetition times every point, the methods interleaved in ABBA order.
Output: JSON lines (one per measurement, a summary per point and method) and a PNG of
seconds per group against K and against history length (``--plot``, default: ``--out``
with ``.png``).

    python benchmarks/bench_growth.py --threads 1 --groups 1 --reps 2 \\
        --out results/bench_growth_cpu.jsonl
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from common import (
    Recorder,
    add_common_args,
    choice_list,
    header,
    int_list,
    measured,
    paired_ratios,
    ratio,
    setup_threads,
    spread,
)

from prefrec.data.dmpo import read_dmpo
from prefrec.data.prompts import DOMAINS, model_input, pairwise_completion, pairwise_instruction
from prefrec.data.schema import PairwiseExample, PreferenceGroup, group_pairs_by_user
from prefrec.losses import dmpo_loss, dpo_loss
from prefrec.scoring import pack_group, score_completions, tokenize_items

METHODS = ("shared", "per-pair", "naive")
BETA = 0.1


# --------------------------------------------------------------------------- data


def title_pool(rows: Sequence[PairwiseExample]) -> list[str]:
    """Every history title of the file, first occurrence order (filler for long histories)."""
    return list(dict.fromkeys(t for r in rows for t in r.history))


def resized_history(history: Sequence[str], length: int, pool: Sequence[str]) -> list[str]:
    """The last ``length`` titles of ``history``; if it is shorter, pool titles it lacks
    are put in front of it until it has ``length``."""
    if len(history) >= length:
        return list(history[len(history) - length :])
    filler = [t for t in pool if t not in history][: length - len(history)]
    if len(filler) < length - len(history):
        raise ValueError(f"not enough distinct titles to build a history of {length}")
    return filler + list(history)


def with_history(row: PairwiseExample, history: Sequence[str]) -> PairwiseExample:
    """``row`` with its prompt rebuilt around another history (same candidates)."""
    first, second = row.candidates
    prompt = pairwise_instruction(history, first, second, DOMAINS["movie"])
    pos, neg = row.positive_title, row.negative_title
    return PairwiseExample(
        tuple(history), row.candidates, row.positive, prompt,
        pairwise_completion(pos, neg), pairwise_completion(neg, pos), row.user, row.meta,
    )


def user_rows(data: Path, n_users: int) -> tuple[list[list[PairwiseExample]], list[str]]:
    """The first users' pairwise rows of ML-1M ``dpo_ranking_5`` (5 per user), and the
    pool of all history titles."""
    rows = read_dmpo(data / "dmpo" / "rec_data_ml_1m_dpo_ranking_5.json")
    by_user: dict[str, list[PairwiseExample]] = {}
    for row in rows:
        by_user.setdefault(row.user, []).append(row)
    return list(by_user.values())[:n_users], title_pool(rows)


def point_rows(users, pool, k: int, history: int | None) -> list[list[PairwiseExample]]:
    """Each user's first ``k`` rows, the history resized to ``history`` titles if given."""
    out = []
    for rows in users:
        rows = rows[:k]
        if history is not None:
            h = resized_history(rows[0].history, history, pool)
            rows = [with_history(r, h) for r in rows]
        out.append(rows)
    return out


# --------------------------------------------------------------------------- one step


def shared_step(model, tokenizer, groups: Sequence[PreferenceGroup]) -> float:
    """prefrec: each group as one packed row; DMPO loss; backward."""
    prompts, completions, gids = [], [], []
    for gi, g in enumerate(groups):
        for c in g.completions():
            prompts.append(model_input(c.prompt))
            completions.append(c.completion)
            gids.append(gi)
    logps = score_completions(
        model, tokenizer, prompts, completions, group_ids=gids, batch_size=len(groups), grad=True
    ).logps.view(len(groups), -1)
    chosen, rejected = logps[:, 0], logps[:, 1:]
    loss = dmpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=BETA).losses.mean()
    loss.backward()
    return float(loss.detach())


def per_pair_step(model, tokenizer, users: Sequence[Sequence[PairwiseExample]], naive: bool) -> float:
    """TRL-style: every pairwise row's two sequences alone, one row per forward; mean DPO
    loss over the rows, gradients accumulated row by row."""
    rows = [r for u in users for r in u]
    total = 0.0
    for r in rows:
        kwargs = {"shared_prefix": False} if naive else {"group_ids": [0, 1]}
        logps = score_completions(
            model, tokenizer, [model_input(r.prompt)] * 2, [r.chosen, r.rejected],
            batch_size=2, grad=True, **kwargs,
        ).logps
        chosen, rejected = logps[:1], logps[1:].view(1, 1)
        loss = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=BETA)
        loss = loss.losses.mean() / len(rows)
        loss.backward()
        total += float(loss.detach())
    return total


def tokens_per_group(method: str, tokenizer, users, groups) -> float:
    """Tokens each method runs through the decoder per group."""
    if method == "shared":
        total = 0
        for g in groups:
            items = tokenize_items(
                tokenizer,
                [model_input(c.prompt) for c in g.completions()],
                [c.completion for c in g.completions()],
            )
            total += len(pack_group(items, list(range(len(items)))).ids)
        return total / len(groups)
    rows = [r for u in users for r in u]
    items = tokenize_items(
        tokenizer,
        [model_input(r.prompt) for r in rows for _ in range(2)],
        [c for r in rows for c in (r.chosen, r.rejected)],
    )
    return sum(len(it.ids) for it in items) / len(users)


# --------------------------------------------------------------------------- plot


def plot(summaries: list[dict], path: Path, title: str) -> None:
    """Seconds per group against K (left) and history length (right), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefrec.io import atomic_open

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sweep, xkey, xlabel in (
        (axes[0], "k", "k", "K negatives per group (history as in the data)"),
        (axes[1], "history", "history", "history length in titles"),
    ):
        rows = [s for s in summaries if s["sweep"] == sweep]
        for method in dict.fromkeys(s["method"] for s in rows):
            pts = sorted((s[xkey], s) for s in rows if s["method"] == method)
            xs = [x for x, _ in pts]
            med = [s["median_s"] for _, s in pts]
            err = [[s["median_s"] - s["min_s"] for _, s in pts],
                   [s["max_s"] - s["median_s"] for _, s in pts]]
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=method)
        ax.set_xticks(sorted({s[xkey] for s in rows}))
        if rows:
            k_at = rows[0]["k"] if sweep == "history" else None
            ax.set_title(f"K = {k_at}" if k_at
                         else f"history as in the data ({rows[0]['history']} titles)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds per group (fwd + bwd)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    from transformers import set_seed

    from prefrec.model import LoraSettings, attach_lora, load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, groups=1, reps=2)
    parser.add_argument("--ks", type=int_list, default=[1, 2, 3, 4, 5])
    parser.add_argument("--histories", type=int_list, default=[5, 10, 20, 40])
    parser.add_argument("--history-k", type=int, default=3, help="K of the history sweep")
    parser.add_argument("--methods", type=choice_list(METHODS), default=["shared", "per-pair"])
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out .png)")
    args = parser.parse_args(argv)
    if any(not 1 <= k <= 5 for k in [*args.ks, args.history_k]):
        parser.error("K must lie in 1..5 (dpo_ranking_5 has 5 rows per user)")
    setup_threads(args.threads)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    set_seed(0)
    policy = attach_lora(model, LoraSettings()).train()
    device = next(policy.parameters()).device
    users, pool = user_rows(args.data, args.groups)
    points = [("k", k, None) for k in args.ks] + [
        ("history", args.history_k, h) for h in args.histories
    ]

    def step(method: str, rows) -> float:
        groups = group_pairs_by_user([r for u in rows for r in u])
        if method == "shared":
            out = shared_step(policy, tokenizer, groups)
        else:
            out = per_pair_step(policy, tokenizer, rows, naive=method == "naive")
        policy.zero_grad(set_to_none=True)
        return out

    with Recorder(args.out) as rec:
        rec.emit(header("bench_growth", args, model) | {
            "lora": "r=16 alpha=32 dropout=0.05 all-linear", "users": len(users),
            "step": "forward + backward of one group's loss (no optimizer)"})
        data = {(sweep, k, h): point_rows(users, pool, k, h) for sweep, k, h in points}
        first = data[points[0]]
        for method in args.methods:  # warm-up
            seconds, _, memory = measured(lambda m=method: step(m, first), device)
            rec.emit({"method": method, "warmup": True, "seconds": round(seconds, 3), **memory})
        times: dict[tuple, list[float]] = {}
        for rep in range(args.reps):
            for sweep, k, h in points:
                rows = data[(sweep, k, h)]
                # ABBA: even repetitions in the given order, odd ones reversed.
                for method in args.methods if rep % 2 == 0 else args.methods[::-1]:
                    seconds, loss, memory = measured(lambda m=method, r=rows: step(m, r), device)
                    per_group = seconds / len(rows)
                    times.setdefault((sweep, k, h, method), []).append(per_group)
                    rec.emit({"sweep": sweep, "k": k, "history": h, "method": method,
                              "rep": rep, "s_per_group": round(per_group, 3),
                              "loss": round(loss, 5), **memory})
        summaries = []
        for sweep, k, h in points:
            rows = data[(sweep, k, h)]
            groups = group_pairs_by_user([r for u in rows for r in u])
            hist = h if h is not None else round(
                sum(len(u[0].history) for u in rows) / len(rows), 1)
            medians = {}
            for method in args.methods:
                stats = spread(times[(sweep, k, h, method)])
                medians[method] = stats["median_s"]
                summary = {"sweep": sweep, "k": k, "history": hist, "method": method,
                           "summary": True, **stats,
                           "tokens_per_group": tokens_per_group(method, tokenizer, rows, groups)}
                summaries.append(summary)
                rec.emit(summary)
            if "shared" in medians:
                fields = {}
                for m in args.methods:
                    if m != "shared":
                        fields[f"{m}_over_shared"] = ratio(medians[m], medians["shared"])
                        paired = paired_ratios(times[(sweep, k, h, m)],
                                               times[(sweep, k, h, "shared")])
                        fields |= {f"{m}_over_shared_{key}": v for key, v in paired.items()}
                rec.emit({"sweep": sweep, "k": k, "history": hist, "speedup": True, **fields})
        png = args.plot or (args.out.with_suffix(".png") if args.out else None)
        if png is not None:
            plot(summaries, png, f"{args.model}, {device}, {torch.get_num_threads()} thread(s): "
                 "time per preference group")
            rec.emit({"plot": str(png)})


if __name__ == "__main__":
    main()
