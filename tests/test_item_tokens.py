"""Collaborative item tokens: the projector, the virtual tokens in the scorer, the stages."""

from __future__ import annotations

import json
import re

import pytest
import torch

from prefrec.data.prompts import DOMAINS, model_input, pairwise_completion, pairwise_instruction
from prefrec.errors import PrefrecError
from prefrec.item_tokens import (
    META_FILE,
    WEIGHTS_FILE,
    ItemProjector,
    attach_item_projector,
    item_positions,
    item_projector_of,
)
from prefrec.model import load_for_scoring, model_fingerprint
from prefrec.scoring import score_completions, tokenize_items
from prefrec.train.align import train_align
from prefrec.train.common import restore_item_projector
from prefrec.train.config import AlignConfig, SFTConfig
from prefrec.train.sft import train_sft

pytestmark = pytest.mark.usefixtures("single_thread")

KEYS = ["toy story", "heat", "big"]


def _projector(hidden: int, seed: int = 0) -> ItemProjector:
    gen = torch.Generator().manual_seed(seed)
    projector = ItemProjector(KEYS, torch.randn(3, 8, generator=gen), hidden, "bpr")
    with torch.no_grad():
        projector.unknown.copy_(torch.randn(8, generator=gen))
    return projector


def _group():
    history = ["Toy Story (1995)", "Heat (1995)"]
    prompts, completions = [], []
    for first, second in (("Big (1988)", "Gigi (1958)"), ("Big (1988)", "Heat (1995)")):
        prompt = model_input(pairwise_instruction(history, first, second, DOMAINS["movie"]))
        prompts += [prompt, prompt]
        completions += [pairwise_completion(first, second), pairwise_completion(second, first)]
    return prompts, completions


def test_projector_rows_unknown_items_and_round_trip(tmp_path):
    projector = _projector(hidden=16)
    assert projector.row("Heat (1995)") == 1  # item_key: no year, case-folded
    assert projector.row("Gigi (1958)") == projector.unknown_row == 3  # cold: never an error
    out = projector(torch.tensor([0, 3]))
    assert out.shape == (2, 16)
    projector.save(tmp_path)
    assert json.loads((tmp_path / META_FILE).read_text())["keys"] == KEYS
    again = ItemProjector.load(tmp_path)
    torch.testing.assert_close(again(torch.tensor([0, 3])), out)
    assert ItemProjector.load(tmp_path / "nothing") is None
    (tmp_path / WEIGHTS_FILE).write_bytes(b"torn")
    with pytest.raises(PrefrecError, match="unreadable item projector"):
        ItemProjector.load(tmp_path)


def test_a_virtual_token_follows_every_title_tag(tiny_tokenizer):
    prompts, completions = _group()
    projector = _projector(hidden=8)
    [item] = tokenize_items(tiny_tokenizer, prompts[:1], completions[:1],
                            item_rows=projector.row)
    [plain] = tokenize_items(tiny_tokenizer, prompts[:1], completions[:1])
    virtual = [i for i in item.ids if i < 0]
    # History (toy story, heat), then the candidates (big, gigi = unknown).
    assert virtual == [-1, -2, -3, -(projector.unknown_row + 1)]
    assert [i for i in item.ids if i >= 0] == list(plain.ids)  # the text's tokens unchanged
    assert item.n_prompt == plain.n_prompt + 4
    encoded = tiny_tokenizer(prompts[0], return_offsets_mapping=True)
    for index, _ in item_positions(prompts[0], encoded["offset_mapping"]):
        token = tiny_tokenizer.decode(encoded["input_ids"][index - 1])
        assert ">" in token  # inserted right after the tag's closing bracket


