"""Build training and test data from a raw interaction log: the DMPO and S-DPO protocols.

Both protocols split by **user**, so test users are never seen in training, and both are
deterministic: a build is a function of the log and the config (``seed`` included). The
split shuffles the sorted user ids with ``random.Random(seed)``; each user's own draws
(negatives, candidate order) use ``random.Random(f"{seed}/{user}")``, so a user's
examples do not change when the split sizes or the other users change.

Users the protocol cannot use are **counted by reason** in :class:`BuildReport`, never
dropped silently. Each dropped user is counted once, under the first rule it fails, in
the order the rules are listed in the config docstrings.

DMPO protocol (:class:`DMPOConfig`, :func:`build_dmpo`), the few-shot pairwise data of
the DMPO paper:

- positive = rating > ``positive_threshold`` (3), negative = rating <= it;
- a user qualifies with at most ``max_interactions`` (40) events, at least
  ``min_positives`` (5) positives and ``min_negatives`` (5) negatives;
- the target pair is the user's **last positive** (by time) against a random negative;
  the history is every earlier positive, oldest first (negatives never enter a prompt);
- each user draws ``max_negatives`` (K_max = 5) negatives once; the ``dpo[k]`` file holds,
  per DPO user, the pairs of the target with the first ``k`` of them (same positive in
  every row, like the released ``dpo_ranking_k`` files, and file ``k`` is a prefix of
  file ``k+1`` per user); SFT and eval users get the pair with the first negative;
- which candidate the prompt names first is a fair coin per pair;
- few-shot splits of 100 SFT / 100 DPO / 1000 eval users. As in the released files, the
  DPO users are the SFT users (``share_sft_dpo_users``), so 1100 users are needed; when
  fewer qualify the build fails with the counts, unless ``scale_down`` shrinks every
  split by the same factor.

Data-rich option: ``pairs_per_user`` > 1 (or ``"all"``) turns every SFT user into many
pairs: each positive after the first becomes a target, with the positives before it as
history, against each usable negative; ``pairs_per_user`` of these (position, negative)
combinations are drawn per user, or all of them. ``n_valid_users`` adds a held-out
validation split (one pair per user, like eval).

Fixed-history option: ``train_history`` = H gives every *training* (SFT and DPO) user one
history, their first H liked items (fewer when a user has at most H: all but the last),
and draws the targets of their pairs and groups from the liked items after it. Every
prompt of a training user then shares the history, so user-packed training
(``pack_by_user`` in :mod:`prefrec.train.config`) runs it once for all of them. Valid and
eval users keep the protocol above.
``train_block`` = B cuts that timeline into blocks instead: block b's history is the H
liked items just before it and its targets the next B liked items, so a target is at most
B - 1 items past its history, near the eval protocol's "latest H before the target".
Pairs and groups are then drawn block by block (B per block, blocks in random order), so
a user's examples still share few histories and pack. ``pairs_per_history`` = P draws P
SFT pairs per block instead (P negatives per target when B = 1): with B = 1 every pair has
the eval protocol's own history, and the P pairs of a target still pack into one row.

S-DPO protocol (:class:`SDPOConfig`, :func:`build_sdpo`), candidate selection:

- events in time order (ties by item id); the target is the user's last event and the
  history the ``history_len`` (10) events before it; a user needs ``min_history`` (3)
  earlier events;
- the candidates are the target and ``n_candidates - 1`` (19) random items the user never
  interacted with, with pairwise distinct titles, shuffled;
- user splits train / valid / test, as counts or fractions of the qualifying users.

Titles collide in real catalogues (MovieLens-100K lists some films twice under two ids),
so a negative whose title equals the target's is never drawn: the completion could not
tell them apart.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefrec.data import prompts
from prefrec.data.dmpo import write_dmpo
from prefrec.data.raw import items_without_title
from prefrec.data.schema import Interaction, Interactions, PairwiseExample, SelectionExample
from prefrec.data.sdpo import write_sdpo
from prefrec.data.titles import normalize_title
from prefrec.errors import DataError

ALL_PAIRS = "all"


@dataclass
class BuildReport:
    """What a protocol build kept and what it dropped, and why.

    Attributes:
        protocol: ``"dmpo"`` or ``"sdpo"``.
        users_total: distinct users in the log.
        users_kept: users that satisfied every rule.
        dropped: users dropped, by the first rule they failed.
        split_users: users per split.
        examples: examples per output (``"dpo_3"`` for the k=3 DPO file).
        requested_users: the split sizes the config asked for.
        scaled_down: whether the splits were shrunk to fit the qualifying users.
        duplicate_events: repeated (user, item) events; the latest one counts (DMPO only).
        items_without_title: items in the log whose title fell back to their id.
    """

    protocol: str
    users_total: int
    users_kept: int
    dropped: dict[str, int]
    split_users: dict[str, int] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    requested_users: dict[str, int] = field(default_factory=dict)
    scaled_down: bool = False
    duplicate_events: int = 0
    items_without_title: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- shared steps


def _events_by_user(events: Iterable[Interaction]) -> dict[str, list[Interaction]]:
    """Each user's events in time order; ties broken by item id so order never depends on
    the file's line order."""
    by_user: dict[str, list[Interaction]] = defaultdict(list)
    for event in events:
        by_user[event.user].append(event)
    return {
        user: sorted(evs, key=lambda e: (e.timestamp, e.item))
        for user, evs in sorted(by_user.items())
    }


