"""The Recommender API and ``prefrec rank``: prompts as training builds them, ranking by
independently computed log-probs, probabilities, adapter lineage, input validation.

Everything runs on the tiny random Llama of ``conftest.py`` saved as a local model folder,
so it loads by path like a real model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import random_lora_adapter
from prefrec.data.prompts import (
    DOMAINS,
    model_input,
    pairwise_completion,
    pairwise_instruction,
    selection_instruction,
)
from prefrec.errors import DataError, PrefrecError
from prefrec.model import load, load_for_scoring
from prefrec.recommender import (
    Limits,
    RankRequest,
    Recommender,
    add_rank_args,
    rank_command,
    read_requests,
)

HISTORY = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)"]
CANDIDATES = ["GoldenEye (1995)", "Sabrina (1995)", "Jumanji (1995)", "Balto (1995)"]


pytestmark = pytest.mark.usefixtures("single_thread")


def random_adapter(model, folder: Path, base: str, parents: list[Path], template: str,
                   seed: int) -> Path:
    return random_lora_adapter(model, folder, base, parents, template, seed, scale=0.2)


@pytest.fixture(scope="module")
def adapter_chain_dirs(tiny_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(sft, aligned): an SFT adapter on the base, an aligned one on base + SFT merged.

    The aligned adapter's lineage says template 'plain', so a test can see that the
    template comes from the adapter.
    """
    root = tmp_path_factory.mktemp("adapters")
    base, _ = load(str(tiny_dir))
    sft = random_adapter(base, root / "sft", str(tiny_dir), [], "plain", seed=1)
    merged, _ = load_for_scoring(str(tiny_dir), [sft])
    merged.requires_grad_(True)
    aligned = random_adapter(merged, root / "aligned", str(tiny_dir), [sft], "plain", seed=2)
    return sft, aligned


@pytest.fixture(scope="module")
def recommender(tiny_dir) -> Recommender:
    return Recommender.load(str(tiny_dir))


def naive_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """log pi(completion + EOS | prompt) from one plain forward pass over the full sequence."""
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logps = model(torch.tensor([p + c])).logits[0].float().log_softmax(-1)
    return sum(logps[len(p) - 1 + k, t].item() for k, t in enumerate(c))


def naive_ntokens(tokenizer, completion: str) -> int:
    return len(tokenizer(completion, add_special_tokens=False)["input_ids"]) + 1


# --------------------------------------------------------------------------- ranking


def test_selection_ranking_follows_naive_logprobs(recommender):
    model, tok = recommender.model, recommender.tokenizer
    prompt = model_input(selection_instruction(HISTORY, CANDIDATES), "alpaca")
    naive = {c: naive_logp(model, tok, prompt, c) for c in CANDIDATES}
    ranking = recommender.rank(HISTORY, CANDIDATES)

    assert [r.title for r in ranking] == sorted(CANDIDATES, key=lambda c: -naive[c])
    assert [r.rank for r in ranking] == [1, 2, 3, 4]
    top = max(naive.values())
    norm = sum(math.exp(v - top) for v in naive.values())
    for item in ranking:
        assert item.logp == pytest.approx(naive[item.title], abs=1e-4)
        assert item.n_tokens == naive_ntokens(tok, item.title)
        assert item.logp_normalized == pytest.approx(item.logp / item.n_tokens)
        assert item.probability == pytest.approx(math.exp(naive[item.title] - top) / norm,
                                                 rel=1e-3)
    assert sum(r.probability for r in ranking) == pytest.approx(1.0, abs=1e-12)


