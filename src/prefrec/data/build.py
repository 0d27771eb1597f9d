"""``prefrec data build``: raw interactions -> few-shot datasets, by the DMPO or S-DPO protocol.

Reads a raw log (MovieLens-100K/1M, a generic CSV, Amazon reviews), runs the protocol from
:mod:`prefrec.data.protocols`, writes the files atomically, and writes ``build_report.json``
with every user counted: kept, or dropped with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from prefrec.data.prompts import DOMAINS
from prefrec.errors import PrefrecError

log = logging.getLogger(__name__)

RAW_FORMATS = ("ml100k", "ml1m", "csv", "amazon")


def add_build_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("input")
    src.add_argument("--raw", required=True, help="raw data: a folder (ml100k, ml1m) or a file")
    src.add_argument("--format", required=True, choices=RAW_FORMATS, help="raw data format")
    src.add_argument("--titles", default=None, help="csv: item-title CSV; amazon: metadata JSONL")
    src.add_argument("--user-col", default="user", help="csv: user column (default: user)")
    src.add_argument("--item-col", default="item", help="csv: item column (default: item)")
    src.add_argument("--rating-col", default="rating", help="csv: rating column (default: rating)")
    src.add_argument("--time-col", default="timestamp", help="csv: time column (default: timestamp)")
    src.add_argument("--title-col", default="title", help="csv: title column (default: title)")
    src.add_argument("--delimiter", default=",", help="csv: field delimiter (default: ,)")

    out = p.add_argument_group("output")
    out.add_argument("--protocol", required=True, choices=["dmpo", "sdpo"], help="which protocol")
    out.add_argument("--out", required=True, help="output folder")
    out.add_argument("--prefix", default=None, help="file name prefix (default: from the input)")
    out.add_argument("--seed", type=int, default=0, help="seed for splits, negatives and order")
    out.add_argument("--scale-down", action="store_true",
                     help="shrink every split by one factor when too few users qualify")

    d = p.add_argument_group("DMPO protocol")
    d.add_argument("--positive-threshold", type=float, default=3.0,
                   help="rating > this is positive, <= is negative (default: 3)")
    d.add_argument("--min-positives", type=int, default=5, help="(default: 5)")
    d.add_argument("--min-negatives", type=int, default=5, help="(default: 5)")
    d.add_argument("--max-interactions", type=int, default=40,
                   help="drop users with more interactions; 0 = no limit (default: 40)")
    d.add_argument("--sft-users", type=int, default=100, help="(default: 100)")
    d.add_argument("--dpo-users", type=int, default=100, help="(default: 100)")
    d.add_argument("--eval-users", type=int, default=1000, help="(default: 1000)")
    d.add_argument("--valid-users", type=int, default=0, help="(default: 0)")
    d.add_argument("--separate-dpo-users", action="store_true",
                   help="DPO users distinct from SFT users (the released files share them)")
    d.add_argument("--max-negatives", type=int, default=5,
                   help="K_max: writes dpo_ranking_1..K_max (default: 5)")
    d.add_argument("--pairs-per-user", default="1",
                   help="data-rich SFT: pairs per user, an integer or 'all' (default: 1)")
    d.add_argument("--groups-per-user", type=int, default=1,
                   help="data-rich DPO: preference groups (targets) per user (default: 1)")
    d.add_argument("--eval-pairs-per-user", type=int, default=1,
                   help="pairs per valid/eval user (default: 1)")
    d.add_argument("--normalize-titles", action="store_true",
                   help="normalise titles (no year, no trailing article)")
    d.add_argument("--max-history", type=int, default=0,
                   help="keep the latest N liked items in a history; 0 = all (default: 0)")
    d.add_argument("--train-history", type=int, default=0,
                   help="training users: one fixed history, their first N liked items, with "
                        "targets drawn after it (for --pack-by-user training); 0 = off (default: 0)")
    d.add_argument("--train-block", type=int, default=0,
                   help="with --train-history: B targets per history, each block's history the "
                        "N liked items just before it; 0 = one history, the first N (default: 0)")
    d.add_argument("--pairs-per-history", type=int, default=0,
                   help="with --train-block: SFT pairs drawn per history (with --train-block 1: "
                        "negatives per target, packed in one row); 0 = the block size (default: 0)")
    d.add_argument("--domain", default="movie", choices=sorted(DOMAINS),
                   help="prompt wording (default: movie)")

    s = p.add_argument_group("S-DPO protocol")
    s.add_argument("--history-len", type=int, default=10, help="(default: 10)")
    s.add_argument("--min-history", type=int, default=3, help="(default: 3)")
    s.add_argument("--candidates", type=int, default=20, help="N candidates (default: 20)")
    s.add_argument("--train", type=float, default=0.8, help="share or count (default: 0.8)")
    s.add_argument("--valid", type=float, default=0.1, help="share or count (default: 0.1)")
    s.add_argument("--test", type=float, default=0.1, help="share or count (default: 0.1)")


def read_raw(args: argparse.Namespace):
    """Read the raw log named by the build arguments."""
    from prefrec.data import raw

    path = Path(args.raw)
    if not path.exists():
        raise PrefrecError(f"{path}: no such file or folder")
    if args.format == "ml100k":
        return raw.read_movielens_100k(path)
    if args.format == "ml1m":
        return raw.read_movielens_1m(path)
    if args.format == "csv":
        return raw.read_interactions_csv(
            path,
            titles_path=args.titles,
            user_col=args.user_col,
            item_col=args.item_col,
            rating_col=args.rating_col or None,
            time_col=args.time_col or None,
            title_col=args.title_col,
            delimiter=args.delimiter,
        )
    return raw.read_amazon(path, args.titles)


def _count(value: float) -> int | float:
    return int(value) if value >= 1 else value


def build_files(args: argparse.Namespace) -> tuple[list[Path], dict]:
    """Build the protocol's files from the raw log named by ``args`` (the ``prefrec data
    build`` arguments); returns the paths written and the build report."""
    from prefrec.data.protocols import (
        DMPOConfig,
        SDPOConfig,
        build_dmpo,
        build_sdpo,
        write_dmpo_files,
        write_sdpo_files,
    )
    from prefrec.io import atomic_write_json

    interactions = read_raw(args)
    prefix = args.prefix or Path(args.raw).resolve().name.replace("-", "_")
    if args.protocol == "dmpo":
        ppu = args.pairs_per_user
        config = DMPOConfig(
            positive_threshold=args.positive_threshold,
            min_positives=args.min_positives,
            min_negatives=args.min_negatives,
            max_interactions=args.max_interactions or None,
            n_sft_users=args.sft_users,
            n_dpo_users=args.dpo_users,
            n_eval_users=args.eval_users,
            n_valid_users=args.valid_users,
            share_sft_dpo_users=not args.separate_dpo_users,
            max_negatives=args.max_negatives,
            pairs_per_user="all" if ppu == "all" else int(ppu),
            groups_per_user=args.groups_per_user,
            eval_pairs_per_user=args.eval_pairs_per_user,
            max_history=args.max_history or None,
            train_history=args.train_history or None,
            train_block=args.train_block or None,
            pairs_per_history=args.pairs_per_history or None,
            normalize_titles=args.normalize_titles,
            scale_down=args.scale_down,
            domain=args.domain,
            seed=args.seed,
        )
        data = build_dmpo(interactions, config)
        paths = write_dmpo_files(data, args.out, prefix)
    else:
        config = SDPOConfig(
            history_len=args.history_len,
            min_history=args.min_history,
            n_candidates=args.candidates,
            train=_count(args.train),
            valid=_count(args.valid),
            test=_count(args.test),
            scale_down=args.scale_down,
            seed=args.seed,
        )
        data = build_sdpo(interactions, config)
        paths = write_sdpo_files(data, args.out, prefix)
    report = data.report.to_dict()
    atomic_write_json(Path(args.out) / f"{prefix}_build_report.json", report)
    return paths, report


def build_command(args: argparse.Namespace) -> None:
    paths, report = build_files(args)
    for path in paths:
        print(f"wrote {path}")
    print(json.dumps(report, indent=2))