def _latest_per_item(events: list[Interaction]) -> list[Interaction]:
    """Keep one event per item, the latest (events are in time order), in time order."""
    latest = {e.item: e for e in events}
    return [e for e in events if latest[e.item] is e]


def _user_rng(seed: int, user: str) -> random.Random:
    # A string seed is hashed with SHA-512 by random.seed: stable across runs and platforms.
    return random.Random(f"{seed}/{user}")


def _resolve_sizes(
    requested: dict[str, int], available: int, scale_down: bool, source: str, report: BuildReport
) -> dict[str, int]:
    """The split sizes to use: as requested, or scaled by available/needed when allowed."""
    needed = sum(requested.values())
    if needed <= available:
        return dict(requested)
    wanted = ", ".join(f"{name} {n}" for name, n in requested.items() if n)
    dropped = ", ".join(f"{reason} {n}" for reason, n in report.dropped.items()) or "none"
    counts = (
        f"{available} of {report.users_total} users qualify but the splits need {needed} "
        f"({wanted}); dropped: {dropped}"
    )
    if not scale_down:
        raise DataError(
            source or None, None, None, f"{counts}; lower the split sizes or set scale_down"
        )
    sizes = {name: math.floor(n * available / needed) for name, n in requested.items()}
    empty = [name for name, n in sizes.items() if requested[name] > 0 and n == 0]
    if empty:
        raise DataError(
            source or None, None, None, f"{counts}; scaling down empties {', '.join(empty)}"
        )
    report.scaled_down = True
    return sizes


# --------------------------------------------------------------------------- DMPO


