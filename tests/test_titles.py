"""Title tags, the optional ML-1M title normalisation, item and user keys."""

from __future__ import annotations

import json

import pytest

from prefrec.data.prompts import DOMAINS, pairwise_completion, pairwise_instruction
from prefrec.data.titles import (
    history_user_key,
    item_key,
    normalize_title,
    parse_title_tags,
)


def test_tags_keep_titles_verbatim_with_trailing_spaces():
    assert parse_title_tags(" <Title:Tarzan > ,  <Title:Gigi > ") == ["Tarzan ", "Gigi "]
    assert parse_title_tags("<Title: 4 Film Favorites>") == [" 4 Film Favorites"]


def test_tags_survive_angle_brackets_inside_titles():
    history = ["A > B", "<Weird> Title", "x>y", "Ends with >"]
    text = pairwise_instruction(history, "C <3 > D", "E", DOMAINS["movie"])
    assert parse_title_tags(text) == history + ["C <3 > D", "E"]
    assert parse_title_tags(pairwise_completion("C <3 > D", "E")) == ["C <3 > D", "E"]


def test_tags_in_text_without_tags_or_with_a_closing_bracket_at_the_end():
    assert parse_title_tags("no tags here") == []
    assert parse_title_tags("<Title:Heat (1995)>") == ["Heat (1995)"]


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Tarzan ", "Tarzan"),
        ("Tarzan (1999)", "Tarzan"),
        ("Sound of Music, The (1965)", "Sound of Music"),
        ("Sound of Music", "Sound of Music"),
        ("Bug's Life, A (1998)", "Bug's Life"),
        ("American Tail, An (1986)", "American Tail"),
        ("Postino, Il (The Postman) (1994)", "Postino"),
        ("Seven (Se7en) (1995)", "Seven"),
        ("Thelma &amp; Louise (1991)", "Thelma & Louise"),
        ("  Star   Wars:  Episode IV ", "Star Wars: Episode IV"),
        # parentheses go only with a year: Amazon titles keep theirs
        (
            "Hollow Man / Hollow Man 2 (Double Feature)",
            "Hollow Man / Hollow Man 2 (Double Feature)",
        ),
        ("Criminal 2016", "Criminal 2016"),
        # an article in the middle of a title stays
        ("Good, The Bad and The Ugly, The (1966)", "Good, The Bad and The Ugly"),
        ("(500) Days of Summer (2009)", "(500) Days of Summer"),
    ],
)
def test_normalize_title(raw, normalised):
    assert normalize_title(raw) == normalised


def test_item_key_is_case_insensitive_normalised_title():
    assert item_key("Tarzan ") == item_key("TARZAN (1999)") == "tarzan"
    assert item_key("Sound of Music") == item_key("Sound of Music, The (1965)")
    assert item_key("Heat (1995)") != item_key("Tarzan (1999)")


def test_history_user_key_is_stable_short_and_unambiguous():
    key = history_user_key(("A", "B"))
    assert key == history_user_key(["A", "B"]) and len(key) == 12
    assert int(key, 16) >= 0  # hex
    assert key != history_user_key(("B", "A"))
    assert history_user_key(("a::b",)) != history_user_key(("a", "b"))


def _ml1m_titles(path):
    titles = set()
    for record in json.loads(path.read_text()):
        titles.update(parse_title_tags(record["instruction"]))
    return titles


def test_normalisation_removes_most_of_the_ml1m_train_eval_drift(shared_data):
    dmpo = shared_data / "dmpo"
    train = set().union(
        *(_ml1m_titles(p) for p in dmpo.glob("rec_data_ml_1m_*.json") if "eval" not in p.name)
    )
    evaluation = _ml1m_titles(dmpo / "rec_data_ml_1m_eval_ranking.json")
    assert len(train) == 1031 and len(evaluation) == 2029
    assert not train & evaluation  # verbatim, no training title appears in eval
    eval_keys = {item_key(t) for t in evaluation}
    matched = {t for t in train if item_key(t) in eval_keys}
    assert len(matched) == 923
    # what stays unmatched was cut at its first comma upstream, e.g. "Girl, Interrupted"
    assert "Girl" in train - matched