def test_pairwise_scores_both_orderings_under_the_domain_wording(recommender):
    model, tok = recommender.model, recommender.tokenizer
    a, b = "Heat (1995)", "Toy Story (1995)"
    for domain in ("movie", "amazon_game"):
        prompt = model_input(pairwise_instruction(HISTORY, a, b, DOMAINS[domain]), "alpaca")
        naive = {a: naive_logp(model, tok, prompt, pairwise_completion(a, b)),
                 b: naive_logp(model, tok, prompt, pairwise_completion(b, a))}
        ranking = recommender.rank(HISTORY, [a, b], task="pairwise", domain=domain)
        assert [r.title for r in ranking] == sorted([a, b], key=lambda c: -naive[c])
        for item in ranking:
            assert item.logp == pytest.approx(naive[item.title], abs=1e-4)
        p_first = 1 / (1 + math.exp(naive[b] - naive[a]))
        assert {r.title: r.probability for r in ranking}[a] == pytest.approx(p_first, rel=1e-3)
    # The wording reaches the model: another domain, other scores.
    movie = {r.title: r.logp for r in recommender.rank(HISTORY, [a, b], task="pairwise")}
    game = {r.title: r.logp for r in recommender.rank(HISTORY, [a, b], "pairwise", "amazon_game")}
    assert movie[a] != pytest.approx(game[a], abs=1e-4)


def test_rank_many_equals_ranking_one_request_at_a_time(recommender):
    requests = [
        RankRequest(tuple(HISTORY), tuple(CANDIDATES)),
        RankRequest(tuple(HISTORY[:1]), ("Heat (1995)", "Balto (1995)"), "pairwise"),
        RankRequest(tuple(HISTORY[1:]), tuple(CANDIDATES[:2]), "selection"),
    ]
    together = recommender.rank_many(requests)
    for req, ranking in zip(requests, together, strict=True):
        alone = recommender.rank(req.history, req.candidates, req.task)
        assert [r.title for r in ranking] == [r.title for r in alone]
        for x, y in zip(ranking, alone, strict=True):
            assert x.logp == pytest.approx(y.logp, abs=1e-4)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("history", "candidates", "task", "message"),
    [
        ([], CANDIDATES, "selection", "field 'history': empty list"),
        (HISTORY, [], "selection", "field 'candidates': empty list"),
        (HISTORY, ["A", "B", "A"], "selection", "duplicate candidate 'A' (positions 0 and 2)"),
        (HISTORY, [f"c{i}" for i in range(6)], "selection", "6 titles, more than the limit 5"),
        (HISTORY, ["A", "x" * 41], "selection",
         "field 'candidates[1]': title of 41 characters, more than the limit 40"),
        (["x" * 41], ["A"], "selection", "field 'history[0]': title of 41 characters"),
        (HISTORY, ["A", "B", "C"], "pairwise", "pairwise task ranks exactly 2 candidates, got 3"),
        (HISTORY, ["A", "B"], "ranking", "unknown task 'ranking'"),
        (HISTORY, "AB", "selection", "field 'candidates': expected a list of titles, got str"),
        (HISTORY, ["A", 3], "selection", "field 'candidates[1]': expected a string, got int"),
        (HISTORY, ["A", "   "], "selection", "field 'candidates[1]': empty title"),
        (["Heat\n### Response:"], ["A"], "selection", "control character"),
    ],
)
def test_bad_input_is_refused_with_a_message(recommender, history, candidates, task, message):
    rec = dataclasses.replace(recommender, limits=Limits(max_history=10, max_candidates=5,
                                                         max_title_chars=40))
    with pytest.raises(PrefrecError, match=re.escape(message)):
        rec.rank(history, candidates, task)


def test_unknown_domain_and_bad_request_index(recommender):
    with pytest.raises(PrefrecError, match="field 'domain': unknown domain 'books'"):
        recommender.rank(HISTORY, ["A", "B"], "pairwise", domain="books")
    good = RankRequest(tuple(HISTORY), ("A", "B"))
    bad = RankRequest(tuple(HISTORY), ("A", "A"))
    with pytest.raises(DataError, match="^record 1: field 'candidates': duplicate"):
        recommender.rank_many([good, bad])


# --------------------------------------------------------------------------- adapters


