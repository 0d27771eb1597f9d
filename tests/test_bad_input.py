"""Every malformed input raises one DataError naming the file, the record and the field."""

from __future__ import annotations

import json

import pytest

from prefrec.data.dmpo import read_dmpo
from prefrec.data.formats import detect_format, load_examples, pairwise_to_selection
from prefrec.data.prompts import DOMAINS, pairwise_completion, pairwise_instruction
from prefrec.data.schema import SelectionExample
from prefrec.data.sdpo import read_sdpo, write_sdpo
from prefrec.errors import DataError

PROMPT = pairwise_instruction(["Heat (1995)", "Big (1988)"], "Tarzan ", "Gigi ", DOMAINS["movie"])
GOOD = {"instruction": PROMPT, "input": "", "output": pairwise_completion("Gigi ", "Tarzan ")}
GOOD_LIST = {
    "instruction": PROMPT,
    "input": "",
    "output": [pairwise_completion("Tarzan ", "Gigi "), pairwise_completion("Gigi ", "Tarzan ")],
}
GOOD_SDPO = {"historyList": "A::B", "itemList": ["X", "Y", "Z"], "trueSelection": "Y"}


def write(tmp_path, payload, name="bad.json"):
    path = tmp_path / name
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    elif isinstance(payload, str):
        path.write_text(payload)
    else:
        path.write_text(json.dumps(payload))
    return path


def bad_third(record):
    """Two good records, then the bad one: the message must say record 2."""
    return [GOOD, GOOD_LIST, record]


def with_(base, **changes):
    record = dict(base)
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    return record


def instruction(history, candidates_text):
    return (
        "You are an assistant working on movie recommendations. Here is the user's history "
        f"of movies they have watched: {history}. Rank the likelihood of the user watching "
        f"the two movies {candidates_text}."
    )


DMPO_CASES = [
    ("missing instruction", with_(GOOD, instruction=None), "instruction", "missing field"),
    ("missing output", with_(GOOD, output=None), "output", "missing field"),
    (
        "instruction not a string",
        with_(GOOD, instruction=7),
        "instruction",
        "expected a string, got a number",
    ),
    ("input not a string", with_(GOOD, input=["x"]), "input", "expected a string, got an array"),
    (
        "output an object",
        with_(GOOD, output={"a": 1}),
        "output",
        "expected a string or a list of two strings, got an object",
    ),
    (
        "output list of 3",
        with_(GOOD_LIST, output=GOOD_LIST["output"] + ["x"]),
        "output",
        "got a list of 3",
    ),
    (
        "output list of 1",
        with_(GOOD_LIST, output=GOOD_LIST["output"][:1]),
        "output",
        "got a list of 1",
    ),
    (
        "output list with a number",
        with_(GOOD_LIST, output=[GOOD_LIST["output"][0], 3]),
        "output[1]",
        "expected a string, got a number",
    ),
    (
        "empty history",
        with_(GOOD, instruction=instruction("", " <Title:Tarzan >  and  <Title:Gigi > ")),
        "instruction",
        "empty history",
    ),
    (
        "one candidate",
        with_(GOOD, instruction=instruction(" <Title:Heat> ", " <Title:Tarzan > ")),
        "instruction",
        "expected two candidate <Title:...> tags, found 1",
    ),
    (
        "three candidates",
        with_(
            GOOD,
            instruction=instruction(
                " <Title:Heat> ", " <Title:Tarzan >  and  <Title:Gigi >  <Title:Big> "
            ),
        ),
        "instruction",
        "found 3",
    ),
    (
        "same candidate twice",
        with_(
            GOOD, instruction=instruction(" <Title:Heat> ", " <Title:Gigi >  and  <Title:Gigi > ")
        ),
        "instruction",
        "the two candidates are the same title 'Gigi '",
    ),
    (
        "no ranking sentence",
        with_(
            GOOD, instruction="Here is the history  <Title:Heat>  <Title:Tarzan >  <Title:Gigi > ."
        ),
        "instruction",
        "no '. Rank the likelihood of the user' sentence after the history",
    ),
    (
        "string output names another title",
        with_(GOOD, output=pairwise_completion("Gigi ", "Heat (1995)")),
        "output",
        "candidate not in prompt: 'Heat (1995)'",
    ),
    (
        "title differs by its trailing space",
        with_(GOOD, output=pairwise_completion("Gigi", "Tarzan ")),
        "output",
        "candidate not in prompt: 'Gigi'",
    ),
    (
        "list output names another title",
        with_(GOOD_LIST, output=[GOOD_LIST["output"][0], pairwise_completion("Gigi ", "Big")]),
        "output[1]",
        "candidate not in prompt: 'Big'",
    ),
    (
        "output with one tag",
        with_(GOOD, output=" <Title:Gigi > "),
        "output",
        "expected two <Title:...> tags in the completion, found 1",
    ),
    (
        "output names a candidate twice",
        with_(GOOD, output=pairwise_completion("Gigi ", "Gigi ")),
        "output",
        "names 'Gigi ' twice",
    ),
    (
        "dispreferred is not the reverse",
        with_(GOOD_LIST, output=[GOOD_LIST["output"][0], GOOD_LIST["output"][0]]),
        "output[1]",
        "dispreferred completion must rank 'Gigi ' first",
    ),
]


