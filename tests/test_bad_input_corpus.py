"""The committed bad-input corpus (``tests/bad_inputs/``, written by its ``make_corpus.py``)
through every entry point that reads such files, as a user meets them: exit code 2, one
line on stderr that names the file and says what is wrong, never a traceback.

The CLI runs in-process (``prefrec.cli.main``), which catches only ``PrefrecError``: any
other exception fails the test exactly where it would print a traceback in a shell. Two
cases also run as real processes.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prefrec.cli import main

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "bad_inputs"
CASES: dict[str, dict[str, str]] = json.loads((CORPUS / "cases.json").read_text())
REFUSED = ("data", "requests", "configs", "studies", "baselines")

pytestmark = pytest.mark.usefixtures("single_thread")


def cases(group: str) -> list[tuple[Path, str]]:
    return [(CORPUS / group / name, message) for name, message in CASES[group].items()]


def ids(group: str) -> list[str]:
    return list(CASES[group])


def refused(argv: list[str], capsys) -> str:
    """Run the CLI; assert exit 2 and one error line, the last on stderr (a model load's
    progress bar may come before it); return the line."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert [x for x in lines if x.startswith("prefrec: error: ")] == lines[-1:], captured.err
    assert "Traceback" not in captured.err
    return lines[-1]


# --------------------------------------------------------------------------- the corpus


def test_the_corpus_is_what_make_corpus_writes_and_has_at_least_30_bad_cases():
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.corpus()
    on_disk = {p.relative_to(CORPUS).as_posix(): p.read_bytes()
               for p in CORPUS.rglob("*") if p.is_file() and p.suffix != ".py"}
    assert on_disk == expected, "run python tests/bad_inputs/make_corpus.py"
    assert sum(len(CASES[g]) for g in REFUSED) >= 30


# --------------------------------------------------------------------------- data files


def _data_commands(path: Path, tmp: Path, model: Path) -> dict[str, list]:
    """Every command that reads an example file, pointed at ``path``."""
    return {
        "data audit": ["data", "audit", path],
        "data convert": ["data", "convert", path, "--to", "sdpo", "-o", tmp / "out.json"],
        "data split": ["data", "split", path, "--out", tmp / "split"],
        "eval": ["eval", "--data", path, "--model", model, "--out", tmp / "eval"],
        "sft": ["sft", "--data", path, "--model", model, "--out", tmp / "sft"],
        "align": ["align", "--data", path, "--model", model, "--out", tmp / "align"],
        "baselines": ["baselines", "--train", path, "--eval", path, "--methods", "popularity",
                      "--out", tmp / "baselines"],
    }


@pytest.mark.parametrize(("path", "message"), cases("data"), ids=ids("data"))
def test_every_data_reader_refuses_the_bad_file(path, message, tmp_path, tiny_dir, capsys):
    for command, argv in _data_commands(path, tmp_path, tiny_dir).items():
        line = refused(argv, capsys)
        assert f"{path}: " in line and message in line, f"{command}: {line}"


@pytest.mark.parametrize(("path", "message"), cases("requests"), ids=ids("requests"))
def test_rank_refuses_the_bad_request_file(path, message, tiny_dir, capsys):
    line = refused(["rank", "--input", path, "--model", tiny_dir], capsys)
    assert f"{path}: " in line and message in line


@pytest.mark.parametrize("path", [p for p, _ in cases("accepted") if p.suffix != ".yaml"],
                         ids=lambda p: p.name)
def test_a_byte_order_mark_is_accepted(path, capsys):
    assert main(["data", "audit", str(path)]) == 0
    assert "| 2 |" in capsys.readouterr().out  # two records read