def test_item_tokens_score_the_same_shared_and_naive_and_train_the_projector(tiny_llama):
    model, tok = tiny_llama
    prompts, completions = _group()
    text_only = score_completions(model, tok, prompts, completions).logps
    projector = _projector(hidden=model.config.hidden_size)
    attach_item_projector(model, projector, trainable=True)
    assert item_projector_of(model) is projector
    shared = score_completions(model, tok, prompts, completions, group_ids=[0] * 4, grad=True)
    naive = score_completions(model, tok, prompts, completions, shared_prefix=False, grad=True)
    torch.testing.assert_close(shared.logps, naive.logps, rtol=1e-4, atol=1e-4)
    assert (shared.logps.detach() - text_only).abs().max() > 1e-3  # the items change the scores
    shared.logps.sum().backward()
    grads = {n: p.grad for n, p in projector.named_parameters()}
    assert grads["unknown"] is not None and grads["unknown"].abs().sum() > 0  # Gigi is cold
    assert grads["mlp.0.weight"].abs().sum() > 0
    # Without a projector, prompts with virtual tokens are refused rather than misread.
    del model.item_projector
    items = tokenize_items(tok, prompts[:1], completions[:1], item_rows=projector.row)
    from prefrec.scoring import _decoder_inputs

    ids = torch.tensor([items[0].ids])
    with pytest.raises(ValueError, match="no item projector"):
        _decoder_inputs(model, ids)


def test_sft_and_align_train_save_and_reload_the_projector(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))
    sft_cfg = SFTConfig(data="ml1m-sft", out=str(tmp_path / "sft"), limit=4, batch_size=2,
                        max_steps=2, lr=1e-2, save_steps=1, item_embeddings="bpr")
    sft = train_sft(sft_cfg, str(tiny_dir), "alpaca", dtype="float32", device="cpu")
    trained = ItemProjector.load(sft)
    assert trained is not None and trained.source == "bpr" and len(trained.keys) > 4
    # Every checkpoint carries the projector, so a resumed run continues it.
    checkpoints = sorted((tmp_path / "sft" / "checkpoints").iterdir())
    assert checkpoints and all((c / WEIGHTS_FILE).is_file() for c in checkpoints)
    fresh = ItemProjector(trained.keys, trained.vectors, trained.mlp[2].out_features, "bpr")
    restore_item_projector(fresh, str(checkpoints[-1]))
    torch.testing.assert_close(fresh.state_dict()["mlp.0.weight"],
                               trained.state_dict()["mlp.0.weight"])

    model, _ = load_for_scoring(str(tiny_dir), [sft])
    loaded = item_projector_of(model)
    assert loaded is not None and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.state_dict()["mlp.2.weight"],
                               trained.state_dict()["mlp.2.weight"])
    with_projector = model_fingerprint(str(tiny_dir), [sft])
    (sft / WEIGHTS_FILE).rename(tmp_path / "moved")
    assert model_fingerprint(str(tiny_dir), [sft]) != with_projector  # part of the cache key
    (tmp_path / "moved").rename(sft / WEIGHTS_FILE)

    align_cfg = AlignConfig(data="ml1m-dpo-3", out=str(tmp_path / "dmpo"), sft=str(sft), limit=2,
                            batch_size=2, max_steps=2, lr=1e-2, save_steps=1000)
    aligned = train_align(align_cfg, str(tiny_dir), "alpaca", dtype="float32", device="cpu")
    continued = ItemProjector.load(aligned)
    assert continued is not None and continued.keys == trained.keys
    assert not torch.equal(continued.state_dict()["mlp.0.weight"],
                           trained.state_dict()["mlp.0.weight"])  # trained further
    # The chain loads the newest projector, and a missing checkpoint copy is a clear error.
    chained, _ = load_for_scoring(str(tiny_dir), [sft, aligned])
    torch.testing.assert_close(item_projector_of(chained).state_dict()["mlp.0.weight"],
                               continued.state_dict()["mlp.0.weight"])
    with pytest.raises(PrefrecError, match="no item projector"):
        restore_item_projector(fresh, str(tmp_path))


def _cyclic_users(history_len, liked_at: int, disliked_at: int) -> list:
    """12 users over 8 titles: user u watched titles u, u+1, ... (mod 8), likes title
    u + liked_at and dislikes u + disliked_at."""
    from prefrec.data.schema import PairwiseExample

    titles = [f"Movie {i} (1990)" for i in range(8)]
    examples = []
    for u in range(12):
        history = [titles[(u + k) % 8] for k in range(history_len(u))]
        liked, disliked = titles[(u + liked_at) % 8], titles[(u + disliked_at) % 8]
        examples.append(PairwiseExample(
            history=tuple(history), candidates=(liked, disliked), positive=0,
            prompt=pairwise_instruction(history, liked, disliked, DOMAINS["movie"]),
            chosen=pairwise_completion(liked, disliked),
            rejected=pairwise_completion(disliked, liked), user=f"u{u}"))
    return examples