@pytest.mark.parametrize(
    ("record", "field", "message"), [c[1:] for c in DMPO_CASES], ids=[c[0] for c in DMPO_CASES]
)
def test_bad_dmpo_record(tmp_path, record, field, message):
    path = write(tmp_path, bad_third(record))
    with pytest.raises(DataError) as info:
        read_dmpo(path)
    text = str(info.value)
    assert text.startswith(f"{path}: record 2: field '{field}': ")
    assert message in text
    assert "\n" not in text
    assert (info.value.path, info.value.record, info.value.field) == (str(path), 2, field)


def test_good_records_of_the_bad_input_cases_are_good(tmp_path):
    path = write(tmp_path, [GOOD, GOOD_LIST])
    a, b = read_dmpo(path)
    assert a.positive_title == "Gigi " and b.positive_title == "Tarzan "


def test_record_not_an_object(tmp_path):
    path = write(tmp_path, [GOOD, "just a string"])
    with pytest.raises(DataError, match=r"bad\.json: record 1: expected an object, got a string$"):
        read_dmpo(path)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            '[{"instruction": "x", "output": "y"',
            "invalid JSON at line 1 column 36 (char 35): Expecting ',' delimiter (the file ends there: truncated?)",
        ),
        (
            '[{"instruction": "x",\n "output": }]',
            "invalid JSON at line 2 column 12 (char 33): Expecting value",
        ),
        ('{"instruction": "x"}', "expected a JSON list of records, got an object"),
        ("", "file is empty; expected a JSON list of records"),
    ],
    ids=["truncated", "invalid", "top level object", "empty"],
)
def test_bad_json_file(tmp_path, payload, message):
    path = write(tmp_path, payload)
    for reader in (read_dmpo, read_sdpo, load_examples):
        with pytest.raises(DataError) as info:
            reader(path)
        assert str(info.value) == f"{path}: {message}"


def test_non_utf8_bytes_name_the_offset_record_and_field(tmp_path):
    good = json.dumps([GOOD]).encode()[:-1]
    bad = json.dumps({"instruction": PROMPT, "input": "caf\u00e9", "output": GOOD["output"]})
    prefix = good + b", "
    raw = prefix + bad.replace("\\u00e9", "\u00e9").encode("latin-1") + b"]"
    offset = raw.index(b"\xe9")
    path = write(tmp_path, raw)
    with pytest.raises(DataError) as info:
        read_dmpo(path)
    assert str(info.value) == (
        f"{path}: record 1: field 'input': not valid UTF-8: byte 0xe9 at byte offset {offset}"
    )


