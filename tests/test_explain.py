"""Per-token explanations: they add up to the ranking scores, the difference to a reference
is exact, and every rendering (table, JSON, HTML, PNG) shows every token."""

from __future__ import annotations

import argparse
import html
import json
import re

import pytest

import test_recommender as shared
from prefrec.data.prompts import model_input, selection_instruction
from prefrec.errors import PrefrecError
from prefrec.explain import (
    add_explain_args,
    display_token,
    explain,
    explain_command,
    format_table,
    load_reference,
    render_html,
    render_png,
)
from prefrec.model import load_for_scoring
from prefrec.recommender import Recommender

# The tiny model folder, its adapter chain and the recommender, as test_recommender makes them.
adapter_chain_dirs = shared.adapter_chain_dirs
recommender = shared.recommender
naive_logp = shared.naive_logp
HISTORY, CANDIDATES = shared.HISTORY, shared.CANDIDATES
ODD = ['Amélie & "<Friends>" (2001)', "Heat (1995)"]  # non-ASCII, HTML metacharacters


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("task", ["selection", "pairwise"])
def test_token_logprobs_add_up_to_the_ranking_scores(recommender, task):
    candidates = CANDIDATES if task == "selection" else CANDIDATES[:2]
    expl = explain(recommender, HISTORY, candidates, task)
    ranking = {r.title: r for r in recommender.rank(HISTORY, candidates, task)}
    eos = recommender.tokenizer.eos_token
    assert [it.title for it in expl.items] == candidates
    for item in expl.items:
        assert len(item.tokens) == len(item.logps) == ranking[item.title].n_tokens
        assert sum(item.logps) == pytest.approx(ranking[item.title].logp, abs=1e-4)
        # The strings are the scored tokens: together they spell the completion + EOS.
        assert "".join(item.tokens) == item.completion + eos
        assert all(lp < 0 for lp in item.logps)
    assert [it.title for it in expl.ranked()] == [r for r in ranking]


def test_difference_to_itself_is_zero(recommender):
    expl = explain(recommender, HISTORY, CANDIDATES, reference=recommender, reference_name="self")
    for item in expl.items:
        assert item.diffs == [0.0] * len(item.tokens)
        assert item.reference_logps == item.logps


def test_parent_reference_is_the_sft_model(tiny_dir, adapter_chain_dirs):
    """For an aligned adapter, --reference parent scores under base + SFT (the DPO
    reference), so the summed difference is log pi_aligned - log pi_sft, computed here
    with plain forward passes."""
    sft, aligned = adapter_chain_dirs
    rec = Recommender.load(str(tiny_dir), [aligned])
    reference = load_reference(rec, "parent")
    assert reference.adapters == [str(sft.resolve())] and reference.template == "plain"
    expl = explain(rec, HISTORY, CANDIDATES[:3], reference=reference, reference_name="parent")
    aligned_model, tok = load_for_scoring(str(tiny_dir), [sft, aligned])
    sft_model, _ = load_for_scoring(str(tiny_dir), [sft])
    prompt = model_input(selection_instruction(HISTORY, CANDIDATES[:3]), "plain")
    for item in expl.items:
        want = (naive_logp(aligned_model, tok, prompt, item.title)
                - naive_logp(sft_model, tok, prompt, item.title))
        assert sum(item.diffs) == pytest.approx(want, abs=1e-4)
        assert sum(item.reference_logps) == pytest.approx(
            naive_logp(sft_model, tok, prompt, item.title), abs=1e-4)
    assert any(abs(d) > 1e-3 for item in expl.items for d in item.diffs)
    assert load_reference(rec, "base").adapters == []


def test_parent_reference_needs_an_adapter(recommender):
    with pytest.raises(PrefrecError, match="--reference parent needs --adapter"):
        load_reference(recommender, "parent")


def test_reference_with_another_tokenizer_is_refused(recommender):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import make_tiny_llama

    # The same vocabulary, but no merges: every text splits into single bytes.

    vocab = dict(recommender.tokenizer.get_vocab())
    byte_only = {t: i for t, i in vocab.items() if len(t) == 1 or t.startswith("<|")}
    tok = Tokenizer(models.BPE(byte_only, [], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    reference = Recommender(make_tiny_llama(len(vocab)), fast)
    with pytest.raises(PrefrecError, match="tokenises the completions differently"):
        explain(recommender, HISTORY, CANDIDATES[:2], reference=reference)


def test_renderings_show_every_token(recommender, tmp_path):
    expl = explain(recommender, HISTORY, ODD, reference=recommender, reference_name="self")
    page = render_html(expl)
    for item in expl.items:
        for token in item.tokens:
            assert f">{html.escape(display_token(token))}</span>" in page
    assert html.escape(ODD[0]) in page and ODD[0] not in page  # titles are escaped
    assert "<style>" in page and not re.search(r"(src|href)=", page)  # self-contained
    assert "linear-gradient" in page and "red: alignment pushed the token down" in page
    table = format_table(expl)
    assert all(repr(display_token(t)) in table for it in expl.items for t in it.tokens)
    assert json.loads(json.dumps(expl.to_dict()))["items"][0]["tokens"][0]["diff"] == 0.0

    render_png(expl, tmp_path / "e.png")
    data = (tmp_path / "e.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 100


def test_colours_follow_the_values(recommender):
    """Without a reference, a likelier token gets another colour than an unlikely one,
    and every span's background comes from the viridis scale."""
    expl = explain(recommender, HISTORY, CANDIDATES[:2])
    page = render_html(expl)
    backgrounds = re.findall(r'class="tok" style="background:(#[0-9a-f]{6})', page)
    assert len(backgrounds) == sum(len(it.tokens) for it in expl.items)
    assert len(set(backgrounds)) > 1
    assert "token log-prob under the model" in page


def test_explain_command_writes_json_html_and_png(tiny_dir, adapter_chain_dirs, tmp_path,
                                                  capsys):
    _, aligned = adapter_chain_dirs
    parser = argparse.ArgumentParser()
    add_explain_args(parser)
    out = tmp_path / "out"
    args = parser.parse_args([
        "--adapter", str(aligned), "--history", *HISTORY, "--candidates", *CANDIDATES[:2],
        "--reference", "parent", "--json", str(out / "e.json"), "--html", str(out / "e.html"),
        "--png", str(out / "e.png"),
    ])
    explain_command(args)
    printed = capsys.readouterr().out
    saved = json.loads((out / "e.json").read_text())
    assert saved["reference"] == "parent" and saved["adapters"][-1] == str(aligned)
    assert [it["title"] for it in saved["items"]] == CANDIDATES[:2]
    for item in saved["items"]:
        assert item["diff"] == pytest.approx(sum(t["diff"] for t in item["tokens"]), abs=1e-5)
        assert f"diff {item['diff']:+.3f}" in printed
    assert (out / "e.html").read_text().startswith("<!doctype html>")
    assert (out / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_explain_command_refuses_parent_without_adapter(tiny_dir):
    parser = argparse.ArgumentParser()
    add_explain_args(parser)
    args = parser.parse_args(["--model", str(tiny_dir), "--history", "A", "--candidates", "B",
                              "--reference", "parent"])
    with pytest.raises(PrefrecError, match="--reference parent needs --adapter"):
        explain_command(args)