@dataclass(frozen=True)
class DMPOConfig:
    """The DMPO few-shot pairwise protocol. Users are checked by these rules, in order:
    ``max_interactions``, ``min_positives``, ``min_negatives``.

    Attributes:
        positive_threshold: ratings above it are positives, the rest negatives.
        min_positives: fewest positives a user needs (the target plus a history).
        min_negatives: fewest usable negatives a user needs (at least ``max_negatives``).
        max_interactions: most events a user may have; ``None`` for no limit.
        n_sft_users: users in the SFT split (one pair each, or more, see ``pairs_per_user``).
        n_dpo_users: users in the DPO split (``k`` pairs each in the ``dpo[k]`` file).
        n_eval_users: users in the eval split (one pair each).
        n_valid_users: users in an optional validation split (one pair each).
        share_sft_dpo_users: the DPO users are the SFT users, as in the released files;
            ``n_dpo_users`` must then equal ``n_sft_users``.
        max_negatives: K_max, the negatives drawn per user; ``dpo[k]`` exists for 1..K_max.
        pairs_per_user: pairs per SFT user: 1 (few-shot), an int, or ``"all"`` (data-rich).
        groups_per_user: preference groups per DPO user (data-rich): each takes another
            liked item as the target, with its own ``max_negatives`` negatives.
        eval_pairs_per_user: pairs per valid / eval user (data-rich: more test pairs from
            the same unseen users).
        max_history: keep only the latest this many liked items in a prompt's history;
            ``None`` keeps all (the released files' users have at most 40 events).
        train_history: training users' fixed history length (see the module docstring);
            ``None`` keeps the per-target histories of valid and eval users.
        train_block: with ``train_history``, targets per fixed history block (see the
            module docstring); ``None``: one history, the first H liked items.
        pairs_per_history: with ``train_block``, SFT pairs drawn per history block;
            ``None``: ``train_block`` of them.
        normalize_titles: pass every title through
            :func:`prefrec.data.titles.normalize_title` (no year, no trailing article).
        scale_down: shrink every split by one factor when too few users qualify, instead
            of failing.
        domain: key of :data:`prefrec.data.prompts.DOMAINS` for the prompt wording.
        seed: seed of every random draw.
    """

    positive_threshold: float = 3.0
    min_positives: int = 5
    min_negatives: int = 5
    max_interactions: int | None = 40
    n_sft_users: int = 100
    n_dpo_users: int = 100
    n_eval_users: int = 1000
    n_valid_users: int = 0
    share_sft_dpo_users: bool = True
    max_negatives: int = 5
    pairs_per_user: int | Literal["all"] = 1
    groups_per_user: int = 1
    eval_pairs_per_user: int = 1
    max_history: int | None = None
    train_history: int | None = None
    train_block: int | None = None
    pairs_per_history: int | None = None
    normalize_titles: bool = False
    scale_down: bool = False
    domain: str = "movie"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_positives < 2:
            raise ValueError("min_positives must be >= 2: the target and at least one history item")
        if self.max_negatives < 1:
            raise ValueError("max_negatives must be >= 1")
        if self.min_negatives < self.max_negatives:
            raise ValueError(
                f"min_negatives ({self.min_negatives}) must be >= max_negatives "
                f"({self.max_negatives}) so every DPO user fills every dpo[k] file"
            )
        if self.share_sft_dpo_users and self.n_dpo_users != self.n_sft_users:
            raise ValueError("share_sft_dpo_users needs n_dpo_users == n_sft_users")
        sizes = (self.n_sft_users, self.n_dpo_users, self.n_eval_users, self.n_valid_users)
        if min(sizes) < 0:
            raise ValueError("split sizes must be >= 0")
        if self.pairs_per_user != ALL_PAIRS and (
            not isinstance(self.pairs_per_user, int) or self.pairs_per_user < 1
        ):
            raise ValueError(f"pairs_per_user must be an int >= 1 or {ALL_PAIRS!r}")
        if self.groups_per_user < 1 or self.eval_pairs_per_user < 1:
            raise ValueError("groups_per_user and eval_pairs_per_user must be >= 1")
        if self.max_history is not None and self.max_history < 1:
            raise ValueError("max_history must be >= 1 (or None for the whole history)")
        if self.train_history is not None and self.train_history < 1:
            raise ValueError("train_history must be >= 1 (or None for per-target histories)")
        if self.train_block is not None and (self.train_block < 1 or self.train_history is None):
            raise ValueError("train_block must be >= 1 and needs train_history")
        if self.pairs_per_history is not None and (
            self.pairs_per_history < 1 or self.train_block is None
        ):
            raise ValueError("pairs_per_history must be >= 1 and needs train_block")
        if self.domain not in prompts.DOMAINS:
            raise ValueError(
                f"unknown domain {self.domain!r}; choose from {', '.join(prompts.DOMAINS)}"
            )

    def requested_users(self) -> dict[str, int]:
        """The users each split asks for (DPO users count only when not shared)."""
        sizes = {"sft": self.n_sft_users}
        if not self.share_sft_dpo_users:
            sizes["dpo"] = self.n_dpo_users
        sizes["valid"] = self.n_valid_users
        sizes["eval"] = self.n_eval_users
        return sizes


