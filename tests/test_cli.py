"""The command line: help on every subcommand, one-line errors with exit code 2, data build."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prefrec.cli import main

SUBCOMMANDS = [
    ["data", "build"],
    ["data", "audit"],
    ["data", "convert"],
    ["model", "info"],
    ["eval"],
    ["sft"],
    ["align"],
    ["data", "split"],
    ["baselines"],
    ["rank"],
    ["explain"],
    ["serve"],
    ["run"],
]


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=lambda c: " ".join(c))
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: prefrec " + " ".join(cmd))


def test_building_the_parser_imports_no_torch():
    """``prefrec --help`` and argument errors stay instant: heavy imports are lazy."""
    code = ("import sys, prefrec.cli; prefrec.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_console_script_runs_as_module():
    res = subprocess.run(
        [sys.executable, "-m", "prefrec", "--version"], capture_output=True, text=True, check=True
    )
    assert res.stdout.startswith("prefrec ")


def test_bad_data_file_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"instruction": "x", "input": "", "output": ', encoding="utf-8")
    res = subprocess.run(
        [sys.executable, "-m", "prefrec", "data", "audit", str(bad)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "broken.json" in lines[0] and "Traceback" not in res.stderr


def test_audit_reports_amazon_game_leak(shared_data, tmp_path, capsys):
    d = shared_data / "dmpo"
    report = tmp_path / "audit.json"
    files = [str(d / f"rec_Amazon_Game_{n}.json") for n in ("sft_ranking", "dpo_ranking_3",
                                                             "eval_ranking")]
    assert main(["data", "audit", *files, "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["leaked_histories"] == {"rec_Amazon_Game_eval_ranking.json": 15}


def test_data_build_ml100k_then_audit_shows_no_leak(shared_data, tmp_path, capsys):
    out = tmp_path / "built"
    args = ["data", "build", "--raw", str(shared_data / "ml-100k"), "--format", "ml100k",
            "--protocol", "dmpo", "--out", str(out), "--max-interactions", "0",
            "--eval-users", "300", "--seed", "3"]
    assert main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "ml_100k_eval_ranking.json" in names and "ml_100k_dpo_ranking_5.json" in names
    first = (out / "ml_100k_eval_ranking.json").read_bytes()
    # Same seed: byte-identical output.
    assert main([*args[:-2], "--seed", "3", "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "ml_100k_eval_ranking.json").read_bytes() == first
    report = tmp_path / "audit.json"
    files = [str(out / n) for n in names if n.endswith("ranking.json") or "dpo_ranking_3" in n]
    assert main(["data", "audit", *files, "--json", str(report)]) == 0
    audit = json.loads(report.read_text())
    assert audit["leaked_histories"] == {"ml_100k_eval_ranking.json": 0}
    assert set(audit["leaked_users"].values()) == {0}

    sdpo_out = tmp_path / "sdpo"
    assert main(["data", "build", "--raw", str(shared_data / "ml-100k"), "--format", "ml100k",
                 "--protocol", "sdpo", "--out", str(sdpo_out)]) == 0
    rows = json.loads((sdpo_out / "ml_100k-test.json").read_text())
    assert all(len(r["itemList"]) == 20 and r["trueSelection"] in r["itemList"] for r in rows)


def test_data_build_too_few_users_is_one_line_error(shared_data, capsys, tmp_path):
    code = main(["data", "build", "--raw", str(shared_data / "ml-100k"), "--format", "ml100k",
                 "--protocol", "dmpo", "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "users qualify" in err and "\n" not in err


@pytest.mark.parametrize("cmd", [["sft"], ["align"], ["eval"]])
def test_limit_zero_is_refused_not_read_as_no_limit(cmd, capsys):
    code = main([*cmd, "--data", "ml1m-sft", "--out", "x", "--limit", "0"])
    assert code == 2
    assert "--limit 0: expected at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["sft"], ["align"]])
def test_lora_layers_zero_is_refused(cmd, capsys):
    code = main([*cmd, "--data", "ml1m-sft", "--out", "x", "--lora-layers", "0"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "--lora-layers 0: expected at least 1" in err and "\n" not in err


def test_every_source_folder_is_a_package_the_wheel_ships():
    """setuptools' find_packages skips folders without __init__.py: a non-editable
    install would then miss them, while editable installs (and so the tests) still work."""
    from pathlib import Path

    from setuptools import find_packages

    src = Path(__file__).resolve().parents[1] / "src"
    folders = {
        ".".join(p.relative_to(src).parts)
        for p in (src / "prefrec").rglob("*")
        if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))
    } | {"prefrec"}
    assert folders <= set(find_packages(str(src)))
