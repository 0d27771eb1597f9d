"""``prefrec data split``: a seeded train/test split in which no user lands on both sides.

Users are the examples' ``user`` keys (readers without user ids key a user by a hash of
the history, so rows sharing a history stay together). The split draws users, not
examples: ``round(eval_fraction * n_users)`` users go to the test part. Both parts keep
the input's example order, and nothing is dropped or duplicated.

This is how the LastFM train/eval split is made: the shipped ``lastfm-val.json`` (2767
selection examples) is the only LastFM file. Its records are *sliding windows*: record t+1
of a listener has history ``history_t[1:] + [target_t]`` (all 2767 records come from about
120 listeners), and their user keys (history hashes) all differ. A split by user key
would put a listener's next window, whose history holds this window's target, on the
other side. :func:`linked_users` therefore joins chained windows into one user first
(``prefrec data split`` does this unless ``--no-link-windows``).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from prefrec.data.schema import PairwiseExample, SelectionExample
from prefrec.errors import PrefrecError


class HasUser(Protocol):
    @property
    def user(self) -> str: ...


T = TypeVar("T", bound=HasUser)


def window_chains(
    histories: Sequence[Sequence[str]], nexts: Sequence[Sequence[str]], min_overlap: int = 3
) -> list[int]:
    """For each sequence, the index of the first sequence of its chain of sliding windows.

    Sequence j continues sequence i when j's history is the last ``len(history_j)``
    items of ``history_i + [n]`` for one of i's next items n (a selection target, a
    liked item), and that history has at least ``min_overlap`` items. Chains are the
    connected components of these links (union-find); a sequence on its own is its own
    chain.
    """
    by_history: dict[tuple[str, ...], list[int]] = {}
    for j, history in enumerate(histories):
        if len(history) >= min_overlap:
            by_history.setdefault(tuple(history), []).append(j)
    parent = list(range(len(histories)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, (history, following) in enumerate(zip(histories, nexts, strict=True)):
        for n in following:
            sequence = (*history, n)
            for length in range(min_overlap, len(sequence) + 1):
                for j in by_history.get(sequence[-length:], ()):
                    a, b = sorted((root(i), root(j)))
                    parent[b] = a  # the smaller index stays the root
    return [root(i) for i in range(len(histories))]


def linked_users(examples: Sequence[PairwiseExample | SelectionExample]) -> list[str]:
    """Each example's user key, with chained sliding windows (:func:`window_chains`)
    sharing the key of their chain's first example."""
    firsts = window_chains(
        [ex.history for ex in examples],
        [
            (ex.positive_title,) if isinstance(ex, PairwiseExample) else (ex.target,)
            for ex in examples
        ],
    )
    return [examples[first].user for first in firsts]


def split_by_user(
    examples: Sequence[T],
    eval_fraction: float,
    seed: int,
    users: Sequence[str] | None = None,
) -> tuple[list[T], list[T]]:
    """Split ``examples`` into (train, test) by user, reproducibly.

    The distinct users, sorted, are shuffled with ``random.Random(seed)``; the first
    ``round(eval_fraction * n_users)`` of them (at least one, at most all but one) form
    the test part. Users are the examples' ``user`` attributes (examples, baskets), or
    ``users[i]`` for example i when given (e.g. :func:`linked_users`).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise PrefrecError(f"eval fraction {eval_fraction}: expected a number between 0 and 1")
    if users is None:
        users_of = [ex.user for ex in examples]
    elif len(users) != len(examples):
        raise ValueError(f"{len(users)} user keys for {len(examples)} examples")
    else:
        users_of = list(users)
    users = sorted(set(users_of))
    if len(users) < 2:
        raise PrefrecError(
            f"cannot split {len(examples)} examples of {len(users)} user(s) by user: "
            "need at least two users"
        )
    random.Random(seed).shuffle(users)
    n_test = min(max(1, round(eval_fraction * len(users))), len(users) - 1)
    test_users = set(users[:n_test])
    train = [ex for ex, u in zip(examples, users_of, strict=True) if u not in test_users]
    test = [ex for ex, u in zip(examples, users_of, strict=True) if u in test_users]
    return train, test


def add_split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="dataset file or name (e.g. lastfm)")
    p.add_argument(
        "--eval-fraction", type=float, default=0.2, help="share of users in the test part (default: 0.2)"
    )
    p.add_argument("--seed", type=int, default=42, help="shuffle seed (default: 42)")
    p.add_argument(
        "--link-windows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="treat chained sliding windows (next history = history[1:] + target) as one "
        "user (default: on)",
    )
    p.add_argument("--out", required=True, help="output folder for <stem>-train / <stem>-test")
    p.add_argument(
        "--data-dir",
        default=None,
        help="where named datasets live (default: $PREFREC_DATA, then ../shared/data)",
    )


def split_file(
    path: str | Path,
    out_dir: str | Path,
    eval_fraction: float,
    seed: int,
    link_windows: bool = True,
) -> dict[str, tuple[Path, int, int]]:
    """Split one file and write ``<stem>-train`` and ``<stem>-test`` in its own format.

    Returns ``{"train": (path, n_examples, n_users), "test": (...)}``, users counted as
    the split saw them (chains of windows when ``link_windows``).
    """
    from prefrec.data.formats import detect_format, load_examples, save_examples

    path = Path(path)
    examples = load_examples(path)
    if not examples:
        raise PrefrecError(f"{path}: no examples to split")
    fmt = detect_format(path)
    users = linked_users(examples) if link_windows else [ex.user for ex in examples]
    user_of = {id(ex): u for ex, u in zip(examples, users, strict=True)}
    train, test = split_by_user(examples, eval_fraction, seed, users)
    written = {}
    for part, rows in (("train", train), ("test", test)):
        target = Path(out_dir) / f"{path.stem}-{part}{path.suffix or '.json'}"
        save_examples(rows, target, fmt, seed=seed)
        written[part] = (target, len(rows), len({user_of[id(ex)] for ex in rows}))
    return written


def split_command(args: argparse.Namespace) -> None:
    from prefrec.data.resolve import resolve_dataset

    path = resolve_dataset(args.file, data_dir=args.data_dir)
    written = split_file(path, args.out, args.eval_fraction, args.seed, args.link_windows)
    for part, (target, n_examples, n_users) in written.items():
        print(f"{part}: {n_examples} examples, {n_users} users -> {target}")