@dataclass
class DMPOData:
    """The outputs of :func:`build_dmpo`: ``dpo[k]`` for k = 1..K_max."""

    sft: list[PairwiseExample]
    dpo: dict[int, list[PairwiseExample]]
    valid: list[PairwiseExample]
    eval: list[PairwiseExample]
    report: BuildReport

    def files(self, prefix: str) -> dict[str, list[PairwiseExample]]:
        """The outputs under the released files' names: ``{prefix}_sft_ranking`` etc.
        (``valid`` only when it has examples)."""
        named = {f"{prefix}_sft_ranking": self.sft}
        named.update({f"{prefix}_dpo_ranking_{k}": rows for k, rows in sorted(self.dpo.items())})
        if self.valid:
            named[f"{prefix}_valid_ranking"] = self.valid
        named[f"{prefix}_eval_ranking"] = self.eval
        return named


@dataclass(frozen=True)
class _DMPOUser:
    """One qualifying user's positive and negative items, each in time order."""

    user: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...]


def _dmpo_reason(events: list[Interaction], config: DMPOConfig, log: Interactions) -> str | None:
    """The first rule a user fails, or None."""
    if config.max_interactions is not None and len(events) > config.max_interactions:
        return "too_many_interactions"
    positives = [e.item for e in events if e.rating > config.positive_threshold]
    if len(positives) < config.min_positives:
        return "too_few_positives"
    target_title = log.title(positives[-1])
    usable = [
        e.item
        for e in events
        if e.rating <= config.positive_threshold and log.title(e.item) != target_title
    ]
    if len(usable) < config.min_negatives:
        return "too_few_negatives"
    return None


def _pairwise(
    log: Interactions,
    user: str,
    history: tuple[str, ...],
    positive: str,
    negative: str,
    positive_first: bool,
    domain: prompts.Domain,
    split: str,
) -> PairwiseExample:
    """One DMPO pairwise example from item ids."""
    pos, neg = log.title(positive), log.title(negative)
    first, second = (pos, neg) if positive_first else (neg, pos)
    history_titles = tuple(log.title(i) for i in history)
    return PairwiseExample(
        history=history_titles,
        candidates=(first, second),
        positive=0 if positive_first else 1,
        prompt=prompts.pairwise_instruction(history_titles, first, second, domain),
        chosen=prompts.pairwise_completion(pos, neg),
        rejected=prompts.pairwise_completion(neg, pos),
        user=user,
        meta={
            "protocol": "dmpo",
            "split": split,
            "output_type": _output_type(split),
            "history_items": history,
            "positive_item": positive,
            "negative_item": negative,
        },
    )


def _usable_negatives(log: Interactions, u: _DMPOUser, target: str) -> list[str]:
    title = log.title(target)
    return [n for n in u.negatives if log.title(n) != title]


def _history(u: _DMPOUser, i: int, max_history: int | None) -> tuple[str, ...]:
    """The liked items before target ``positives[i]``, the latest ``max_history`` of them."""
    start = 0 if max_history is None else max(0, i - max_history)
    return u.positives[start:i]


def _targets(u: _DMPOUser, config: DMPOConfig, split: str) -> list[tuple[int, tuple[str, ...]]]:
    """(target position, its history) for every liked item a user's pairs may target.

    Training users under ``train_history`` share one history, their first H liked items,
    and target the items after it (under ``train_block`` B: the H liked items before each
    block of B targets); everyone else targets ``positives[i]`` (i >= 1) with the items
    before it (:func:`_history`).
    """
    if config.train_history is not None and split in ("sft", "dpo"):
        h = min(config.train_history, len(u.positives) - 1)
        if config.train_block is None:
            return [(i, u.positives[:h]) for i in range(h, len(u.positives))]
        b = config.train_block
        return [(i, u.positives[i - (i - h) % b - h : i - (i - h) % b])
                for i in range(h, len(u.positives))]
    return [(i, _history(u, i, config.max_history)) for i in range(1, len(u.positives))]


