"""Write the bad-input corpus: ``python tests/bad_inputs/make_corpus.py``.

The corpus is committed (``tests/test_bad_input_corpus.py`` runs every file through every
entry point that reads such files, and checks that the committed files are what this
script writes). Each case is a file plus the fragment its one-line error must contain;
``cases.json`` lists them by group:

- ``data/``: example files every data reader must refuse (exit 2);
- ``requests/``: ``prefrec rank --input`` files that must be refused;
- ``configs/``: run configs that ``prefrec run`` and ``prefrec study`` must refuse;
- ``studies/``: study files ``prefrec study`` must refuse;
- ``baselines/``: ``prefrec baselines --config`` files that must be refused;
- ``accepted/``: odd but valid files (byte-order marks) that must read;
- ``flagged/``: files that read, but whose audit must report a finding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

PROMPT = (
    "You are an assistant working on movie recommendations. Here is the user's history of "
    "movies they have watched:  <Title:Heat (1995)> ,  <Title:Big (1988)> . Rank the "
    "likelihood of the user watching the two movies  <Title:Tarzan (1999)>  and  "
    "<Title:Gigi (1958)> ."
)
CHOSEN = " <Title:Gigi (1958)> ,  <Title:Tarzan (1999)> "
REJECTED = " <Title:Tarzan (1999)> ,  <Title:Gigi (1958)> "
GOOD = {"instruction": PROMPT, "input": "", "output": CHOSEN}
GOOD_LIST = {"instruction": PROMPT, "input": "", "output": [CHOSEN, REJECTED]}
GOOD_SDPO = {"historyList": "A::B::C", "itemList": ["X", "Y", "Z"], "trueSelection": "Y"}
GOOD_TRL = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
GOOD_REQUEST = {"history": ["Heat (1995)"], "candidates": ["Big (1988)", "Gigi (1958)"]}
DEEP = 100_000  # the nesting the report used
LONG_TITLE = "Title " * 16_666 + "Long"  # 100,000 characters
LONG_CANDIDATE = "Title " * 2_000  # past the tiny test model's 1024-token context alone

RUN_CONFIG = {
    "name": "corpus",
    "model": "smollm2-135m",
    "experiments": [{"name": "ml1m", "sft": "ml1m-sft", "eval": "ml1m-eval"}],
    "eval": {"limit": 10},
}


def dumps(records: object) -> bytes:
    return json.dumps(records).encode()


def jsonl(*rows: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def with_(base: dict, **changes: object) -> dict:
    """``base`` with fields changed; a value of ``...`` removes the field."""
    out = {k: v for k, v in base.items() if changes.get(k, None) is not ...}
    out.update({k: v for k, v in changes.items() if v is not ...})
    return out


def yaml_text(config: dict, **changes: object) -> bytes:
    import yaml

    return yaml.safe_dump({**config, **changes}, sort_keys=False).encode()


# (file, content, fragment of the expected one-line error)
DATA = [
    ("deep_nesting.json", b"[" * DEEP + b"]" * DEEP,
     "record 0: nested deeper than Python's JSON decoder allows"),
    ("deep_nesting_in_field.json",
     dumps([GOOD, with_(GOOD, notes=json.loads("[" * 200 + "]" * 200))]),
     "record 1: field 'notes': nested deeper than 64 levels"),
    ("empty_list.json", b"[]", "no records: a dataset needs at least one"),
    ("empty_file.json", b"", "file is empty; expected a JSON list of records"),
    ("whitespace_only.json", b" \n\t\n", "file is empty; expected a JSON list of records"),
    ("blank_lines_only.jsonl", b"\n\n  \n", "no records: a dataset needs at least one"),
    ("truncated.json", dumps([GOOD, GOOD_LIST])[:-40],
     "(the file ends there: truncated?)"),
    ("truncated_row.jsonl", jsonl(GOOD_TRL) + json.dumps(GOOD_TRL).encode()[:50],
     "record 1: invalid JSON at column 12: Unterminated string starting at (the line ends "
     "there: truncated?)"),
    ("not_json.json", b"instruction: hello", "invalid JSON at line 1 column 1 (char 0)"),
    ("non_utf8.json", dumps([GOOD, with_(GOOD, input="caf\u00e9")])
     .replace(b"\\u00e9", b"\xe9"), "record 1: field 'input': not valid UTF-8: byte 0xe9"),
    ("utf16.json", json.dumps([GOOD]).encode("utf-16"),
     "not valid UTF-8: byte 0xff at byte offset 0"),
    ("nan.json", dumps([GOOD, GOOD_LIST])[:-1] + b', {"instruction": "x", "score": NaN}]',
     "record 2: field 'score': NaN is not valid JSON"),
    ("infinity.jsonl", jsonl(GOOD_TRL) + b'{"prompt": Infinity}\n',
     "record 1: field 'prompt': Infinity is not valid JSON"),
    ("lone_surrogate.json", dumps([with_(GOOD, input="\ud800")]),
     "record 0: field 'input': a string holds the lone surrogate \\ud800"),
    ("huge_integer.json", dumps([GOOD])[:-2] + b', "score": ' + b"9" * 5000 + b"}]",
     "record 0: a number too long to read (Exceeds the limit (4300 digits)"),
    ("top_level_object.json", dumps(GOOD), "expected a JSON list of records, got an object"),
    ("record_not_object.json", dumps([GOOD, "just a string"]),
     "record 1: expected an object, got a string"),
    ("unrecognised_fields.json", dumps([{"question": "?", "answer": "!"}]),
     "record 0: unrecognised fields ['answer', 'question']"),
    ("missing_output.json", dumps([GOOD, GOOD, with_(GOOD, output=...)]),
     "record 2: field 'output': missing field"),
    ("instruction_a_number.json", dumps([with_(GOOD, instruction=7)]),
     "record 0: field 'instruction': expected a string, got a number"),
    ("output_list_with_a_number.json", dumps([with_(GOOD_LIST, output=[CHOSEN, 3])]),
     "record 0: field 'output[1]': expected a string, got a number"),
    ("output_null.json", dumps([with_(GOOD, output=None)]),
     "record 0: field 'output': expected a string or a list of two strings, got null"),
    ("same_candidate_twice.json",
     dumps([with_(GOOD, instruction=PROMPT.replace("Tarzan (1999)", "Gigi (1958)"))]),
     "record 0: field 'instruction': the two candidates are the same title"),
    ("output_names_another_title.json",
     dumps([with_(GOOD, output=" <Title:Gigi (1958)> ,  <Title:Heat (1995)> ")]),
     "record 0: field 'output': candidate not in prompt: 'Heat (1995)'"),
    ("mixed_formats.json", dumps([GOOD, GOOD_SDPO]),
     "record 1: field 'instruction': missing field"),
    ("sdpo_missing_itemlist.json", dumps([GOOD_SDPO, with_(GOOD_SDPO, itemList=...)]),
     "record 1: field 'itemList': missing field"),
    ("sdpo_duplicate_candidates.json",
     dumps([with_(GOOD_SDPO, itemList=["X", "Y", "X"])]),
     "record 0: field 'itemList': duplicate candidate 'X' at position 2"),
    ("sdpo_empty_candidates.json", dumps([with_(GOOD_SDPO, itemList=[])]),
     "record 0: field 'itemList': expected at least two candidates, got 0"),
    ("sdpo_empty_candidate_title.json", dumps([with_(GOOD_SDPO, itemList=["X", "", "Y"])]),
     "record 0: field 'itemList[1]': empty title"),
    ("empty_candidate_tag.json",
     dumps([with_(GOOD, instruction=PROMPT.replace("Tarzan (1999)", ""))]),
     "record 0: field 'instruction': empty candidate title"),
    ("sdpo_history_a_number.json", dumps([with_(GOOD_SDPO, historyList=5)]),
     "record 0: field 'historyList': expected a '::'-joined string or a list, got a number"),
    ("sdpo_empty_history.json", dumps([with_(GOOD_SDPO, historyList="")]),
     "record 0: field 'historyList': empty history"),
    ("sdpo_target_not_a_candidate.json", dumps([with_(GOOD_SDPO, trueSelection="Q")]),
     "record 0: field 'trueSelection': 'Q' is not one of the itemList candidates"),
    ("trl_not_a_pairwise_prompt.jsonl", jsonl(with_(GOOD_TRL, prompt="rank these")),
     "record 0: field 'prompt'"),
]

REQUESTS = [
    ("empty.jsonl", b"", "no records: a dataset needs at least one"),
    ("not_an_object.jsonl", jsonl(GOOD_REQUEST, ["A", "B"]), "record 1: expected a JSON object"),
    ("duplicate_candidates.jsonl", jsonl(with_(GOOD_REQUEST, candidates=["A", "B", "A"])),
     "record 0: field 'candidates': duplicate candidate 'A' (positions 0 and 2)"),
    ("empty_candidates.jsonl", jsonl(with_(GOOD_REQUEST, candidates=[])),
     "record 0: field 'candidates': empty list"),
    ("empty_title.jsonl", jsonl(with_(GOOD_REQUEST, candidates=["A", " "])),
     "record 0: field 'candidates[1]': empty title"),
    ("long_title.jsonl", jsonl(with_(GOOD_REQUEST, candidates=["A", LONG_TITLE])),
     "record 0: field 'candidates[1]': title of 100000 characters, more than the limit 300"),
    ("candidates_a_string.jsonl", jsonl(with_(GOOD_REQUEST, candidates="A, B")),
     "record 0: field 'candidates': expected a list of titles, got str"),
    ("deep_nesting.jsonl", jsonl(GOOD_REQUEST) + b"[" * 10_000 + b"]" * 10_000 + b"\n",
     "record 1: nested deeper than Python's JSON decoder allows"),
    ("nan.jsonl", b'{"history": [NaN], "candidates": ["A"]}\n',
     "record 0: field 'history': NaN is not valid JSON"),
    ("non_utf8.jsonl", jsonl(GOOD_REQUEST) + b'{"history": ["caf\xe9"], "candidates": ["A"]}\n',
     "record 1: not valid UTF-8: byte 0xe9"),
    ("huge_integer.jsonl", b'{"history": ["A"], "candidates": ["B"], "task": ' + b"9" * 5000
     + b"}\n", "record 0: a number too long to read"),
    ("unknown_field.jsonl", jsonl(with_(GOOD_REQUEST, user=3)),
     "record 0: field 'user': unknown field"),
]

CONFIGS = [
    ("eval_limit_a_word.yaml", yaml_text(RUN_CONFIG, eval={"limit": "sixty"}),
     "eval.limit: expected an integer or null, got 'sixty'"),
    ("unknown_top_level_key.yaml", yaml_text(RUN_CONFIG, evaluation={}),
     "unknown key(s) evaluation in the top level"),
    ("unknown_sft_key.yaml", yaml_text(RUN_CONFIG, sft={"lerning_rate": 1}),
     "unknown key(s) lerning_rate in sft"),
    ("lr_without_a_dot.yaml", b"name: c\nexperiments: [{name: a, eval: e}]\nsft: {lr: 5e-5}\n",
     "sft.lr: expected a number (YAML reads a number without a dot"),
    ("sft_true.yaml", yaml_text(RUN_CONFIG, sft=True),
     "sft: expected a mapping or null or false, got true"),
    ("epochs_a_list.yaml", yaml_text(RUN_CONFIG, align={"epochs": [1, 2]}),
     "align.epochs: expected a number, got [1, 2]"),
    ("unknown_loss.yaml", yaml_text(RUN_CONFIG, align={"losses": ["ipo"]}),
     "align.losses has ['ipo']"),
    ("zero_negatives.yaml", yaml_text(RUN_CONFIG, align={"negatives": [0, 3]}),
     "align.negatives: expected K >= 1 negatives, got [0, 3]"),
    ("zero_shot_a_string.yaml", yaml_text(RUN_CONFIG, zero_shot="yes"),
     "zero_shot: expected true or false, got 'yes'"),
    ("unknown_template.yaml", yaml_text(RUN_CONFIG, template="chatml"),
     "template: expected one of alpaca, chat, plain, got 'chatml'"),
    ("experiments_a_string.yaml", yaml_text(RUN_CONFIG, experiments="ml1m"),
     "experiments: expected a list, got 'ml1m'"),
    ("experiment_name_a_number.yaml", yaml_text(RUN_CONFIG, experiments=[{"name": 3, "eval": "e"}]),
     "experiments[0].name: expected a string, got 3"),
    ("split_fraction_a_word.yaml",
     yaml_text(RUN_CONFIG, experiments=[{"name": "a", "split": {"source": "lastfm",
                                                               "eval_fraction": "half"}}]),
     "experiments[0].split.eval_fraction: expected a number, got 'half'"),
    ("baselines_config_wrong_type.yaml",
     yaml_text(RUN_CONFIG, baselines={"methods": ["popularity"], "config": {"bpr": {"dim": "big"}}}),
     "baselines config: bpr.dim: expected an integer, got 'big'"),
    ("top_level_a_list.yaml", b"- name\n- out\n", "expected a mapping at the top level"),
    ("invalid_yaml.yaml", b"name: [unclosed\n", "not valid YAML"),
    ("non_utf8.yaml", b"name: caf\xe9\n", "not valid UTF-8 (byte offset 9)"),
    ("deep_nesting.yaml", b"name: " + b"[" * 20_000 + b"]" * 20_000 + b"\n",
     "not valid YAML (nested too deeply)"),
]

STUDIES = [
    ("unknown_key.yaml", b"base: run.yaml\nout: o\nvariants: {default: []}\nvariant: {}\n",
     "unknown key(s) variant in the top level"),
    ("variant_not_a_list.yaml", b"base: run.yaml\nout: o\nvariants: {default: 'eval.limit=1'}\n",
     "variants.default must be a list of key=value strings"),
    ("variant_override_wrong_type.yaml",
     b"base: tests/bad_inputs/accepted/run.yaml\nout: o\n"
     b"variants: {default: [], lr: ['align.lr=fast']}\n",
     "variant lr: tests/bad_inputs/accepted/run.yaml: align.lr (set by override align.lr=fast): "
     "expected a number, got 'fast'"),
    ("overrides_a_string.yaml", b"base: run.yaml\nout: o\noverrides: eval.limit=3\n"
     b"variants: {default: []}\n", "overrides: expected a list of strings, got 'eval.limit=3'"),
]

BASELINES = [
    ("unknown_section.yaml", b"knn: {neighbours: 5}\n", "baselines config: unknown section 'knn'"),
    ("wrong_type.yaml", b"bpr: {dim: big}\n", "baselines config: bpr.dim: expected an integer"),
    ("invalid_yaml.yaml", b"bpr: {dim: 3\n", "not valid YAML"),
    ("fraction_out_of_range.yaml", b"validation_fraction: 2\n", "validation_fraction 2"),
]

ACCEPTED = [
    ("bom.json", b"\xef\xbb\xbf" + dumps([GOOD, GOOD_LIST]), ""),
    ("bom.jsonl", b"\xef\xbb\xbf" + jsonl(GOOD_TRL, GOOD_TRL), ""),
    ("run.yaml", yaml_text(RUN_CONFIG), ""),
]

FLAGGED = [
    ("long_title.json",
     dumps([GOOD, with_(GOOD, instruction=PROMPT.replace("Heat (1995)", LONG_TITLE))]),
     "1 titles of long_title.json are longer than 300 characters (the server's limit); the "
     "longest has 100000 characters"),
    ("long_history.jsonl",
     jsonl({"historyList": "::".join(f"Song {i}" for i in range(1437)),
            "itemList": ["X", "Y"], "trueSelection": "X"}),
     "long_history.jsonl: 1 of 1 records are longer than the model's context of 1024 tokens"),
    ("long_candidate.json",
     dumps([GOOD, with_(GOOD, instruction=PROMPT.replace("Tarzan (1999)", LONG_CANDIDATE),
                        output=CHOSEN.replace("Tarzan (1999)", LONG_CANDIDATE))]),
     "long_candidate.json: 1 records cannot be trained or scored: a completion of"),
]

GROUPS = {"data": DATA, "requests": REQUESTS, "configs": CONFIGS, "studies": STUDIES,
          "baselines": BASELINES, "accepted": ACCEPTED, "flagged": FLAGGED}


def corpus() -> dict[str, bytes]:
    """Relative path -> content of every file, ``cases.json`` included."""
    files = {f"{group}/{name}": content for group, cases in GROUPS.items()
             for name, content, _ in cases}
    manifest = {group: {name: message for name, _, message in cases}
                for group, cases in GROUPS.items()}
    files["cases.json"] = (json.dumps(manifest, indent=1, ensure_ascii=True) + "\n").encode()
    return files


def main() -> int:
    for rel, content in corpus().items():
        path = HERE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    print(f"wrote {len(corpus()) - 1} files under {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