@pytest.mark.parametrize(("path", "message"), cases("flagged"), ids=ids("flagged"))
def test_the_audit_flags_over_long_titles_and_records_past_the_context(path, message, tiny_dir,
                                                                       capsys):
    assert main(["data", "audit", str(path), "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    findings = out.split("## Findings")[1]
    assert message in findings
    assert "tokens" in findings


def test_training_refuses_a_record_that_cannot_fit(tmp_path, tiny_dir, capsys):
    path = CORPUS / "flagged" / "long_candidate.json"
    line = refused(["sft", "--data", path, "--model", tiny_dir, "--out", tmp_path,
                    "--max-length", "512"], capsys)
    assert f"{path}: record 1: a completion of " in line
    assert "tokens alone fills max_length of 512 tokens" in line


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(("path", "message"), cases("configs"), ids=ids("configs"))
def test_run_and_study_refuse_the_bad_config(path, message, tmp_path, capsys):
    assert message in refused(["run", path], capsys)
    study = tmp_path / "study.yaml"
    study.write_text(json.dumps({"base": str(path), "out": str(tmp_path / "o"),
                                 "variants": {"default": []}}))
    line = refused(["study", study], capsys)
    assert str(path) in line and message in line


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.limit=abc", "eval.limit (set by override eval.limit=abc): expected an integer "
                           "or null, got 'abc'"),
        ("sft.lr=fast", "sft.lr (set by override sft.lr=fast): expected a number"),
        ("align.negatives=[3, x]", "expected a list of integers or an integer, got [3, 'x']"),
        ("eval={limit: [1]}", "eval.limit (set by override eval={limit: [1]})"),
        ("significance.n_boot=1.5", "significance.n_boot (set by override"),
        ("model=7", "model (set by override model=7): expected a string, got 7"),
        ("eval.mode=sample", "expected one of likelihood, generate, both, got 'sample'"),
    ],
)
def test_overrides_are_type_checked(override, message, capsys):
    path = CORPUS / "accepted" / "run.yaml"
    line = refused(["run", path, override], capsys)
    assert f"{path}: " in line and message in line


@pytest.mark.parametrize(("path", "message"), cases("studies"), ids=ids("studies"))
def test_study_refuses_the_bad_study_file(path, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the study names its base config relative to the repository
    line = refused(["study", path], capsys)
    assert f"{path}: " in line and message in line


@pytest.mark.parametrize(("path", "message"), cases("baselines"), ids=ids("baselines"))
def test_baselines_refuse_the_bad_method_config(path, message, tmp_path, capsys):
    data = CORPUS / "accepted" / "bom.json"
    line = refused(["baselines", "--train", data, "--eval", data, "--methods", "popularity",
                    "--config", path, "--out", tmp_path], capsys)
    assert f"{path}: " in line and message in line


def test_the_accepted_run_config_loads():
    from prefrec.runner import load_config

    assert load_config(CORPUS / "accepted" / "run.yaml")["eval"]["limit"] == 10


# --------------------------------------------------------------------------- real processes


@pytest.mark.parametrize("argv", [
    ["data", "audit", "tests/bad_inputs/data/deep_nesting.json"],
    ["run", "tests/bad_inputs/configs/eval_limit_a_word.yaml"],
], ids=["nested 100000 deep", "eval limit sixty"])
def test_the_reported_cases_exit_2_without_a_traceback(argv):
    res = subprocess.run([sys.executable, "-m", "prefrec", *argv], capture_output=True,
                         text=True, cwd=REPO)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    [line] = res.stderr.strip().splitlines()
    assert argv[-1] in line


@pytest.mark.parametrize(("meta", "message"), [
    (b'{"base_model": "x", "parents": ', "invalid JSON at line 1 column 32"),
    (b'["not", "an", "object"]', "expected an object with a list of parents"),
    (b'{"parents": "sft"}', "expected an object with a list of parents"),
    (b'{"base_model": NaN}', "field 'base_model': NaN is not valid JSON"),
], ids=["truncated", "a list", "parents a string", "NaN"])
def test_a_broken_adapter_lineage_file_is_one_line(meta, message, tmp_path, tiny_dir, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "prefrec_adapter.json").write_bytes(meta)
    line = refused(["rank", "--adapter", adapter, "--model", tiny_dir, "--history", "A",
                    "--candidates", "B", "C"], capsys)
    assert f"{adapter / 'prefrec_adapter.json'}: " in line and message in line
