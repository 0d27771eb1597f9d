"""Readers and writers on every shipped file, conversions across formats, TRL export."""

from __future__ import annotations

import json
import random

import pytest

from prefrec.data.dmpo import read_dmpo, write_dmpo
from prefrec.data.formats import (
    detect_format,
    load_examples,
    pairwise_to_selection,
    save_examples,
    selection_to_pairwise,
    write_trl_jsonl,
)
from prefrec.data.prompts import (
    DOMAINS,
    pairwise_completion,
    pairwise_instruction,
    selection_instruction,
)
from prefrec.data.schema import PairwiseExample, group_pairs_by_user
from prefrec.data.sdpo import read_sdpo, write_sdpo
from prefrec.data.titles import history_user_key
from prefrec.errors import DataError

DATASETS = {"data_ml_1m": "movie", "Amazon_Movie": "amazon_movie", "Amazon_Game": "amazon_game"}
SPLITS = ["sft_ranking", "eval_ranking"] + [f"dpo_ranking_{k}" for k in range(1, 6)]
DMPO_FILES = [f"rec_{d}_{s}.json" for d in DATASETS for s in SPLITS]


def expected_count(name: str) -> int:
    if "sft" in name:
        return 100
    if "eval" in name:
        return 1000
    k = int(name.removesuffix(".json").rsplit("_", 1)[1])
    # Amazon dpo_ranking_1 holds 200 other users (DESIGN.md)
    return 200 if k == 1 and "Amazon" in name else 100 * k


@pytest.fixture(scope="module")
def lastfm(shared_data):
    return read_sdpo(shared_data / "sdpo-lastfm" / "lastfm-val.json")


@pytest.mark.parametrize("name", DMPO_FILES)
def test_dmpo_file_reads_and_round_trips_byte_for_byte(shared_data, tmp_path, name):
    path = shared_data / "dmpo" / name
    examples = read_dmpo(path)
    assert len(examples) == expected_count(name)
    domain = DOMAINS[next(v for k, v in DATASETS.items() if k in name)]
    for ex in examples[:50]:
        # the parse is complete: the prompt rebuilds from history and candidates
        assert pairwise_instruction(ex.history, *ex.candidates, domain) == ex.prompt
        assert ex.chosen == pairwise_completion(ex.positive_title, ex.negative_title)
        assert ex.rejected == pairwise_completion(ex.negative_title, ex.positive_title)
        assert ex.user == history_user_key(ex.history)
    out = tmp_path / name
    write_dmpo(examples, out)
    assert out.read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    ("name", "output_type"),
    [
        ("rec_data_ml_1m_sft_ranking.json", "str"),
        ("rec_data_ml_1m_eval_ranking.json", "str"),
        ("rec_Amazon_Movie_eval_ranking.json", "list"),
        ("rec_Amazon_Game_dpo_ranking_2.json", "list"),
    ],
)
def test_output_type_is_kept_and_string_outputs_get_the_reverse_ordering(
    shared_data, name, output_type
):
    path = shared_data / "dmpo" / name
    records = json.loads(path.read_text())
    ex = read_dmpo(path)[7]
    assert ex.meta["output_type"] == output_type
    assert (ex.meta["source"], ex.meta["index"], ex.meta["input"]) == (str(path), 7, "")
    output = records[7]["output"]
    assert ex.chosen == (output if output_type == "str" else output[0])
    # the released string output is the positive-first ordering
    assert ex.chosen.index(ex.positive_title) < ex.chosen.index(ex.negative_title)
    assert ex.rejected.index(ex.negative_title) < ex.rejected.index(ex.positive_title)


def test_first_ml1m_sft_record_parsed_by_hand(shared_data):
    ex = read_dmpo(shared_data / "dmpo" / "rec_data_ml_1m_sft_ranking.json")[0]
    assert ex.history[:3] == (
        "Miracle on 34th Street ",
        "Ferris Bueller's Day Off ",
        "Sound of Music",
    )
    assert ex.candidates == ("Tarzan ", "Gigi ")
    assert ex.positive == 1 and ex.positive_title == "Gigi "
    assert ex.chosen == " <Title:Gigi > ,  <Title:Tarzan > "
    assert ex.rejected == " <Title:Tarzan > ,  <Title:Gigi > "


def test_output_format_override_and_examples_without_meta(tmp_path):
    ex = PairwiseExample(
        history=("A", "B"),
        candidates=("C", "D"),
        positive=1,
        prompt=pairwise_instruction(("A", "B"), "C", "D", DOMAINS["movie"]),
        chosen=pairwise_completion("D", "C"),
        rejected=pairwise_completion("C", "D"),
    )
    write_dmpo([ex], tmp_path / "list.json")
    write_dmpo([ex], tmp_path / "str.json", output_format="str")
    assert json.loads((tmp_path / "list.json").read_text()) == [
        {"instruction": ex.prompt, "input": "", "output": [ex.chosen, ex.rejected]}
    ]
    assert json.loads((tmp_path / "str.json").read_text())[0]["output"] == ex.chosen
    for name in ("list.json", "str.json"):
        (back,) = read_dmpo(tmp_path / name)
        assert back == PairwiseExample(
            ex.history,
            ex.candidates,
            1,
            ex.prompt,
            ex.chosen,
            ex.rejected,
            history_user_key(("A", "B")),
        )
    with pytest.raises(ValueError, match="unknown DMPO output format"):
        write_dmpo([ex], tmp_path / "x.json", output_format="csv")


