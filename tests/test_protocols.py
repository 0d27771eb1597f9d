"""DMPO and S-DPO data-building protocols, on hand-made logs and on MovieLens-100K."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from prefrec.data.dmpo import read_dmpo
from prefrec.data.prompts import DOMAINS, pairwise_completion, pairwise_instruction
from prefrec.data.protocols import (
    DMPOConfig,
    SDPOConfig,
    build_dmpo,
    build_sdpo,
    write_dmpo_files,
    write_sdpo_files,
)
from prefrec.data.raw import read_movielens_100k
from prefrec.data.schema import Interaction, Interactions
from prefrec.data.sdpo import read_sdpo
from prefrec.errors import DataError

# --------------------------------------------------------------------------- hand-made logs


def user_events(user: str, positives: int, negatives: int, t0: int = 0) -> list[Interaction]:
    """``positives`` items rated 4/5 at times t0.., then ``negatives`` rated 1..3 (3 included:
    the threshold is inclusive on the negative side)."""
    events = [Interaction(user, f"{user}-p{i}", 4.0 + i % 2, t0 + i) for i in range(positives)]
    events += [
        Interaction(user, f"{user}-n{i}", float(1 + i % 3), t0 + 100 + i) for i in range(negatives)
    ]
    return events


def make_log(events: list[Interaction], extra_titles: dict[str, str] | None = None) -> Interactions:
    titles = {e.item: f"Title {e.item}" for e in events}
    titles.update(extra_titles or {})
    shuffled = list(events)
    random.Random(7).shuffle(shuffled)  # the protocols must order by time, not by file line
    return Interactions(shuffled, titles, source="hand-made")


FEW = DMPOConfig(n_sft_users=1, n_dpo_users=1, n_eval_users=0)


def test_dmpo_single_user_by_hand():
    log = make_log(user_events("u", 6, 5))
    data = build_dmpo(log, FEW)
    [ex] = data.sft
    # Target = last positive by time; history = the earlier positives, oldest first.
    assert ex.history == tuple(f"Title u-p{i}" for i in range(5))
    assert ex.positive_title == "Title u-p5"
    assert ex.negative_title in {f"Title u-n{i}" for i in range(5)}
    first, second = ex.candidates
    assert ex.prompt == pairwise_instruction(ex.history, first, second, DOMAINS["movie"])
    assert ex.chosen == pairwise_completion(ex.positive_title, ex.negative_title)
    assert ex.rejected == pairwise_completion(ex.negative_title, ex.positive_title)
    assert ex.user == "u"
    # dpo[k]: the same positive against the first k of the 5 negatives drawn once.
    assert sorted(data.dpo) == [1, 2, 3, 4, 5]
    five = data.dpo[5]
    assert len({r.negative_title for r in five}) == 5
    assert {r.positive_title for r in five} == {"Title u-p5"}
    for k in range(1, 6):
        assert data.dpo[k] == five[:k]
    # SFT and DPO share their users, as in the released files: the SFT pair is dpo row 0.
    assert data.sft == data.dpo[1]
    assert data.sft[0].meta["output_type"] == "str" and five[0].meta["output_type"] == "list"
    assert data.report.examples == {
        "sft": 1,
        "valid": 0,
        "eval": 0,
        "dpo_1": 1,
        "dpo_2": 2,
        "dpo_3": 3,
        "dpo_4": 4,
        "dpo_5": 5,
    }


def fields(ex):
    return (ex.history, ex.candidates, ex.positive, ex.prompt, ex.chosen, ex.rejected)


def test_dmpo_drops_are_counted_by_first_failing_rule():
    events = (
        user_events("keep", 5, 5)
        + user_events("edge40", 35, 5)  # exactly max_interactions: kept
        + user_events("many", 40, 1)  # 41 events: too many (also too few negatives)
        + user_events("fewpos", 4, 10)
        + user_events("fewneg", 10, 4)
        + user_events("threshold", 5, 5)[:5]
        + [Interaction("threshold", f"threshold-x{i}", 3.0, 200 + i) for i in range(5)]
    )
    data = build_dmpo(make_log(events), DMPOConfig(n_sft_users=1, n_dpo_users=1, n_eval_users=2))
    report = data.report
    assert report.users_total == 6
    assert report.users_kept == 3  # keep, edge40, threshold (rating 3 is a negative)
    assert report.dropped == {
        "too_many_interactions": 1,
        "too_few_positives": 1,
        "too_few_negatives": 1,
    }
    assert report.split_users == {"sft": 1, "dpo": 1, "valid": 0, "eval": 2}
    assert {ex.user for ex in data.sft + data.eval} == {"keep", "edge40", "threshold"}


def test_dmpo_negative_with_the_targets_title_is_never_drawn():
    events = user_events("u", 6, 6)
    # Negative n0 carries the target's title (MovieLens lists some films under two ids).
    log = make_log(events, {"u-n0": "Title u-p5"})
    data = build_dmpo(log, FEW)
    assert all(r.negative_title != "Title u-p5" for r in data.dpo[5])
    assert {r.meta["negative_item"] for r in data.dpo[5]} == {f"u-n{i}" for i in range(1, 6)}
    # With only five negatives, one colliding leaves four usable ones: too few.
    log = make_log(user_events("u", 6, 5), {"u-n0": "Title u-p5"})
    with pytest.raises(DataError):
        build_dmpo(log, FEW)


def test_dmpo_not_enough_users_errors_with_counts_or_scales_down():
    events = [e for u in "abcd" for e in user_events(u, 5, 5)] + user_events("z", 2, 9)
    log = make_log(events)
    config = DMPOConfig(n_sft_users=2, n_dpo_users=2, n_eval_users=6)
    with pytest.raises(DataError) as err:
        build_dmpo(log, config)
    assert str(err.value) == (
        "hand-made: 4 of 5 users qualify but the splits need 8 (sft 2, eval 6); "
        "dropped: too_many_interactions 0, too_few_positives 1, too_few_negatives 0; "
        "lower the split sizes or set scale_down"
    )
    scaled = DMPOConfig(n_sft_users=2, n_dpo_users=2, n_eval_users=6, scale_down=True)
    data = build_dmpo(log, scaled)
    assert data.report.scaled_down
    assert data.report.split_users == {"sft": 1, "dpo": 1, "valid": 0, "eval": 3}


def test_dmpo_data_rich_pairs():
    log = make_log(user_events("u", 6, 5))
    everything = build_dmpo(
        log, DMPOConfig(n_sft_users=1, n_dpo_users=1, n_eval_users=0, pairs_per_user="all")
    )
    positives = [f"Title u-p{i}" for i in range(6)]
    # Targets p1..p5, each with the positives before it as history, times 5 negatives.
    assert len(everything.sft) == 5 * 5
    for ex in everything.sft:
        i = positives.index(ex.positive_title)
        assert i >= 1 and ex.history == tuple(positives[:i])
    assert len({(ex.positive_title, ex.negative_title) for ex in everything.sft}) == 25
    some = build_dmpo(
        log, DMPOConfig(n_sft_users=1, n_dpo_users=1, n_eval_users=0, pairs_per_user=7)
    )
    assert len(some.sft) == 7
    assert {(e.history, e.positive_title, e.negative_title) for e in some.sft} <= {
        (e.history, e.positive_title, e.negative_title) for e in everything.sft
    }
    # DPO files are unchanged by the data-rich option.
    assert some.dpo == everything.dpo


def test_dmpo_data_rich_groups_eval_pairs_and_history_cap():
    events = [e for u in ("a", "b", "c") for e in user_events(u, 8, 6)]
    config = DMPOConfig(n_sft_users=2, n_dpo_users=2, n_eval_users=1, max_negatives=3,
                        min_negatives=3, groups_per_user=4, eval_pairs_per_user=5, max_history=2)
    data = build_dmpo(make_log(events), config)
    # 2 train users x 4 groups, each group k rows with one history and one target.
    for k in (1, 2, 3):
        assert len(data.dpo[k]) == 2 * 4 * k
    rows = data.dpo[3]
    groups = [rows[i : i + 3] for i in range(0, len(rows), 3)]
    for g in groups:
        assert len({(ex.history, ex.positive_title) for ex in g}) == 1
        assert len({ex.negative_title for ex in g}) == 3
    assert len({(g[0].user, g[0].positive_title) for g in groups}) == 8  # distinct targets
    # K=k files are the first k rows of the same groups, as in the released files.
    assert [ex for g in groups for ex in g[:1]] == data.dpo[1]
    # Eval user: 5 pairs, none of them from a training user.
    assert len(data.eval) == 5
    assert {ex.user for ex in data.eval}.isdisjoint({ex.user for ex in data.dpo[3]})
    # History cap: at most the latest 2 liked titles, ending right before the target.
    for ex in [*data.eval, *rows]:
        assert 1 <= len(ex.history) <= 2
        user = ex.user
        positives = [f"Title {user}-p{i}" for i in range(8)]
        i = positives.index(ex.positive_title)
        assert ex.history == tuple(positives[max(0, i - 2) : i])


def test_dmpo_data_rich_options_are_validated():
    with pytest.raises(ValueError, match="groups_per_user"):
        DMPOConfig(groups_per_user=0)
    with pytest.raises(ValueError, match="max_history"):
        DMPOConfig(max_history=0)


def test_dmpo_config_validation():
    with pytest.raises(ValueError, match="min_negatives"):
        DMPOConfig(min_negatives=3)
    with pytest.raises(ValueError, match="share_sft_dpo_users"):
        DMPOConfig(n_dpo_users=50)
    with pytest.raises(ValueError, match="unknown domain"):
        DMPOConfig(domain="books")
    with pytest.raises(ValueError, match="pairs_per_user"):
        DMPOConfig(pairs_per_user=0)


def test_dmpo_domain_wording():
    log = make_log(user_events("u", 6, 5))
    data = build_dmpo(
        log, DMPOConfig(n_sft_users=1, n_dpo_users=1, n_eval_users=0, domain="amazon_game")
    )
    assert "history of Video Games they have shopped" in data.sft[0].prompt


# --------------------------------------------------------------------------- MovieLens-100K


@pytest.fixture(scope="module")
def ml100k(shared_data) -> Interactions:
    return read_movielens_100k(shared_data / "ml-100k")


ML_CONFIG = DMPOConfig(n_sft_users=20, n_dpo_users=20, n_valid_users=20, n_eval_users=200)


def test_dmpo_ml100k_default_protocol_counts(ml100k):
    # 943 users: 638 have more than 40 ratings, then 5 lack positives, 31 lack negatives.
    with pytest.raises(DataError, match="269 of 943 users qualify but the splits need 1100"):
        build_dmpo(ml100k)
    data = build_dmpo(ml100k, DMPOConfig(scale_down=True))
    report = data.report
    assert (report.users_total, report.users_kept) == (943, 269)
    assert report.dropped == {
        "too_many_interactions": 638,
        "too_few_positives": 5,
        "too_few_negatives": 31,
    }
    # 269/1100 of each split: floor(100 * 0.2445) = 24, floor(1000 * 0.2445) = 244.
    assert report.split_users == {"sft": 24, "dpo": 24, "valid": 0, "eval": 244}
    assert len(data.dpo[5]) == 24 * 5


def test_dmpo_ml100k_respects_the_protocol(ml100k):
    data = build_dmpo(ml100k, ML_CONFIG)
    rating = {(e.user, e.item): e.rating for e in ml100k.events}
    time = {(e.user, e.item): e.timestamp for e in ml100k.events}
    counts: dict[str, list[float]] = defaultdict(list)
    for e in ml100k.events:
        counts[e.user].append(e.rating)
    rows = data.sft + data.valid + data.eval + data.dpo[5]
    assert len(rows) == 20 + 20 + 200 + 100
    for ex in rows:
        u, m = ex.user, ex.meta
        assert rating[u, m["positive_item"]] > 3
        assert rating[u, m["negative_item"]] <= 3
        # The history holds only this user's own positives, in time order, before the target.
        assert all(rating.get((u, item), 0) > 3 for item in m["history_items"])
        stamps = [time[u, item] for item in m["history_items"]]
        assert stamps == sorted(stamps) and stamps[-1] <= time[u, m["positive_item"]]
        assert ex.history == tuple(ml100k.title(i) for i in m["history_items"])
        assert len(counts[u]) <= 40
        assert sum(r > 3 for r in counts[u]) >= 5 and sum(r <= 3 for r in counts[u]) >= 5
    # Splits are by user: no user in two of sft / valid / eval; DPO users are the SFT users.
    sft, valid, evl = ({ex.user for ex in rows} for rows in (data.sft, data.valid, data.eval))
    assert len(sft) == 20 and len(valid) == 20 and len(evl) == 200
    assert not (sft & valid or sft & evl or valid & evl)
    assert {ex.user for ex in data.dpo[3]} == sft
    # The candidate order is a fair coin per pair.
    share = sum(ex.positive_listed_first for ex in data.eval) / len(data.eval)
    assert 0.4 < share < 0.6


def test_dmpo_ml100k_separate_dpo_users(ml100k):
    config = DMPOConfig(n_sft_users=20, n_dpo_users=30, n_eval_users=100, share_sft_dpo_users=False)
    data = build_dmpo(ml100k, config)
    sft, dpo, evl = ({ex.user for ex in rows} for rows in (data.sft, data.dpo[2], data.eval))
    assert (len(sft), len(dpo), len(evl)) == (20, 30, 100)
    assert not (sft & dpo or sft & evl or dpo & evl)


def test_dmpo_ml100k_is_deterministic(ml100k, tmp_path):
    first, second = build_dmpo(ml100k, ML_CONFIG), build_dmpo(ml100k, ML_CONFIG)
    assert first.sft == second.sft and first.dpo == second.dpo and first.eval == second.eval
    a = write_dmpo_files(first, tmp_path / "a", "ml100k")
    b = write_dmpo_files(second, tmp_path / "b", "ml100k")
    assert [p.name for p in a] == [
        "ml100k_sft_ranking.json",
        *(f"ml100k_dpo_ranking_{k}.json" for k in range(1, 6)),
        "ml100k_valid_ranking.json",
        "ml100k_eval_ranking.json",
    ]
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a, b, strict=True))
    # What was written reads back as the same examples (sft: string outputs, like the
    # released files; the reader keys users by history, so the user field differs).
    for path, built in ((a[0], first.sft), (a[-1], first.eval)):
        assert [fields(ex) for ex in read_dmpo(path)] == [fields(ex) for ex in built]
    other = build_dmpo(ml100k, DMPOConfig(**{**ML_CONFIG.__dict__, "seed": 1}))
    assert {ex.user for ex in other.eval} != {ex.user for ex in first.eval}


# --------------------------------------------------------------------------- S-DPO


def sequence(user: str, items: list[int], t0: int = 0) -> list[Interaction]:
    return [Interaction(user, f"i{item}", 1.0, t0 + t) for t, item in enumerate(items)]


def test_sdpo_by_hand():
    events = (
        sequence("a", list(range(12)))  # target i11, history i1..i10
        + sequence("b", [0, 1, 2])  # two earlier items: too short a history
        + sequence("c", list(range(12, 40)))  # sees 28 of 40 items: 12 unseen < 19
        + sequence("d", [5, 6, 7, 8])  # target i8, history i5..i7 (exactly min_history)
    )
    log = make_log(events)
    data = build_sdpo(log, SDPOConfig(train=2, valid=0, test=0))
    report = data.report
    assert report.dropped == {"too_short_history": 1, "too_few_unseen_items": 1}
    assert report.users_kept == 2 and report.split_users == {"train": 2, "valid": 0, "test": 0}
    by_user = {ex.user: ex for ex in data.train}
    a = by_user["a"]
    assert a.target == "Title i11"
    assert a.history == tuple(f"Title i{i}" for i in range(1, 11))
    assert len(a.candidates) == 20 == len(set(a.candidates))
    assert a.target in a.candidates
    # The 19 others: items user a never touched.
    assert not {c for c in a.candidates if c != a.target} & {f"Title i{i}" for i in range(12)}
    assert by_user["d"].history == ("Title i5", "Title i6", "Title i7")
    assert a.prompt.startswith('This user has listened to "Title i1", ')


def test_sdpo_splits_fractions_counts_and_errors():
    events = [e for u in range(10) for e in sequence(f"u{u}", [u, u + 1, u + 2, u + 3, u + 30])]
    events += sequence("filler", list(range(40, 70)))  # widens the catalogue
    log = make_log(events)
    data = build_sdpo(log, SDPOConfig(train=0.8, valid=0.1, test=0.1))
    assert data.report.split_users == {"train": 9, "valid": 1, "test": 1}  # 11 users
    users = [{ex.user for ex in rows} for rows in (data.train, data.valid, data.test)]
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    with pytest.raises(DataError, match="11 of 11 users qualify but the splits need 20"):
        build_sdpo(log, SDPOConfig(train=10, valid=5, test=5))
    scaled = build_sdpo(log, SDPOConfig(train=10, valid=5, test=5, scale_down=True))
    assert scaled.report.split_users == {"train": 5, "valid": 2, "test": 2}
    with pytest.raises(ValueError, match="all as counts"):
        SDPOConfig(train=10, valid=0.1, test=0.1)


def test_sdpo_ml100k(ml100k, tmp_path):
    data = build_sdpo(ml100k)
    assert data.report.split_users == {"train": 755, "valid": 94, "test": 94}
    seen: dict[str, set[str]] = defaultdict(set)
    for e in ml100k.events:
        seen[e.user].add(e.item)
    for ex in data.test:
        m = ex.meta
        assert m["target_item"] in seen[ex.user]
        others = set(m["candidate_items"]) - {m["target_item"]}
        assert len(others) == 19 and not others & seen[ex.user]
        assert set(m["history_items"]) <= seen[ex.user] and len(ex.history) == 10
    again = build_sdpo(ml100k)
    assert again.test == data.test
    a = write_sdpo_files(data, tmp_path / "a", "ml100k")
    b = write_sdpo_files(again, tmp_path / "b", "ml100k")
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a, b, strict=True))
    back = read_sdpo(a[2])
    assert [(ex.history, ex.candidates, ex.target, ex.prompt) for ex in back] == [
        (ex.history, ex.candidates, ex.target, ex.prompt) for ex in data.test
    ]
    other = build_sdpo(ml100k, SDPOConfig(seed=1))
    assert [ex.candidates for ex in other.test] != [ex.candidates for ex in data.test]


def test_dmpo_repeated_item_counts_once_with_its_latest_rating():
    events = user_events("u", 7, 4)
    # u-p0 was liked at time 0 and re-rated 2 at time 500: it is the fifth negative now.
    events.append(Interaction("u", "u-p0", 2.0, 500))
    data = build_dmpo(make_log(events), FEW)
    assert data.report.duplicate_events == 1
    assert data.sft[0].history == tuple(f"Title u-p{i}" for i in range(1, 6))
    negatives = {r.meta["negative_item"] for r in data.dpo[5]}
    assert negatives == {"u-p0", "u-n0", "u-n1", "u-n2", "u-n3"}


def test_dmpo_normalize_titles_option(ml100k):
    config = DMPOConfig(n_sft_users=5, n_dpo_users=5, n_eval_users=5, max_interactions=None)
    raw = build_dmpo(ml100k, config)
    norm = build_dmpo(ml100k, DMPOConfig(**{**config.__dict__, "normalize_titles": True}))
    assert any("(19" in t for ex in raw.eval for t in ex.history)
    assert not any("(19" in t for ex in norm.eval for t in (*ex.history, *ex.candidates))
    assert [ex.user for ex in norm.eval] == [ex.user for ex in raw.eval]  # same draws


def test_dmpo_valid_and_eval_pairs_do_not_depend_on_the_training_sample_size():
    """A study variant that draws more training pairs per user is scored on the same
    validation and test pairs as the default."""
    events = [e for u in "abcdefgh" for e in user_events(u, 8, 6)]
    shared = {"n_sft_users": 2, "n_dpo_users": 2, "n_valid_users": 2, "n_eval_users": 2,
              "max_negatives": 3, "min_negatives": 3, "eval_pairs_per_user": 3}
    small = build_dmpo(make_log(events), DMPOConfig(**shared, pairs_per_user=1, groups_per_user=1))
    big = build_dmpo(make_log(events), DMPOConfig(**shared, pairs_per_user=5, groups_per_user=4))
    assert len(big.sft) == 5 * len(small.sft) and len(big.dpo[3]) == 4 * len(small.dpo[3])
    assert small.valid == big.valid and len(small.valid) == 6
    assert small.eval == big.eval and len(small.eval) == 6