def test_non_utf8_bytes_in_broken_json_still_name_the_offset(tmp_path):
    path = write(tmp_path, b'[{"a": "\xff')
    with pytest.raises(DataError, match=r"bad\.json: not valid UTF-8: byte 0xff at byte offset 8$"):
        read_sdpo(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: file not found$"):
        load_examples(tmp_path / "nope.json")


SDPO_CASES = [
    ("missing itemList", with_(GOOD_SDPO, itemList=None), "itemList", "missing field"),
    (
        "target not a candidate",
        with_(GOOD_SDPO, trueSelection="Q"),
        "trueSelection",
        "'Q' is not one of the itemList candidates",
    ),
    (
        "duplicate candidate",
        with_(GOOD_SDPO, itemList=["X", "Y", "X"]),
        "itemList",
        "duplicate candidate 'X' at position 2",
    ),
    ("empty history", with_(GOOD_SDPO, historyList=""), "historyList", "empty history"),
    (
        "empty title in history",
        with_(GOOD_SDPO, historyList="A::::B"),
        "historyList",
        "empty title at position 1",
    ),
    (
        "history a number",
        with_(GOOD_SDPO, historyList=5),
        "historyList",
        "expected a '::'-joined string or a list, got a number",
    ),
    (
        "history list of numbers",
        with_(GOOD_SDPO, historyList=["A", 1]),
        "historyList[1]",
        "expected a string, got a number",
    ),
    (
        "itemList a string",
        with_(GOOD_SDPO, itemList="X::Y"),
        "itemList",
        "expected a list of candidate titles, got a string",
    ),
    (
        "one candidate",
        with_(GOOD_SDPO, itemList=["Y"]),
        "itemList",
        "expected at least two candidates, got 1",
    ),
    (
        "candidate a number",
        with_(GOOD_SDPO, itemList=["X", 2]),
        "itemList[1]",
        "expected a string, got a number",
    ),
    (
        "target a list",
        with_(GOOD_SDPO, trueSelection=["Y"]),
        "trueSelection",
        "expected a string, got an array",
    ),
]


@pytest.mark.parametrize(
    ("record", "field", "message"), [c[1:] for c in SDPO_CASES], ids=[c[0] for c in SDPO_CASES]
)
def test_bad_sdpo_record(tmp_path, record, field, message):
    path = write(tmp_path, [GOOD_SDPO, GOOD_SDPO, record])
    with pytest.raises(DataError) as info:
        read_sdpo(path)
    assert str(info.value) == f"{path}: record 2: field '{field}': {message}"
    # the format-detecting entry point reports the same
    with pytest.raises(DataError, match="record 2"):
        load_examples(path)


def test_unrecognised_fields_and_empty_list_cannot_be_detected(tmp_path):
    path = write(tmp_path, [{"question": "?", "answer": "!"}])
    with pytest.raises(DataError, match=r"record 0: unrecognised fields \['answer', 'question'\]"):
        detect_format(path)
    with pytest.raises(DataError, match="no records: a dataset needs at least one"):
        detect_format(write(tmp_path, [], "empty.json"))


def test_bad_trl_rows(tmp_path):
    row = {"prompt": PROMPT, "chosen": GOOD_LIST["output"][0], "rejected": GOOD_LIST["output"][1]}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n" + '{"prompt": "x", "chosen"\n')
    with pytest.raises(DataError, match=r"rows\.jsonl: record 1: invalid JSON at column"):
        load_examples(path)
    path.write_text(json.dumps(row) + "\n" + json.dumps(dict(row, rejected="Gigi ")) + "\n")
    with pytest.raises(
        DataError, match=r"record 1: field 'rejected': expected two <Title:\.\.\.> tags"
    ):
        load_examples(path)
    path.write_text(json.dumps(dict(row, chosen=None)) + "\n")
    with pytest.raises(DataError, match=r"record 0: field 'chosen': expected a string, got null"):
        load_examples(path)


def test_pairs_with_different_positives_cannot_become_one_selection(tmp_path):
    path = write(tmp_path, [GOOD, GOOD_LIST])  # same history, opposite positives
    with pytest.raises(DataError, match=r"record 1: field 'output': user \w+'s rows disagree"):
        pairwise_to_selection(read_dmpo(path))


def test_history_title_with_separator_cannot_be_written(tmp_path):
    ex = SelectionExample(("a::b",), ("x", "y"), "x", "prompt")
    with pytest.raises(DataError, match="contains '::'"):
        write_sdpo([ex], tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()