def _sample_by_history(
    histories: Sequence[tuple[str, ...]], n: int, per_history: int, rng: random.Random
) -> list[int]:
    """``n`` indices drawn ``per_history`` at a time from histories in random order
    (fewer from one that has fewer): few distinct histories, so the rows pack."""
    by_history: dict[tuple[str, ...], list[int]] = {}
    for j, history in enumerate(histories):
        by_history.setdefault(tuple(history), []).append(j)
    blocks = list(by_history.values())
    rng.shuffle(blocks)
    picked: list[int] = []
    for block in blocks:
        picked += rng.sample(block, min(per_history, len(block), n - len(picked)))
        if len(picked) == n:
            break
    return sorted(picked)


def _data_rich_pairs(
    log: Interactions,
    u: _DMPOUser,
    n: int | Literal["all"],
    config: DMPOConfig,
    domain: prompts.Domain,
    rng: random.Random,
    split: str,
) -> list[PairwiseExample]:
    """Every (target position, negative) combination of a user, or a sample of ``n``
    (targets and histories from :func:`_targets`)."""
    combos = [
        (i, history, negative)
        for i, history in _targets(u, config, split)
        for negative in _usable_negatives(log, u, u.positives[i])
    ]
    if n != ALL_PAIRS and n < len(combos):
        if config.train_block is not None and split in ("sft", "dpo"):
            per_history = config.pairs_per_history or config.train_block
            picked = _sample_by_history([c[1] for c in combos], n, per_history, rng)
        else:
            picked = sorted(rng.sample(range(len(combos)), n))
        combos = [combos[j] for j in picked]
    return [
        _pairwise(log, u.user, history, u.positives[i], neg, rng.random() < 0.5, domain, split)
        for i, history, neg in combos
    ]


def _data_rich_groups(
    log: Interactions, u: _DMPOUser, config: DMPOConfig, domain: prompts.Domain,
    rng: random.Random,
) -> list[list[PairwiseExample]]:
    """``groups_per_user`` preference groups of a user: each a sampled target position
    with ``max_negatives`` sampled negatives (one pairwise row per negative)."""
    targets = [
        (i, history) for i, history in _targets(u, config, "dpo")
        if len(_usable_negatives(log, u, u.positives[i])) >= config.max_negatives
    ]
    n = min(config.groups_per_user, len(targets))
    if config.train_block is not None:
        picked = _sample_by_history([t[1] for t in targets], n, config.train_block, rng)
    else:
        picked = sorted(rng.sample(range(len(targets)), n))
    groups = []
    for i, history in (targets[j] for j in picked):
        negatives = rng.sample(_usable_negatives(log, u, u.positives[i]), config.max_negatives)
        groups.append([
            _pairwise(log, u.user, history, u.positives[i], neg, rng.random() < 0.5, domain, "dpo")
            for neg in negatives
        ])
    return groups


