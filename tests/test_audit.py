"""Data audit: per-file statistics, defects, train/eval leaks and title drift."""

from __future__ import annotations

import json

import pytest

from prefrec.data.audit import audit, is_eval_name
from prefrec.data.dmpo import read_dmpo
from prefrec.data.prompts import DOMAINS, pairwise_completion, pairwise_instruction
from prefrec.data.schema import PairwiseExample, SelectionExample

MOVIE = DOMAINS["movie"]


def pair(history, positive, negative, positive_first=True, user="") -> PairwiseExample:
    first, second = (positive, negative) if positive_first else (negative, positive)
    return PairwiseExample(
        history=tuple(history),
        candidates=(first, second),
        positive=0 if positive_first else 1,
        prompt=pairwise_instruction(history, first, second, MOVIE),
        chosen=pairwise_completion(positive, negative),
        rejected=pairwise_completion(negative, positive),
        user=user,
    )


def selection(history, candidates, target, user="") -> SelectionExample:
    prompt = "history: " + ", ".join(history) + " candidates: " + ", ".join(candidates)
    return SelectionExample(tuple(history), tuple(candidates), target, prompt, user)


def load(shared_data, prefix: str) -> dict[str, list[PairwiseExample]]:
    paths = sorted((shared_data / "dmpo").glob(f"{prefix}_*.json"))
    return {p.stem: read_dmpo(p) for p in paths}


# --------------------------------------------------------------------------- shipped files


def test_amazon_game_reports_the_15_leaked_eval_histories(shared_data):
    report = audit(load(shared_data, "rec_Amazon_Game"))
    eval_name = "rec_Amazon_Game_eval_ranking"
    assert report.leaked_histories == {eval_name: 15}
    overlaps = {o.train: o.shared_histories for o in report.overlaps}
    # dpo_ranking_1 holds 200 other users; the SFT users are the DPO users of k = 2..5.
    assert overlaps == {
        "rec_Amazon_Game_dpo_ranking_1": 0,
        **{f"rec_Amazon_Game_dpo_ranking_{k}": 15 for k in range(2, 6)},
        "rec_Amazon_Game_sft_ranking": 15,
    }
    [error] = report.by_severity("error")
    assert error.message.startswith(
        f"15 of 1000 distinct histories of {eval_name} (15 records) also appear in training files"
    )
    assert not report.by_severity("warning")  # balanced, no duplicates, no drift
    stats = report.datasets[eval_name]
    assert (stats.records, stats.users, stats.duplicates, stats.mismatched) == (1000, 1000, 0, 0)
    assert stats.positive_first_share == pytest.approx(0.48)
    assert report.datasets["rec_Amazon_Game_dpo_ranking_5"].users == 100


def test_ml1m_title_drift_is_flagged(shared_data):
    report = audit(load(shared_data, "rec_data_ml_1m"))
    assert report.leaked_histories == {"rec_data_ml_1m_eval_ranking": 0}
    assert not report.by_severity("error")
    eval_stats = report.datasets["rec_data_ml_1m_eval_ranking"]
    sft_stats = report.datasets["rec_data_ml_1m_sft_ranking"]
    assert eval_stats.year_title_share == 1.0 and sft_stats.year_title_share == 0.0
    assert eval_stats.trailing_space_share == 0.0 and sft_stats.trailing_space_share > 0.7
    drift = [f for f in report.by_severity("warning") if "title format drift" in f.message]
    assert len(drift) == 2  # trailing year and trailing whitespace
    year = next(f for f in drift if "trailing year" in f.message)
    assert year.datasets[0] == "rec_data_ml_1m_eval_ranking"
    assert "rec_data_ml_1m_sft_ranking" in year.datasets and len(year.datasets) == 7
    assert (
        "100.0% of the titles of rec_data_ml_1m_eval_ranking have a trailing year" in year.message
    )


# --------------------------------------------------------------------------- hand-made


