"""Benchmark scripts: their helpers (fast), and a smoke run of each on the tiny model (slow).

The smoke runs check what a reader of the results relies on: every stdout line is JSON,
the header names the software, every (setting, method) gets a summary, the methods agree
on their scores, the shared-prefix side feeds fewer tokens per group than the per-pair
side, ``--out`` holds exactly the printed lines, and the growth plot is a PNG.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

HEADER_KEYS = {"machine", "cpu", "threads", "torch", "transformers", "trl", "peft", "model"}


# --------------------------------------------------------------------------- helpers


def test_interleaved_alternates_the_order_of_methods_abba():
    from common import interleaved

    assert list(interleaved(["ours", "trl"], 3)) == [
        (0, "ours"), (0, "trl"), (1, "trl"), (1, "ours"), (2, "ours"), (2, "trl"),
    ]


def test_spread_and_ratio():
    from common import ratio, spread

    assert spread([3.0, 1.0, 2.0, 10.0]) == {"median_s": 2.5, "min_s": 1.0, "max_s": 10.0, "n": 4}
    assert ratio(7.0, 2.0) == 3.5


def test_list_flags_parse_and_reject():
    import argparse

    from bench_eval import shape_groups
    from common import choice_list, int_list

    assert int_list("1,3,5") == [1, 3, 5]
    assert int_list("") == []
    assert choice_list(["a", "b"])("b,a") == ["b", "a"]
    assert shape_groups("lastfm=4,ml1m-eval=16") == {"lastfm": 4, "ml1m-eval": 16}
    for bad in (lambda: int_list("1,x"), lambda: choice_list(["a"])("c"),
                lambda: shape_groups("lastfm")):
        with pytest.raises(argparse.ArgumentTypeError):
            bad()


def test_peak_rss_reset_drops_to_the_current_level():
    import numpy as np
    from common import current_rss_mb, peak_rss_mb, reset_peaks

    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    del block
    before_reset = peak_rss_mb()
    if not reset_peaks("cpu"):
        pytest.skip("no /proc/self/clear_refs on this system")
    assert peak_rss_mb() < before_reset - 32
    assert peak_rss_mb() >= current_rss_mb() - 1


def test_resized_history_truncates_to_recent_titles_or_prepends_new_ones():
    from bench_growth import resized_history

    pool = ["A", "x", "B", "y", "z"]
    assert resized_history(["A", "B", "C"], 2, pool) == ["B", "C"]
    assert resized_history(["A", "B"], 5, pool) == ["x", "y", "z", "A", "B"]
    with pytest.raises(ValueError, match="distinct titles"):
        resized_history(["A"], 9, pool)


def test_with_history_rebuilds_the_released_prompt(shared_data):
    from bench_growth import user_rows, with_history

    users, _ = user_rows(shared_data, 1)
    row = users[0][0]
    same = with_history(row, row.history)  # rebuilding with its own history is exact
    assert (same.prompt, same.chosen, same.rejected) == (row.prompt, row.chosen, row.rejected)
    short = with_history(row, row.history[-2:])
    assert short.prompt.count("<Title:") == 2 + 2  # two history titles, two candidates


# --------------------------------------------------------------------------- smoke runs


def run_script(name: str, *args: str, out: Path | None = None) -> list[dict]:
    argv = [sys.executable, str(BENCH / name), "--threads", "1", *args]
    if out is not None:
        argv += ["--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]  # every line is JSON
    assert rows[0]["header"] is True and HEADER_KEYS <= rows[0].keys()
    if out is not None:
        assert out.read_text().splitlines() == lines
    return rows


@pytest.mark.slow
def test_bench_align_vs_trl_smoke(tiny_dir, shared_data, tmp_path):
    rows = run_script(
        "bench_align_vs_trl.py", "--model", str(tiny_dir), "--data", str(shared_data),
        "--groups", "2", "--reps", "1", "--ks", "2", "--batch-groups", "1",
        "--methods", "ours-dmpo,trl", "--trl-micro-rows", "1", "--memory-ks", "2",
        out=tmp_path / "align.jsonl",
    )
    summaries = {r["method"]: r for r in rows if r.get("summary")}
    assert summaries.keys() == {"ours-dmpo", "trl"}
    assert all(r["s_per_group_median_s"] > 0 for r in summaries.values())
    (speedup,) = [r for r in rows if r.get("speedup")]
    assert speedup["trl_over_ours"] == pytest.approx(
        summaries["trl"]["s_per_group_median_s"] / summaries["ours-dmpo"]["s_per_group_median_s"],
        abs=0.01,
    )
    tokens = {r["side"]: r["tokens_per_group"] for r in rows if r.get("ref_precompute")}
    assert tokens["ours"] < tokens["trl"] / 2  # the history is run once, not 2K times
    timed = [r for r in rows if "rep" in r]
    assert {r["method"] for r in timed} == {"ours-dmpo", "trl"}
    assert all(r["peak_rss_mb"] >= r["rss_before_mb"] - 1 for r in timed)
    probes = [r for r in rows if r.get("memory")]
    assert {r["method"] for r in probes} == {"ours-dmpo", "trl"}
    assert all(r["peak_rss_mb"] > 100 for r in probes)


@pytest.mark.slow
def test_bench_eval_smoke(tiny_dir, shared_data, tmp_path):
    rows = run_script(
        "bench_eval.py", "--model", str(tiny_dir), "--data", str(shared_data),
        "--groups", "2", "--shape-groups", "lastfm=1", "--reps", "1",
        out=tmp_path / "eval.jsonl",
    )
    for row in (r for r in rows if r.get("warmup")):
        assert row["max_abs_diff_vs_first"] < 1e-3  # naive and shared give the same scores
    summaries = {(r["shape"], r["method"]): r for r in rows if r.get("summary")}
    assert summaries.keys() == {
        (s, m) for s in ("ml1m-eval", "orderings", "lastfm") for m in ("shared", "naive")
    }
    assert summaries[("orderings", "shared")]["examples"] == 6  # 2 users x 3 pairs
    assert summaries[("lastfm", "naive")]["sequences"] == 20
    final = rows[-1]
    assert final["final"] and set(final["speedup"]) == {
        "ml1m-eval:naive_over_shared", "orderings:naive_over_shared", "lastfm:naive_over_shared"
    }
    assert len([r for r in rows if r.get("memory")]) == 6


@pytest.mark.slow
def test_bench_growth_smoke_writes_rows_and_a_png(tiny_dir, shared_data, tmp_path):
    rows = run_script(
        "bench_growth.py", "--model", str(tiny_dir), "--data", str(shared_data),
        "--reps", "1", "--ks", "1,2", "--histories", "5,40", "--history-k", "2",
        out=tmp_path / "growth.jsonl",
    )
    summaries = [r for r in rows if r.get("summary")]
    points = {(r["sweep"], r["k"], r["history"], r["method"]) for r in summaries}
    assert len(points) == 8  # (2 K values + 2 history lengths) x (shared, per-pair)
    tokens = {(r["sweep"], r["k"], r["history"], r["method"]): r["tokens_per_group"]
              for r in summaries}
    for sweep, k, hist, method in points:
        if method == "shared":
            assert tokens[(sweep, k, hist, "shared")] < tokens[(sweep, k, hist, "per-pair")]
    short, long = (tokens[("history", 2, h, "shared")] for h in (5, 40))
    assert long > short  # a longer history really is longer
    assert (tmp_path / "growth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_packing_smoke(tiny_dir, shared_data, tmp_path):
    """Fast enough for the default suite (about 15 s): both stages, both methods, a point."""
    rows = run_script(
        "bench_packing.py", "--model", str(tiny_dir), "--data", str(shared_data),
        "--reps", "1", "--examples", "4", "--micro", "2", "--tmp", str(tmp_path / "t"),
        out=tmp_path / "packing.jsonl",
    )
    assert rows[0]["train_history"] == 10 and rows[0]["pack_size"] == 16
    summaries = {(r["stage"], r["method"]): r for r in rows if r.get("summary")}
    assert summaries.keys() == {(s, m) for s in ("sft", "align") for m in ("unpacked", "packed")}
    for stage in ("sft", "align"):
        # One history per user instead of one per example (SFT) or per group (align).
        assert (summaries[(stage, "packed")]["tokens_per_example"]
                < summaries[(stage, "unpacked")]["tokens_per_example"])
    speedups = [r for r in rows if r.get("speedup")]
    assert [(r["stage"], r["examples_per_user"]) for r in speedups] == [("sft", 4), ("align", 4)]
    timed = [r for r in rows if "rep" in r]
    assert len(timed) == 4 and all(r["seconds"] > 0 and r["loss"] > 0 for r in timed)


def test_bench_packing_per_target_packs_one_targets_pairs_per_row(tiny_dir, shared_data,
                                                                   tmp_path):
    """--per-target 2: rows hold one target's 2 pairs (history once for the two), so packed
    SFT runs fewer tokens per pair, but more than one fixed history per user would."""
    common = ["--model", str(tiny_dir), "--data", str(shared_data), "--reps", "1",
              "--examples", "4", "--micro", "2", "--stages", "sft"]
    rows = run_script("bench_packing.py", *common, "--per-target", "2", "--packed-rows", "2",
                      "--tmp", str(tmp_path / "t"), out=tmp_path / "per-target.jsonl")
    fixed = run_script("bench_packing.py", *common, "--tmp", str(tmp_path / "f"),
                       out=tmp_path / "fixed.jsonl")
    assert rows[0]["per_target"] == 2 and rows[0]["packed_rows"] == 2

    def tokens(rows):
        return {r["method"]: r["tokens_per_example"] for r in rows if r.get("summary")}

    per_target, one_history = tokens(rows), tokens(fixed)
    assert one_history["packed"] < per_target["packed"] < per_target["unpacked"]

    # Keyed as the data files key rows (by history): each key holds one target's 2 pairs.
    from bench_packing import benchmark_users

    sft_users, _ = benchmark_users(shared_data, 1, 3, 10, per_target=2)
    by_key: dict[str, list] = {}
    for ex in sft_users[0]:
        by_key.setdefault(ex.user, []).append(ex)
    assert all(len(rows) == 2 and len({(r.history, r.positive_title) for r in rows}) == 1
               for rows in by_key.values())


def test_bench_lora_layers_smoke(tiny_dir, shared_data, tmp_path):
    """Both stages, all layers vs the last one of the tiny model's two: the last-layer
    adapter has half the trainable weights, and every setting is timed and summarised."""
    rows = run_script("bench_lora_layers.py", "--model", str(tiny_dir), "--data",
                      str(shared_data), "--reps", "1", "--layers", "1", "--examples", "2",
                      "--groups", "2", "--rank", "4", "--tmp", str(tmp_path / "t"),
                      out=tmp_path / "layers.jsonl")
    assert rows[0]["trainable"] == {"all": 2 * rows[0]["trainable"]["1"], "1": 4 * 1024}
    summaries = {(r["stage"], r["lora_layers"]): r for r in rows if r.get("summary")}
    assert summaries.keys() == {(s, m) for s in ("sft", "align") for m in ("all", "1")}
    assert all(r["speedup_vs_all"] > 0 for k, r in summaries.items() if k[1] == "1")
    timed = [r for r in rows if "rep" in r]
    assert len(timed) == 4 and all(r["seconds"] > 0 and r["loss"] > 0 for r in timed)


def test_bench_scoring_both_orders_shares_the_history_across_listings(tiny_dir, shared_data,
                                                                       tmp_path):
    """Evaluation under both listings: one group per pair (history once) agrees with a group
    per prompt and with naive scoring, on 4 sequences per pair."""
    rows = run_script(
        "bench_scoring.py", "--model", str(tiny_dir), "--data", str(shared_data),
        "--groups", "2", "--reps", "1", "--shapes", "both-orders",
        "--methods", "shared,per-prompt,naive",
    )
    warmups = {r["method"]: r for r in rows if r.get("warmup")}
    assert warmups.keys() == {"shared", "per-prompt", "naive"}
    assert all(r["max_abs_diff_vs_first"] < 1e-4 for r in warmups.values())
    summaries = {r["method"]: r for r in rows if r.get("summary")}
    assert summaries["shared"]["sequences_per_group"] == 4  # 2 listings x 2 orderings
    assert summaries["shared"]["examples"] == 2
    assert set(rows[-1]["speedup"]) >= {"both-orders:per-prompt_over_shared",
                                        "both-orders:naive_over_shared"}