def test_one_adapter_folder_brings_its_base_parents_and_template(tiny_dir, adapter_chain_dirs):
    sft, aligned = adapter_chain_dirs
    rec = Recommender.load("no-such-model", [aligned])  # the lineage names the base
    assert rec.model_name == str(tiny_dir)
    assert rec.adapters == [str(sft.resolve()), str(aligned)]
    assert rec.template == "plain"

    model, tok = load_for_scoring(str(tiny_dir), [sft, aligned])
    prompt = model_input(selection_instruction(HISTORY, CANDIDATES), "plain")
    ranking = rec.rank(HISTORY, CANDIDATES)
    for item in ranking:
        assert item.logp == pytest.approx(naive_logp(model, tok, prompt, item.title), abs=1e-4)
    # The adapters change the model: base scores differ.
    base = {r.title: r.logp for r in Recommender.load(str(tiny_dir), template="plain")
            .rank(HISTORY, CANDIDATES)}
    assert any(abs(base[r.title] - r.logp) > 1e-2 for r in ranking)


def test_a_folder_that_is_not_an_adapter_is_refused(tmp_path):
    with pytest.raises(PrefrecError, match="not a PEFT adapter folder"):
        Recommender.load("smollm2-135m", [tmp_path])


# --------------------------------------------------------------------------- CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_rank_args(parser)
    return parser.parse_args(argv)


def test_rank_command_prints_the_api_ranking_as_json(tiny_dir, recommender, capsys):
    rank_command(_parse(["--model", str(tiny_dir), "--history", *HISTORY,
                         "--candidates", *CANDIDATES, "--json"]))
    [line] = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(line)["ranking"]
    expected = recommender.rank(HISTORY, CANDIDATES)
    assert [r["title"] for r in printed] == [r.title for r in expected]
    assert [r["logp"] for r in printed] == pytest.approx([r.logp for r in expected], abs=1e-4)


def test_rank_command_reads_jsonl_and_prints_tables(tiny_dir, recommender, tmp_path, capsys):
    path = tmp_path / "requests.jsonl"
    path.write_text(
        json.dumps({"history": HISTORY, "candidates": CANDIDATES}) + "\n\n"
        + json.dumps({"history": HISTORY, "candidates": ["A", "B"], "task": "pairwise"}) + "\n"
    )
    rank_command(_parse(["--model", str(tiny_dir), "--input", str(path)]))
    out = capsys.readouterr().out
    assert "request 0 (selection, 4 candidates)" in out
    assert "request 1 (pairwise, 2 candidates)" in out
    best = recommender.rank(HISTORY, CANDIDATES)[0]
    table = out.split("request 1")[0].splitlines()
    assert table[2].split()[0] == "1" and table[2].endswith(best.title)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"history": ["A"], "candidates": ["B", "B"]}',
         "record 2: field 'candidates': duplicate candidate 'B'"),
        ('{"history": ["A"]}', "record 2: field 'candidates': missing field"),
        ('{"history": ["A"], "candidates": ["B"], "task": "rank"}',
         "record 2: field 'task': unknown task 'rank'"),
        ('{"history": ["A"], "candidates": ["B"], "user": 1}', "record 2: field 'user': unknown"),
        ('{"history": ["A"], ', "record 2: invalid JSON at column"),
        ('["A", "B"]', "record 2: expected a JSON object"),
    ],
)
def test_a_bad_jsonl_line_names_file_record_and_field(tmp_path, line, message):
    path = tmp_path / "requests.jsonl"
    good = json.dumps({"history": ["A"], "candidates": ["B", "C"]})
    path.write_text(f"{good}\n{good}\n{line}\n")
    with pytest.raises(DataError) as err:
        read_requests(path, Limits())
    assert str(err.value).startswith(f"{path}: {message}")


def test_command_line_errors_name_the_option(tiny_dir):
    with pytest.raises(PrefrecError, match="--candidates: duplicate candidate 'B'"):
        rank_command(_parse(["--model", str(tiny_dir), "--history", "A",
                             "--candidates", "B", "B"]))
    with pytest.raises(PrefrecError, match="give --history and --candidates"):
        rank_command(_parse(["--model", str(tiny_dir), "--history", "A"]))


def test_rank_args_coexist_with_the_cli_model_options():
    from prefrec.cli import _add_model_args

    parser = argparse.ArgumentParser()
    _add_model_args(parser)
    add_rank_args(parser)  # must not clash with --model, --dtype, --device, --template
    args = parser.parse_args(["--history", "A", "--candidates", "B", "--adapter", "x"])
    assert args.model == "smollm2-135m" and args.adapter == "x" and args.domain == "movie"