def test_statistics_by_hand():
    rows = [
        pair(["a"], "p", "n"),
        pair(["a", "b"], "p", "n", positive_first=False),
        pair(["a", "b", "c"], "p", "m"),
        pair(["a", "b", "c", "d", "e", "f"], "q (1999)", "n ", user="u9"),
    ]
    stats = audit({"train": rows}).datasets["train"]
    assert (stats.history_min, stats.history_median, stats.history_mean, stats.history_max) == (
        1,
        2.5,
        3.0,
        6,
    )
    assert stats.positive_first_share == 0.75
    assert stats.users == 4  # no user key: each history is its own user
    # Distinct titles a-f, p, n, m, "q (1999)", "n ": one with a year, one with a trailing space.
    assert stats.titles == 11
    assert stats.year_title_share == pytest.approx(1 / 11)
    assert stats.trailing_space_share == pytest.approx(1 / 11)
    assert stats.kind == "pairwise" and stats.role == "train"


def test_duplicates_and_mismatches():
    good = pair(["a", "b"], "p", "n")
    swapped = PairwiseExample(
        good.history, good.candidates, good.positive, good.prompt, good.rejected, good.chosen
    )
    foreign = PairwiseExample(
        good.history,
        ("p", "x"),
        0,
        good.prompt,
        pairwise_completion("p", "x"),
        pairwise_completion("x", "p"),
    )
    report = audit({"train": [good, good, swapped, foreign]})
    stats = report.datasets["train"]
    assert stats.duplicates == 1 and stats.duplicate_records == [1]
    assert stats.mismatched == 2 and stats.mismatched_records == [2, 3]
    assert stats.mismatch_examples == [
        "record 2: chosen completion ranks <Title:n> before <Title:p>",
        "record 3: candidate <Title:x> is not in the prompt",
    ]
    severities = sorted((f.severity, f.message.split(" records")[0]) for f in report.findings)
    assert severities == [("error", "2"), ("warning", "1")]


def test_selection_mismatches():
    ok = selection(["h1", "h2"], ["a", "b", "c"], "b")
    missing_target = selection(["h1"], ["a", "b", "c"], "z")
    duplicate_candidate = selection(["h1"], ["a", "a", "c"], "c")
    report = audit({"test": [ok, missing_target, duplicate_candidate]})
    stats = report.datasets["test"]
    assert stats.kind == "selection" and stats.role == "eval"
    assert stats.positive_first_share is None
    assert stats.mismatched_records == [1, 2]
    assert stats.mismatch_examples[0] == "record 1: target 'z' is not among the candidates"


def test_unbalanced_candidate_order_is_a_warning():
    rows = [pair([f"h{i}"], f"p{i}", f"n{i}") for i in range(40)]  # positive always first
    report = audit({"train": rows})
    assert report.datasets["train"].positive_first_pvalue == pytest.approx(2 * 0.5**40)
    [warning] = report.findings
    assert warning.severity == "warning" and "candidate order is unbalanced" in warning.message
    balanced = rows[:20] + [pair([f"g{i}"], "p", "n", positive_first=False) for i in range(20)]
    assert audit({"train": balanced}).findings == []


def test_leaks_by_history_and_by_user():
    train = [pair(["a", "b"], "p", "n", user="u1"), pair(["c"], "p", "n", user="u2")]
    test = [
        pair(["a", "b"], "q", "m", user="u1"),  # same history: a leak
        pair(["d"], "q", "m", user="u2"),  # same user, another history: not split by user
        pair(["e"], "q", "m", user="u3"),
    ]
    report = audit({"sft": train, "test": test})
    assert report.leaked_histories == {"test": 1}
    assert report.leaked_users == {"test": 2}
    messages = [f.message for f in report.by_severity("error")]
    assert messages == [
        "1 of 3 distinct histories of test (1 records) also appear in training files (sft: 1)",
        "1 users of test also appear in training files with other histories "
        "(splits are not by user)",
    ]


def test_drift_without_eval_files_compares_all_files():
    years = [pair(["A (1990)"], "B (1991)", "C (1992)")]
    plain = [pair(["A"], "B", "C")]
    report = audit({"part1": years, "part2": plain})
    [finding] = report.findings
    assert finding.datasets == ["part1", "part2"]
    assert "100.0% of the titles of part1 have a trailing year (YYYY), against part2 0.0%" in (
        finding.message
    )