def test_extra_fields_and_field_order_round_trip(tmp_path):
    prompt = pairwise_instruction(["A"], "B", "C", DOMAINS["movie"])
    records = [
        {"output": pairwise_completion("B", "C"), "instruction": prompt, "id": 3},
        {
            "instruction": prompt,
            "output": [pairwise_completion("C", "B"), pairwise_completion("B", "C")],
            "history": "x",
        },
    ]
    src = tmp_path / "in.json"
    src.write_text(json.dumps(records))
    write_dmpo(read_dmpo(src), tmp_path / "out.json")
    assert (tmp_path / "out.json").read_bytes() == src.read_bytes()


def test_dpo_ranking_3_regroups_into_100_users_with_3_negatives(shared_data):
    for dataset in DATASETS:
        pairs = read_dmpo(shared_data / "dmpo" / f"rec_{dataset}_dpo_ranking_3.json")
        groups = group_pairs_by_user(pairs)
        assert len(groups) == 100 and all(g.k == 3 for g in groups)
        by_user: dict[str, set[str]] = {}
        for p in pairs:
            by_user.setdefault(p.user, set()).add(p.positive_title)
        assert all(len(positives) == 1 for positives in by_user.values())
        # every negative is scored under its own prompt; the chosen under the first row's
        first_rows = {g.user: [p for p in pairs if p.user == g.user] for g in groups[:3]}
        for g in groups[:3]:
            rows = first_rows[g.user]
            assert g.rejected_prompts == tuple(r.prompt for r in rows)
            assert g.chosen == rows[0].chosen


def test_lastfm_reads_and_round_trips_byte_for_byte(shared_data, tmp_path, lastfm):
    path = shared_data / "sdpo-lastfm" / "lastfm-val.json"
    assert len(lastfm) == 2767
    first = lastfm[0]
    assert first.history == ("Boris", "Fever Ray", "Fennesz")
    assert len(first.candidates) == 20 and first.candidates[1] == "\u00b5-Ziq"
    assert first.target == "I Set My Friends On Fire" and first.target_index == 4
    assert first.prompt == selection_instruction(first.history, first.candidates)
    assert first.user == history_user_key(first.history)
    write_sdpo(lastfm, tmp_path / "lastfm.json")
    assert (tmp_path / "lastfm.json").read_bytes() == path.read_bytes()


def test_sdpo_history_as_list_round_trips(tmp_path):
    src = tmp_path / "s.json"
    src.write_text(
        json.dumps(
            [{"historyList": ["a", "b"], "itemList": ["x", "y"], "trueSelection": "y", "k": 1}],
            indent=4,
        )
    )
    (ex,) = read_sdpo(src)
    assert ex.history == ("a", "b") and ex.target_index == 1
    write_sdpo([ex], tmp_path / "out.json")
    assert (tmp_path / "out.json").read_bytes() == src.read_bytes()


def test_detect_and_load_every_format(shared_data, tmp_path, lastfm):
    dmpo = shared_data / "dmpo" / "rec_Amazon_Game_sft_ranking.json"
    sdpo = shared_data / "sdpo-lastfm" / "lastfm-val.json"
    assert detect_format(dmpo) == "dmpo" and detect_format(sdpo) == "sdpo"
    pairs = load_examples(dmpo)
    assert pairs == read_dmpo(dmpo)
    assert load_examples(sdpo)[5] == lastfm[5]
    trl = tmp_path / "pairs.jsonl"
    assert write_trl_jsonl(pairs, trl) == 100
    assert detect_format(trl) == "trl"
    back = load_examples(trl)
    # TRL rows keep prompt and both completions, so the pairwise examples come back equal
    assert back == pairs
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="no records: a dataset needs at least one"):
        load_examples(tmp_path / "empty.json")