def build_dmpo(log: Interactions, config: DMPOConfig | None = None) -> DMPOData:
    """Build the DMPO few-shot files (sft, dpo[1..K_max], valid, eval) from ratings.

    Raises :class:`~prefrec.errors.DataError` with the counts when too few users qualify
    and ``config.scale_down`` is false.
    """
    config = config or DMPOConfig()
    if config.normalize_titles:
        log = Interactions(log.events, {k: normalize_title(v) for k, v in log.titles.items()},
                           log.source)
    domain = prompts.DOMAINS[config.domain]
    by_user = _events_by_user(log.events)
    report = BuildReport(
        protocol="dmpo",
        users_total=len(by_user),
        users_kept=0,
        dropped={"too_many_interactions": 0, "too_few_positives": 0, "too_few_negatives": 0},
        requested_users=config.requested_users(),
        items_without_title=len(items_without_title(log)),
    )
    qualifying: list[_DMPOUser] = []
    for user, events in by_user.items():
        unique = _latest_per_item(events)
        report.duplicate_events += len(events) - len(unique)
        reason = _dmpo_reason(unique, config, log)
        if reason is not None:
            report.dropped[reason] += 1
            continue
        positives = tuple(e.item for e in unique if e.rating > config.positive_threshold)
        negatives = tuple(e.item for e in unique if e.rating <= config.positive_threshold)
        qualifying.append(_DMPOUser(user, positives, negatives))
    report.users_kept = len(qualifying)

    sizes = _resolve_sizes(
        config.requested_users(), len(qualifying), config.scale_down, log.source, report
    )
    order = list(qualifying)  # sorted by user id (by_user is sorted)
    random.Random(config.seed).shuffle(order)
    splits: dict[str, list[_DMPOUser]] = {}
    start = 0
    for name, n in sizes.items():
        splits[name] = order[start : start + n]
        start += n
    if config.share_sft_dpo_users:
        splits["dpo"] = splits["sft"]
    report.split_users = {name: len(splits[name]) for name in ("sft", "dpo", "valid", "eval")}

    # Each user's draws, made once: K_max negatives for the last positive and a coin per pair.
    drawn: dict[str, list[PairwiseExample]] = {}
    rngs: dict[str, random.Random] = {}
    for u in order[:start]:
        rng = rngs[u.user] = _user_rng(config.seed, u.user)
        target = u.positives[-1]
        history = _history(u, len(u.positives) - 1, config.max_history)
        negatives = rng.sample(_usable_negatives(log, u, target), config.max_negatives)
        drawn[u.user] = [
            _pairwise(log, u.user, history, target, neg, rng.random() < 0.5, domain, "")
            for neg in negatives
        ]

    # Fixed training histories: even one pair or group per user comes from _targets.
    fixed = config.train_history is not None

    def pairs(users: list[_DMPOUser], n: int | Literal["all"], split: str) -> list[PairwiseExample]:
        if n == 1 and not (fixed and split == "sft"):
            return [_with_split(drawn[u.user][0], split) for u in users]
        return [
            ex for u in users for ex in _data_rich_pairs(log, u, n, config, domain, rngs[u.user], split)
        ]

    sft = pairs(splits["sft"], config.pairs_per_user, "sft")
    if config.groups_per_user == 1 and not fixed:
        groups = [drawn[u.user] for u in splits["dpo"]]
    else:
        groups = [
            g for u in splits["dpo"] for g in _data_rich_groups(log, u, config, domain, rngs[u.user])
        ]
    dpo = {
        k: [_with_split(ex, "dpo") for g in groups for ex in g[:k]]
        for k in range(1, config.max_negatives + 1)
    }
    data = DMPOData(
        sft=sft,
        dpo=dpo,
        valid=pairs(splits["valid"], config.eval_pairs_per_user, "valid"),
        eval=pairs(splits["eval"], config.eval_pairs_per_user, "eval"),
        report=report,
    )
    report.examples = {"sft": len(data.sft), "valid": len(data.valid), "eval": len(data.eval)}
    report.examples.update({f"dpo_{k}": len(rows) for k, rows in dpo.items()})
    return data


def _output_type(split: str) -> str:
    """The DMPO ``output`` style per split: a string for SFT files, as released; the
    unambiguous ``[chosen, rejected]`` list elsewhere."""
    return "str" if split == "sft" else "list"


def _with_split(example: PairwiseExample, split: str) -> PairwiseExample:
    """A copy of ``example`` whose meta names its split (meta is not part of equality)."""
    return PairwiseExample(
        example.history,
        example.candidates,
        example.positive,
        example.prompt,
        example.chosen,
        example.rejected,
        example.user,
        {**example.meta, "split": split, "output_type": _output_type(split)},
    )