def test_report_serialises():
    report = audit({"train": [pair(["a"], "p", "n")] * 2, "eval": [pair(["a"], "p", "n")]})
    restored = json.loads(json.dumps(report.to_dict()))
    assert restored["datasets"]["train"]["duplicates"] == 1
    assert restored["leaked_histories"] == {"eval": 1}
    markdown = report.to_markdown()
    assert (
        "| train | train | pairwise | 2 | 1 | 1 / 1 / 1.0 / 1 | 100.0% | 1 | 0 | 3 | 0.0% | 0.0% "
        "| 1 | - |"
        in (markdown)
    )
    assert "| eval | train | 1 | 1 |" in markdown
    assert "- **error** 1 of 1 distinct histories of eval" in markdown
    assert markdown.index("**error**") < markdown.index("**warning**")
    assert "- none" in audit({"train": [pair(["a"], "p", "n")]}).to_markdown()
    assert "- **error** train holds no records" in audit({"train": []}).to_markdown()


def test_eval_names():
    assert is_eval_name("rec_Amazon_Game_eval_ranking") and is_eval_name("lastfm-TEST")
    assert not is_eval_name("rec_Amazon_Game_sft_ranking") and not is_eval_name("valid")


# --------------------------------------------------------------------------- lengths


def test_over_long_titles_are_a_finding_without_a_tokenizer():
    long_title = "T" * 100_000
    report = audit({"train": [pair(["a"], "p", "n"), pair(["a", long_title], "p", "n")]})
    d = report.datasets["train"]
    assert (d.longest_title_chars, d.longest_title_record, d.long_titles) == (100_000, 1, 1)
    [finding] = [f for f in report.findings if "characters" in f.message]
    assert finding.severity == "warning"
    assert "1 titles of train are longer than 300 characters" in finding.message
    assert "the longest has 100000 characters (record 1)" in finding.message
    assert d.longest_tokens is None  # no tokenizer: no token counts


def test_records_past_the_context_and_unfit_ones_with_token_counts(tiny_tokenizer):
    from prefrec.data.lengths import LengthLimit

    short = pair(["a"], "p", "n")
    long_history = pair([f"Movie {i} (1995)" for i in range(200)], "p", "n")
    huge_candidate = pair(["a"], "x" * 3000, "n")
    limit = LengthLimit(tiny_tokenizer, "alpaca", 512)
    report = audit({"train": [short, long_history, huge_candidate]}, limit=limit)
    d = report.datasets["train"]
    assert d.max_tokens == 512 and d.longest_tokens_record in (1, 2)
    assert d.over_limit == 1 and d.over_limit_records == [1]
    assert d.unfit == 1 and d.unfit_records == [2] and d.unfit_tokens > 512
    assert d.longest_title_tokens is not None and d.longest_title_tokens > 300
    messages = {f.severity: f.message for f in report.findings if "tokens" in f.message}
    assert messages["error"].startswith("train: 1 records cannot be trained or scored: a "
                                        f"completion of {d.unfit_tokens} tokens alone fills")
    assert "1 of 3 records are longer than the model's context of 512 tokens" in (
        report.to_markdown())
    assert f"| {d.longest_tokens} / 512 |" in report.to_markdown()


def test_training_states_a_truncation_and_refuses_what_cannot_fit(tiny_tokenizer, caplog):
    from prefrec.data.lengths import LengthLimit, check_examples_fit
    from prefrec.errors import DataError

    limit = LengthLimit(tiny_tokenizer, "alpaca", 256, "max_length")
    fits, long = pair(["a"], "p", "n"), pair([f"M{i}" for i in range(200)], "p", "n")
    with caplog.at_level("WARNING", logger="prefrec.data.lengths"):
        lengths = check_examples_fit([fits, long], limit, "t.json")
    assert lengths.truncated == [1]
    assert "t.json: 1 of 2 records are longer than max_length of 256 tokens" in caplog.text
    with pytest.raises(DataError, match=r"^t\.json: record 1: a completion of \d+ tokens alone "
                       "fills max_length of 256 tokens"):
        check_examples_fit([fits, pair(["a"], "y" * 2000, "n")], limit, "t.json")