def test_bpr_item_vectors_carry_the_item_bias_standardised(monkeypatch):
    """The BPR bias b_i (how liked an item is across users) is a column of the item tokens'
    input: without it the projector could not see the signal popularity baselines use."""
    from prefrec.baselines.bpr import BPR
    from prefrec.item_tokens import fit_item_vectors

    examples = _cyclic_users(history_len=lambda u: 3, liked_at=3, disliked_at=5)
    fitted = {}
    real_fit = BPR.fit

    def spy_fit(self, baskets, names, on_epoch=None):
        real_fit(self, baskets, names, on_epoch)
        fitted["bpr"] = self

    monkeypatch.setattr(BPR, "fit", spy_fit)
    keys, vectors = fit_item_vectors(examples, "bpr", seed=0)
    bpr = fitted["bpr"]
    assert keys == list(bpr.index.keys)
    assert vectors.shape == (len(keys), bpr.items.shape[1] + 1)
    torch.testing.assert_close(vectors.mean(0), torch.zeros(vectors.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(vectors.std(0), torch.ones(vectors.shape[1]), atol=1e-4, rtol=0)
    bias = (bpr.bias - bpr.bias.mean()) / bpr.bias.std()
    torch.testing.assert_close(vectors[:, -1], bias, atol=1e-5, rtol=0)


def test_item_token_ablation_scores_with_the_item_table_shuffled(tiny_dir, tmp_path, monkeypatch):
    import importlib.util
    import shutil
    from pathlib import Path

    from prefrec.data.resolve import resolve_dataset
    from prefrec.evaluate import run_eval

    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location(
        "item_token_ablation", Path(__file__).parents[1] / "scripts" / "item_token_ablation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = SFTConfig(data="ml1m-sft", out=str(tmp_path / "sft"), limit=8, batch_size=2,
                    max_steps=3, lr=5e-2, save_steps=100, item_embeddings="bpr")
    sft = train_sft(cfg, str(tiny_dir), "alpaca", dtype="float32", device="cpu")
    data = str(resolve_dataset("ml1m-sft"))
    reference, _ = run_eval(data, tmp_path / "trained", model=str(tiny_dir), adapter=str(sft),
                            limit=6, seed=0, dtype="float32", orders="both")
    out = tmp_path / "shuffled"
    script.main(["--adapter", str(sft), "--data", data, "--reference", str(reference),
                 "--out", str(out), "--model", str(tiny_dir), "--limit", "6",
                 "--dtype", "float32"])
    result = json.loads((out / "ablation.json").read_text())
    assert result["n"] == 6 and 0.0 <= result["agreement"] <= 1.0
    trained = [json.loads(line) for line in (reference / "scores.jsonl").read_text().splitlines()]
    shuffled = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in trained] == [r["index"] for r in shuffled]
    # Other items' vectors behind the titles change the log-probs: the table is really used.
    assert any(abs(a["chosen_logp"] - b["chosen_logp"]) > 1e-6
               for a, b in zip(trained, shuffled, strict=True))
    plain = Path(shutil.copytree(sft, tmp_path / "plain"))
    (plain / WEIGHTS_FILE).unlink()
    (plain / META_FILE).unlink()
    with pytest.raises(SystemExit, match="no metrics.json"):
        script.main(["--adapter", str(sft), "--data", data, "--reference", str(tmp_path),
                     "--out", str(tmp_path / "early"), "--model", str(tiny_dir)])
    with pytest.raises(SystemExit, match="no item projector"):
        script.main(["--adapter", str(plain), "--data", data, "--reference", str(reference),
                     "--out", str(tmp_path / "none"), "--model", str(tiny_dir)])


def test_item_projector_lr_gives_the_projector_its_own_learning_rate(tiny_dir, tmp_path,
                                                                    monkeypatch):
    """item_projector_lr=0 freezes the projector in effect while LoRA trains at lr; without
    it the projector trains at lr like everything else."""
    from safetensors.torch import load_file

    from prefrec.item_tokens import build_projector
    from prefrec.train.common import move_to_own_group

    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([{"params": [a, b], "weight_decay": 0.1}], lr=1e-3)
    move_to_own_group(opt, [b], lr=5e-2, weight_decay=0.0)
    assert [[p is a for p in g["params"]] for g in opt.param_groups] == [[True], [False]]
    assert opt.param_groups[1]["lr"] == 5e-2 and opt.param_groups[0]["lr"] == 1e-3

    from prefrec.data.formats import load_examples
    from prefrec.data.resolve import resolve_dataset
    from prefrec.model import load

    examples = load_examples(resolve_dataset("ml1m-sft"))[:6]
    hidden = load(str(tiny_dir), dtype="float32")[0].get_input_embeddings().embedding_dim
    initial = build_projector(examples, "bpr", hidden, 42).state_dict()["mlp.0.weight"]

    def trained_weight(name, projector_lr):
        cfg = SFTConfig(data="ml1m-sft", out=str(tmp_path / name), limit=6, batch_size=2,
                        max_steps=2, lr=5e-2, save_steps=100, warmup_ratio=0.0,
                        item_embeddings="bpr", item_projector_lr=projector_lr)
        adapter = train_sft(cfg, str(tiny_dir), "alpaca", dtype="float32", device="cpu")
        return load_file(str(adapter / WEIGHTS_FILE))["mlp.0.weight"]

    torch.testing.assert_close(trained_weight("frozen", 0.0), initial)
    assert not torch.allclose(trained_weight("shared", None), initial)


def test_item_projector_warmup_trains_the_projector_alone_first(tiny_dir, tmp_path,
                                                                monkeypatch):
    """item_projector_warmup_steps=2: after 2 steps the LoRA weights are still their
    initial values (B = 0) while the projector moved; on step 3 the LoRA trains too."""
    from safetensors.torch import load_file

    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))

    def trained(name, steps):
        cfg = SFTConfig(data="ml1m-sft", out=str(tmp_path / name), limit=6, batch_size=2,
                        max_steps=steps, lr=5e-2, save_steps=100, warmup_ratio=0.0,
                        item_embeddings="bpr", item_projector_warmup_steps=2)
        adapter = train_sft(cfg, str(tiny_dir), "alpaca", dtype="float32", device="cpu")
        lora = load_file(str(adapter / "adapter_model.safetensors"))
        lora_b = [w for k, w in lora.items() if "lora_B" in k]
        return lora_b, load_file(str(adapter / WEIGHTS_FILE))["mlp.0.weight"]

    from prefrec.data.formats import load_examples
    from prefrec.data.resolve import resolve_dataset
    from prefrec.item_tokens import build_projector
    from prefrec.model import load

    examples = load_examples(resolve_dataset("ml1m-sft"))[:6]
    hidden = load(str(tiny_dir), dtype="float32")[0].get_input_embeddings().embedding_dim
    initial = build_projector(examples, "bpr", hidden, 42).state_dict()["mlp.0.weight"]
    lora_b, projector = trained("warm", 2)
    assert lora_b and all(torch.count_nonzero(w) == 0 for w in lora_b)
    assert not torch.allclose(projector, initial)
    lora_b, _ = trained("after", 3)
    assert any(torch.count_nonzero(w) > 0 for w in lora_b)