def write_dmpo_files(data: DMPOData, directory: str | Path, prefix: str) -> list[Path]:
    """Write every output of a DMPO build as the released files' JSON, atomically.

    Returns the paths written, ``{directory}/{prefix}_sft_ranking.json`` and so on.
    """
    directory = Path(directory)
    paths = []
    for name, rows in data.files(prefix).items():
        path = directory / f"{name}.json"
        write_dmpo(rows, path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- S-DPO


@dataclass(frozen=True)
class SDPOConfig:
    """The S-DPO candidate-selection protocol. Users are checked by these rules, in order:
    ``min_history``, then whether enough never-seen items exist for the candidates.

    Attributes:
        history_len: most history items before the target (the latest ones).
        min_history: fewest history items a user needs.
        n_candidates: candidates per prompt: the target plus ``n_candidates - 1`` items the
            user never interacted with.
        train, valid, test: split sizes: ints are user counts; floats in [0, 1] are
            fractions of the qualifying users (when the three fractions sum to 1, train
            takes what rounding leaves).
        min_rating: keep only events rated at least this (``None``: every event counts,
            implicit feedback as in S-DPO).
        scale_down: with counts, shrink every split by one factor when too few users
            qualify, instead of failing.
        seed: seed of every random draw.
    """

    history_len: int = 10
    min_history: int = 3
    n_candidates: int = 20
    train: int | float = 0.8
    valid: int | float = 0.1
    test: int | float = 0.1
    min_rating: float | None = None
    scale_down: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_history <= self.history_len:
            raise ValueError("need 1 <= min_history <= history_len")
        if self.n_candidates < 2:
            raise ValueError("n_candidates must be >= 2")
        kinds = {isinstance(s, float) for s in (self.train, self.valid, self.test)}
        if len(kinds) != 1:
            raise ValueError(
                "give train/valid/test all as counts (int) or all as fractions (float)"
            )
        if kinds == {True}:
            if (
                min(self.train, self.valid, self.test) < 0
                or self.train + self.valid + self.test > 1 + 1e-9
            ):
                raise ValueError("split fractions must be >= 0 and sum to at most 1")
        elif min(self.train, self.valid, self.test) < 0:
            raise ValueError("split sizes must be >= 0")

    def split_sizes(self, available: int) -> dict[str, int]:
        """Users per split for ``available`` qualifying users (fractions resolved)."""
        if not isinstance(self.train, float):
            return {"train": int(self.train), "valid": int(self.valid), "test": int(self.test)}
        valid = math.floor(self.valid * available)
        test = math.floor(self.test * available)
        if abs(self.train + self.valid + self.test - 1) < 1e-9:
            train = available - valid - test
        else:
            train = math.floor(self.train * available)
        return {"train": train, "valid": valid, "test": test}


@dataclass
class SDPOData:
    """The outputs of :func:`build_sdpo`."""

    train: list[SelectionExample]
    valid: list[SelectionExample]
    test: list[SelectionExample]
    report: BuildReport


def _title_representatives(log: Interactions, items: Iterable[str]) -> list[str]:
    """One item per distinct title (the smallest id), sorted by id: the negatives' universe."""
    by_title: dict[str, str] = {}
    for item in sorted(set(items)):
        by_title.setdefault(log.title(item), item)
    return sorted(by_title.values())


def _draw_unseen(
    rng: random.Random, universe: list[str], log: Interactions, seen_titles: set[str], n: int
) -> list[str]:
    """``n`` items of ``universe`` (distinct titles) whose titles are not in ``seen_titles``.

    Rejection sampling keeps this O(n) per user on large catalogues; when most of the
    catalogue is excluded the pool is listed explicitly instead.
    """
    if 2 * len(seen_titles) >= len(universe):
        pool = [i for i in universe if log.title(i) not in seen_titles]
        return rng.sample(pool, n)
    picked: list[str] = []
    taken = set(seen_titles)
    while len(picked) < n:
        item = universe[rng.randrange(len(universe))]
        if log.title(item) not in taken:
            taken.add(log.title(item))
            picked.append(item)
    return picked


def build_sdpo(log: Interactions, config: SDPOConfig | None = None) -> SDPOData:
    """Build S-DPO candidate-selection data (train / valid / test users) from a log."""
    config = config or SDPOConfig()
    events = [e for e in log.events if config.min_rating is None or e.rating >= config.min_rating]
    by_user = _events_by_user(events)
    universe = _title_representatives(log, (e.item for e in events))
    universe_titles = {log.title(i) for i in universe}
    report = BuildReport(
        protocol="sdpo",
        users_total=len({e.user for e in log.events}),
        users_kept=0,
        dropped={"too_short_history": 0, "too_few_unseen_items": 0},
        items_without_title=len(items_without_title(log)),
    )
    if config.min_rating is not None:
        # Users whose every event is below min_rating have nothing left to build from.
        report.dropped["too_short_history"] += report.users_total - len(by_user)
    qualifying: list[str] = []
    for user, evs in by_user.items():
        if len(evs) - 1 < config.min_history:
            report.dropped["too_short_history"] += 1
            continue
        seen = {log.title(e.item) for e in evs}
        if len(universe_titles - seen) < config.n_candidates - 1:
            report.dropped["too_few_unseen_items"] += 1
            continue
        qualifying.append(user)
    report.users_kept = len(qualifying)

    requested = config.split_sizes(len(qualifying))
    report.requested_users = dict(requested)
    sizes = _resolve_sizes(requested, len(qualifying), config.scale_down, log.source, report)
    order = list(qualifying)
    random.Random(config.seed).shuffle(order)
    outputs: dict[str, list[SelectionExample]] = {}
    start = 0
    for split, n in sizes.items():
        outputs[split] = [
            _selection(log, user, by_user[user], universe, config, split)
            for user in order[start : start + n]
        ]
        start += n
    report.split_users = {split: len(rows) for split, rows in outputs.items()}
    report.examples = dict(report.split_users)
    return SDPOData(outputs["train"], outputs["valid"], outputs["test"], report)


def _selection(
    log: Interactions,
    user: str,
    events: list[Interaction],
    universe: list[str],
    config: SDPOConfig,
    split: str,
) -> SelectionExample:
    """One user's selection example: last event as target, the ones before as history."""
    rng = _user_rng(config.seed, user)
    target = events[-1].item
    history = tuple(e.item for e in events[:-1][-config.history_len :])
    seen = {log.title(e.item) for e in events}
    candidates = [target] + _draw_unseen(rng, universe, log, seen, config.n_candidates - 1)
    rng.shuffle(candidates)
    history_titles = tuple(log.title(i) for i in history)
    candidate_titles = tuple(log.title(i) for i in candidates)
    return SelectionExample(
        history=history_titles,
        candidates=candidate_titles,
        target=log.title(target),
        prompt=prompts.selection_instruction(history_titles, candidate_titles),
        user=user,
        meta={
            "protocol": "sdpo",
            "split": split,
            "history_items": history,
            "target_item": target,
            "candidate_items": tuple(candidates),
            # The S-DPO file joins histories with '::'; a title containing it needs a list.
            "history_type": "list" if any("::" in t for t in history_titles) else "str",
        },
    )


def write_sdpo_files(data: SDPOData, directory: str | Path, prefix: str) -> list[Path]:
    """Write the splits of an S-DPO build as ``{prefix}-train.json``, ``-valid``, ``-test``
    in the released file's JSON style, atomically. Returns the paths written."""
    directory = Path(directory)
    paths = []
    for split, rows in (("train", data.train), ("valid", data.valid), ("test", data.test)):
        path = directory / f"{prefix}-{split}.json"
        write_sdpo(rows, path)
        paths.append(path)
    return paths
