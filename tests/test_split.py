"""prefrec.data.split: seeded, user-disjoint, lossless; sliding windows stay together."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest

from prefrec.data.formats import detect_format, load_examples
from prefrec.data.prompts import selection_instruction
from prefrec.data.schema import SelectionExample
from prefrec.data.split import (
    add_split_args,
    linked_users,
    split_by_user,
    split_command,
    split_file,
    window_chains,
)
from prefrec.data.titles import history_user_key
from prefrec.errors import PrefrecError


def selection(history, target, others=("X1", "X2")) -> SelectionExample:
    candidates = (target, *others)
    return SelectionExample(
        tuple(history), candidates, target, selection_instruction(history, candidates),
        user=history_user_key(history),
    )


@pytest.fixture(scope="module")
def ml1m_dpo3(shared_data):
    return load_examples(shared_data / "dmpo" / "rec_data_ml_1m_dpo_ranking_3.json")


def test_split_is_user_disjoint_lossless_and_ordered(ml1m_dpo3):
    train, test = split_by_user(ml1m_dpo3, 0.2, seed=42)
    assert {ex.user for ex in train}.isdisjoint({ex.user for ex in test})
    assert len(train) + len(test) == len(ml1m_dpo3) == 300
    assert Counter(map(id, train + test)) == Counter(map(id, ml1m_dpo3))
    # 100 users, 3 rows each: 20 test users.
    assert len({ex.user for ex in test}) == 20 and len(test) == 60
    position = {id(ex): i for i, ex in enumerate(ml1m_dpo3)}
    assert [position[id(ex)] for ex in train] == sorted(position[id(ex)] for ex in train)


def test_split_is_deterministic_and_depends_on_the_seed(ml1m_dpo3):
    first = split_by_user(ml1m_dpo3, 0.2, seed=7)
    again = split_by_user(ml1m_dpo3, 0.2, seed=7)
    other = split_by_user(ml1m_dpo3, 0.2, seed=8)
    assert [list(map(id, part)) for part in first] == [list(map(id, part)) for part in again]
    assert {ex.user for ex in first[1]} != {ex.user for ex in other[1]}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_fractions_outside_0_1(ml1m_dpo3, fraction):
    with pytest.raises(PrefrecError, match="eval fraction"):
        split_by_user(ml1m_dpo3, fraction, seed=0)


def test_split_needs_two_users():
    one_user = [selection(["a", "b", "c"], "d")] * 3
    with pytest.raises(PrefrecError, match="1 user"):
        split_by_user(one_user, 0.5, seed=0)


def test_window_chains_join_consecutive_windows_of_one_listener():
    # Listener 1: a b c d e f, windows of 3; listener 2: x y z w; a lone record.
    histories = [("a", "b", "c"), ("x", "y", "z"), ("b", "c", "d"), ("c", "d", "e"), ("p", "q", "r")]
    nexts = [("d",), ("w",), ("e",), ("f",), ("s",)]
    assert window_chains(histories, nexts) == [0, 1, 0, 0, 4]


def test_window_chains_join_a_growing_history():
    # The start of a sequence: the history grows until the window is full.
    histories = [("a", "b", "c"), ("a", "b", "c", "d"), ("b", "c", "d", "e")]
    assert window_chains(histories, [("d",), ("e",), ("f",)]) == [0, 0, 0]


def test_linked_split_keeps_each_listener_on_one_side():
    listener = [selection("abcdefghij"[i : i + 3], "abcdefghij"[i + 3]) for i in range(7)]
    others = [selection([f"u{k}", f"v{k}", f"w{k}"], f"t{k}") for k in range(9)]
    examples = others[:4] + listener + others[4:]
    assert len({ex.user for ex in listener}) == 7  # history keys all differ
    users = linked_users(examples)
    assert len(set(users)) == 10
    for seed in range(5):
        train, test = split_by_user(examples, 0.3, seed, users)
        in_test = [ex in test for ex in listener]
        assert all(in_test) or not any(in_test)


def test_lastfm_linked_split_leaves_no_window_overlap(shared_data):
    examples = load_examples(shared_data / "sdpo-lastfm" / "lastfm-val.json")
    users = linked_users(examples)
    assert len({ex.user for ex in examples}) == 2764
    assert len(set(users)) == 115  # chains of sliding windows: listeners
    train, test = split_by_user(examples, 0.2, 42, users)
    assert len(train) + len(test) == 2767
    train_sets = [set(ex.history) | {ex.target} for ex in train]
    overlap = max(max(len(set(ex.history) & s) for s in train_sets) for ex in test[::10])
    assert overlap < 9  # the unlinked split shares whole windows (10 of 10)


def test_split_command_writes_both_parts_in_the_input_format(shared_data, tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_split_args(p)
    source = shared_data / "dmpo" / "rec_data_ml_1m_dpo_ranking_3.json"
    split_command(p.parse_args([str(source), "--eval-fraction", "0.2", "--seed", "42",
                                "--out", str(tmp_path)]))
    out = capsys.readouterr().out
    assert "train: 240 examples, 80 users" in out and "test: 60 examples, 20 users" in out
    train_path = tmp_path / "rec_data_ml_1m_dpo_ranking_3-train.json"
    test_path = tmp_path / "rec_data_ml_1m_dpo_ranking_3-test.json"
    assert detect_format(train_path) == detect_format(test_path) == "dmpo"
    original = load_examples(source)
    parts = load_examples(train_path) + load_examples(test_path)
    assert sorted((ex.prompt, ex.chosen, ex.rejected) for ex in parts) == sorted(
        (ex.prompt, ex.chosen, ex.rejected) for ex in original
    )


def test_split_file_round_trips_selection_data(tmp_path):
    from prefrec.data.sdpo import write_sdpo

    examples = [selection([f"h{k}", f"i{k}", f"j{k}"], f"t{k}") for k in range(10)]
    source = tmp_path / "sel.json"
    write_sdpo(examples, source)
    written = split_file(source, tmp_path / "out", 0.3, seed=1)
    assert {part: (n, users) for part, (_, n, users) in written.items()} == {
        "train": (7, 7), "test": (3, 3)
    }
    back = load_examples(written["train"][0]) + load_examples(written["test"][0])
    assert sorted(ex.target for ex in back) == sorted(ex.target for ex in examples)