def test_item_projector_warmup_needs_item_embeddings():
    import argparse

    from prefrec.train.config import config_from_args

    args = argparse.Namespace(data="x", out="y", item_embeddings="none",
                              item_projector_warmup_steps=10)
    with pytest.raises(PrefrecError, match="--item-projector-warmup-steps 10"):
        config_from_args(SFTConfig, args)


def test_spectral_item_vectors_reproduce_the_similarity_graph():
    """v_i . v_j equals the symmetrised similarity when every non-negative eigenvalue is
    kept, and is the best rank-d approximation of it (Eckart-Young) when fewer are."""
    import numpy as np
    import scipy.sparse as sp

    from prefrec.baselines.itemknn import spectral_item_vectors

    rng = np.random.default_rng(0)
    factors = rng.random((6, 3))
    psd = factors @ factors.T  # rank 3, positive semi-definite
    # item-kNN's graph is not symmetric once each item keeps its top neighbours: here the
    # whole graph sits above the diagonal, and averaging it with its transpose gives psd back
    one_sided = sp.csr_matrix(np.triu(psd, 1) * 2 + np.diag(np.diag(psd)))
    full = spectral_item_vectors(one_sided, dim=6)
    np.testing.assert_allclose(full @ full.T, psd, atol=1e-10)
    top2 = spectral_item_vectors(sp.csr_matrix(psd), dim=2)
    values, vectors = np.linalg.eigh(psd)
    best = vectors[:, -2:] @ np.diag(values[-2:]) @ vectors[:, -2:].T
    np.testing.assert_allclose(top2 @ top2.T, best, atol=1e-10)
    assert top2.shape == (6, 2)
    # negative eigenvalues are dropped: one edge 0 -> 1 keeps only its +1/2 direction
    v = spectral_item_vectors(sp.csr_matrix(([1.0], ([0], [1])), shape=(2, 2)), dim=2)
    np.testing.assert_allclose(v @ v.T, [[0.25, 0.25], [0.25, 0.25]], atol=1e-12)
    # deterministic signs: each vector's largest-magnitude entry is positive
    assert all(top2[np.abs(top2[:, j]).argmax(), j] > 0 for j in range(2))