def test_trl_export_row_counts(shared_data, tmp_path, lastfm):
    pairs = read_dmpo(shared_data / "dmpo" / "rec_data_ml_1m_dpo_ranking_3.json")
    assert write_trl_jsonl(pairs, tmp_path / "p.jsonl") == 300
    assert write_trl_jsonl(lastfm[:10], tmp_path / "s.jsonl") == 10 * 19
    assert write_trl_jsonl(lastfm[:10], tmp_path / "s3.jsonl", k=3) == 30
    rows = [json.loads(line) for line in (tmp_path / "s3.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert rows[0]["chosen"] == lastfm[0].target
    assert rows[0]["rejected"] == lastfm[0].candidates[0]  # first non-target candidate


def test_selection_to_pairwise_pairs_target_with_each_other_candidate(lastfm):
    pairs = selection_to_pairwise(lastfm[:50], random.Random(0))
    assert len(pairs) == 50 * 19
    assert all(p.positive_title == lastfm[0].target for p in pairs[:19])
    assert {p.negative_title for p in pairs[:19]} == set(lastfm[0].candidates) - {lastfm[0].target}
    first_share = sum(p.positive_listed_first for p in pairs) / len(pairs)
    assert 0.4 < first_share < 0.6  # a fair coin, not a fixed position
    assert selection_to_pairwise(lastfm[:50], random.Random(0)) == pairs  # seeded
    groups = group_pairs_by_user(pairs)
    assert len(groups) == 50 and all(g.k == 19 for g in groups)
    # the pairs parse back as DMPO pairs
    assert pairs[0].prompt == pairwise_instruction(
        pairs[0].history, *pairs[0].candidates, DOMAINS["music"]
    )


def test_pairwise_to_selection_uses_the_shared_positive(shared_data):
    pairs = read_dmpo(shared_data / "dmpo" / "rec_data_ml_1m_dpo_ranking_3.json")
    selections = pairwise_to_selection(pairs)
    assert len(selections) == 100
    first = selections[0]
    rows = [p for p in pairs if p.user == first.user]
    assert first.candidates == (rows[0].positive_title,) + tuple(r.negative_title for r in rows)
    assert first.target_index == 0 and first.history == rows[0].history
    shuffled = pairwise_to_selection(pairs, random.Random(1))
    assert sorted(shuffled[0].candidates) == sorted(first.candidates)


def test_any_file_can_be_saved_in_every_format(shared_data, tmp_path, lastfm):
    pairs = read_dmpo(shared_data / "dmpo" / "rec_data_ml_1m_dpo_ranking_2.json")
    save_examples(pairs, tmp_path / "p.json", "sdpo")
    selections = read_sdpo(tmp_path / "p.json")
    assert len(selections) == 100 and all(len(s.candidates) == 3 for s in selections)
    save_examples(lastfm[:20], tmp_path / "s.json", "dmpo")
    assert len(read_dmpo(tmp_path / "s.json")) == 20 * 19
    save_examples(lastfm[:20], tmp_path / "s.jsonl", "trl")
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 20 * 19
    save_examples(pairs, tmp_path / "same.json", "dmpo")
    assert (tmp_path / "same.json").read_bytes() == (
        shared_data / "dmpo" / "rec_data_ml_1m_dpo_ranking_2.json"
    ).read_bytes()


def test_swap_candidate_order_is_an_involution_that_keeps_the_answer(shared_data):
    from prefrec.data.dmpo import swap_candidate_order, with_both_orders
    from prefrec.data.schema import group_pairs_by_user

    rows = read_dmpo(shared_data / "dmpo" / "rec_data_ml_1m_dpo_ranking_3.json")
    ex = rows[0]
    sw = swap_candidate_order(ex)
    assert sw.candidates == ex.candidates[::-1] and sw.positive_title == ex.positive_title
    assert (sw.chosen, sw.rejected, sw.history) == (ex.chosen, ex.rejected, ex.history)
    head = ex.prompt.rsplit("Rank the likelihood", 1)[0]
    assert sw.prompt.startswith(head) and sw.prompt != ex.prompt
    assert sw.prompt.index(ex.candidates[1]) < sw.prompt.rindex(ex.candidates[0])
    assert swap_candidate_order(sw) == ex
    both = with_both_orders(rows)
    assert len(both) == 2 * len(rows)
    groups = group_pairs_by_user(both)
    assert len(groups) == 2 * len(group_pairs_by_user(rows)) and {g.k for g in groups} == {3}


def test_convert_normalize_titles_removes_the_ml1m_year_drift(shared_data, tmp_path, capsys):
    from prefrec.cli import main

    out = tmp_path / "eval.json"
    assert main(["data", "convert", "ml1m-eval", "--to", "dmpo", "-o", str(out),
                 "--normalize-titles"]) == 0
    rows = read_dmpo(out)
    original = read_dmpo(shared_data / "dmpo" / "rec_data_ml_1m_eval_ranking.json")
    assert len(rows) == len(original)
    assert rows[0].candidates == ("Bringing Up Baby", "Bug's Life")
    assert rows[0].positive_title == "Bug's Life" and "(1998)" not in rows[0].prompt
    assert [r.positive for r in rows] == [r.positive for r in original]
    assert main(["data", "convert", "lastfm", "--to", "sdpo", "-o", str(tmp_path / "l.json"),
                 "--normalize-titles"]) == 2
    assert "--normalize-titles applies to pairwise (DMPO) data only" in capsys.readouterr().err