def test_itemknn_item_vectors_carry_the_graph_and_item_counts():
    from prefrec.baselines.itemknn import ItemKNN
    from prefrec.baselines.items import baskets_from_examples
    from prefrec.item_tokens import fit_item_vectors

    # histories of 3-5 titles, so items differ in how many users hold them
    examples = _cyclic_users(history_len=lambda u: 3 + u % 3, liked_at=5, disliked_at=6)
    keys, vectors = fit_item_vectors(examples, "itemknn", seed=0)
    knn = ItemKNN()
    knn.fit(baskets_from_examples(examples), {})
    assert keys == list(knn.index.keys)
    assert vectors.shape == (len(keys), len(keys) + 1)  # 8 items < 64 dimensions
    counts = torch.log1p(torch.tensor(knn.counts, dtype=torch.float32))
    torch.testing.assert_close(vectors[:, -1], (counts - counts.mean()) / counts.std(),
                               atol=1e-5, rtol=0)
    assert fit_item_vectors(examples, "itemknn", seed=1)[1].equal(vectors)  # no randomness


@pytest.mark.parametrize("source", ["bpr+itemknn", "itemknn+sasrec", "none", "sasrec"])
def test_item_sources_accept_one_or_several_joined(source):
    import argparse

    from prefrec.train.config import config_from_args

    args = argparse.Namespace(data="x", out="y", item_embeddings=source)
    assert config_from_args(SFTConfig, args).item_embeddings == source


@pytest.mark.parametrize("source", ["bpr+bpr", "bpr+none", "knn", "bpr+", ""])
def test_item_sources_reject_unknown_repeated_or_empty_parts(source):
    import argparse

    from prefrec.train.config import config_from_args

    args = argparse.Namespace(data="x", out="y", item_embeddings=source)
    with pytest.raises(PrefrecError, match=f"--item-embeddings {re.escape(source)}: expected"):
        config_from_args(SFTConfig, args)


def test_joined_item_sources_put_their_columns_side_by_side_over_the_union_of_items(monkeypatch):
    import prefrec.item_tokens as item_tokens

    examples = _cyclic_users(history_len=lambda u: 3 + u % 3, liked_at=5, disliked_at=6)
    real_fit = item_tokens.fit_item_vectors

    def fit(examples, source, seed):  # bpr knows items a, b; itemknn knows b, c
        if source == "bpr":
            return ["a", "b"], torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        if source == "itemknn":
            return ["b", "c"], torch.tensor([[5.0], [6.0]])
        return real_fit(examples, source, seed)

    monkeypatch.setattr(item_tokens, "fit_item_vectors", fit)
    keys, vectors = real_fit(examples, "bpr+itemknn", seed=0)
    assert keys == ["a", "b", "c"]
    torch.testing.assert_close(vectors, torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0],
                                                      [0.0, 0.0, 6.0]]))
