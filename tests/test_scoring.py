"""Shared-prefix scoring must equal naive per-sequence scoring (values, per-token values,
gradients), and both must equal a hand computation from ``model(input_ids).logits``."""

from __future__ import annotations

import json

import pytest
import torch

from prefrec.data.prompts import model_input
from prefrec.scoring import (
    TokenizedItem,
    common_prefix_length,
    default_group_ids,
    pack_group,
    score_completions,
    tokenize_items,
    tree_attention_mask,
)

TOL = 1e-4

HISTORY = (
    "You are an assistant working on movie recommendations. Here is the user's history "
    " <Title:Toy Story (1995)> ,  <Title:Heat (1995)>  <Title:Toy Story (1995)> "
)


def pairwise_prompt(first: str, second: str, history: str = HISTORY) -> str:
    return model_input(
        f"{history}. Rank the likelihood of the user  <Title:{first}>  and  <Title:{second}> ."
    )


def ordering(first: str, second: str) -> str:
    return f" <Title:{first}> ,  <Title:{second}> "


def both_ways(prompts, completions, **kwargs):
    """Scores of the shared-prefix path and of the naive reference."""
    kwargs.setdefault("per_token", True)
    shared = score_completions(*prompts, completions, shared_prefix=True, **kwargs)
    naive = score_completions(*prompts, completions, shared_prefix=False, **kwargs)
    return shared, naive


def assert_same_scores(shared, naive):
    torch.testing.assert_close(shared.logps, naive.logps, atol=TOL, rtol=0)
    assert torch.equal(shared.n_tokens, naive.n_tokens)
    if shared.token_logps is not None:
        for a, b in zip(shared.token_logps, naive.token_logps, strict=True):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def dmpo_group(first_titles, history=HISTORY):
    """K prompts of one user (same history, another candidate pair), both orderings each."""
    prompts, completions = [], []
    for neg in first_titles:
        prompt = pairwise_prompt("Heat (1995)", neg, history)
        prompts += [prompt, prompt]
        completions += [ordering("Heat (1995)", neg), ordering(neg, "Heat (1995)")]
    return prompts, completions


# ----------------------------------------------------------------- tokenisation, packing


def test_tokenize_items_concatenates_separately_tokenised_ids(tiny_llama):
    _, tok = tiny_llama
    prompt, completion = "### Response:\n", " Heat"
    (item,) = tokenize_items(tok, [prompt], [completion])
    p_ids = tok(prompt)["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"]
    assert item.ids == tuple(p_ids + c_ids + [tok.eos_token_id])
    assert item.n_prompt == len(p_ids)
    (no_eos,) = tokenize_items(tok, [prompt], [completion], add_eos=False)
    assert no_eos.ids == tuple(p_ids + c_ids)


def test_max_length_drops_prompt_tokens_from_the_start(tiny_llama):
    _, tok = tiny_llama
    (full,) = tokenize_items(tok, [HISTORY], [" Heat"])
    (cut,) = tokenize_items(tok, [HISTORY], [" Heat"], max_length=10)
    assert len(cut.ids) == 10
    assert cut.ids == full.ids[-10:]
    assert cut.n_completion == full.n_completion
    with pytest.raises(ValueError, match="leaves no room for the prompt"):
        tokenize_items(tok, [HISTORY], [" Heat"], max_length=full.n_completion)


def test_default_groups_are_runs_of_identical_prompts():
    assert default_group_ids(["a", "a", "b", "a", "a"]) == [0, 0, 1, 2, 2]
    assert common_prefix_length([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 2


def test_pack_group_lays_out_a_prefix_tree_with_each_shared_token_once():
    items = [
        TokenizedItem((1, 2, 3, 4, 7), n_prompt=2),
        TokenizedItem((1, 2, 3, 5, 8), n_prompt=2),
        TokenizedItem((1, 2, 6), n_prompt=2),
    ]
    g = pack_group(items, [0, 1, 2])
    assert g.ids == [1, 2, 3, 4, 7, 5, 8, 6]
    assert g.positions == [0, 1, 2, 3, 4, 3, 4, 2]
    assert g.segments == [0, 0, 1, 2, 2, 3, 3, 4]
    assert g.parents == [-1, 0, 1, 1, 0]
    # Completion tokens at positions 2.. are predicted from the slots of positions 1..
    assert g.predictors == [[1, 2, 3], [1, 2, 5], [1]]
    assert g.targets == [[3, 4, 7], [3, 5, 8], [6]]

    mask = tree_attention_mask(
        torch.tensor([g.segments]), g.ancestors(), torch.tensor([g.positions]), torch.float32
    )
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed[5] == [1, 1, 1, 0, 0, 1, 0, 0]  # token 5 sees 1 2 3 and itself
    assert allowed[6] == [1, 1, 1, 0, 0, 1, 1, 0]  # token 8 sees 1 2 3 5 and itself
    assert allowed[7] == [1, 1, 0, 0, 0, 0, 0, 1]  # token 6 sees 1 2 and itself
    window = tree_attention_mask(
        torch.tensor([g.segments]), g.ancestors(), torch.tensor([g.positions]), torch.float32, 2
    )
    assert (window[0, 0, 6] == 0).int().tolist() == [0, 0, 0, 0, 0, 1, 1, 0]  # positions 3, 4


# ----------------------------------------------------------------- equivalence (tiny Llama)


def test_two_orderings_of_a_pair(tiny_llama):
    prompt = pairwise_prompt("Heat (1995)", "Toy Story (1995)")
    prompts = [prompt, prompt]
    completions = [
        ordering("Heat (1995)", "Toy Story (1995)"),
        ordering("Toy Story (1995)", "Heat (1995)"),
    ]
    shared, naive = both_ways((*tiny_llama, prompts), completions)
    assert_same_scores(shared, naive)
    assert shared.logps[0] != shared.logps[1]


def test_k_prompts_sharing_a_history(tiny_llama):
    prompts, completions = dmpo_group(["Toy Story (1995)", "Heat", "Story"])
    shared, naive = both_ways((*tiny_llama, prompts), completions, group_ids=[7] * 6)
    assert_same_scores(shared, naive)


def test_group_of_one(tiny_llama):
    shared, naive = both_ways(
        (*tiny_llama, [pairwise_prompt("Heat", "Toy")]), [ordering("Heat", "Toy")]
    )
    assert_same_scores(shared, naive)


def test_mixed_batch_of_groups_with_different_lengths(tiny_llama):
    a_prompts, a_comps = dmpo_group(["Toy Story (1995)", "Heat"])
    b_prompts, b_comps = dmpo_group(["Toy"], history="Here is the user's history  <Title:Heat> ")
    c_prompts, c_comps = [model_input("Rank")], [" <Title:Heat (1995)> "]
    # Interleaved, non-consecutive group ids; batch_size=2 forces padding and several batches.
    prompts = [a_prompts[0], b_prompts[0], c_prompts[0], *a_prompts[1:], *b_prompts[1:]]
    comps = [a_comps[0], b_comps[0], c_comps[0], *a_comps[1:], *b_comps[1:]]
    groups = ["a", "b", "c", "a", "a", "a", "b"]
    for attn in ("sdpa", "eager"):
        model, tok = tiny_llama
        model.set_attn_implementation(attn)
        shared, naive = both_ways((model, tok, prompts), comps, group_ids=groups, batch_size=2)
        assert_same_scores(shared, naive)
        # Grouping changes the speed, never the result.
        alone = score_completions(model, tok, prompts, comps, group_ids=list(range(len(prompts))))
        torch.testing.assert_close(alone.logps, naive.logps, atol=TOL, rtol=0)


def test_identical_and_nested_sequences_in_one_group(tiny_llama):
    prompt = pairwise_prompt("Heat", "Toy")
    prompts = [prompt] * 3
    comps = [" Heat", " Heat", " Heat Toy"]  # a duplicate, and one extending the other
    shared, naive = both_ways((*tiny_llama, prompts), comps, add_eos=False)
    assert_same_scores(shared, naive)
    assert shared.logps[0] == shared.logps[1]


def test_per_token_logps_sum_to_logps_and_count_completion_tokens(tiny_llama):
    _, tok = tiny_llama
    prompts, completions = dmpo_group(["Toy", "Heat"])
    shared, _ = both_ways((*tiny_llama, prompts), completions)
    for i, comp in enumerate(completions):
        n = len(tok(comp, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        assert shared.n_tokens[i] == n == len(shared.token_logps[i])
        torch.testing.assert_close(shared.token_logps[i].sum(), shared.logps[i])
    torch.testing.assert_close(shared.normalized(), shared.logps / shared.n_tokens)


def test_matches_a_hand_computation_from_model_logits(tiny_llama):
    model, tok = tiny_llama
    prompt, completion = pairwise_prompt("Heat", "Toy"), ordering("Heat", "Toy")
    p_ids = tok(prompt)["input_ids"]
    ids = p_ids + tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    expected = sum(logp[t - 1, ids[t]] for t in range(len(p_ids), len(ids)))
    # Group it with another completion so the prefix path is exercised.
    scores = score_completions(model, tok, [prompt, prompt], [completion, ordering("Toy", "Heat")])
    assert abs(scores.logps[0].item() - expected.item()) < TOL


def test_gradients_equal_the_naive_gradients(tiny_llama):
    model, tok = tiny_llama
    prompts, completions = dmpo_group(["Toy Story (1995)", "Heat", "Story"])
    weights = torch.linspace(-1.0, 2.0, len(prompts))

    def grads(shared_prefix: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        scores = score_completions(
            model,
            tok,
            prompts,
            completions,
            group_ids=[0] * 6,
            shared_prefix=shared_prefix,
            grad=True,
        )
        (weights * scores.logps).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    shared, naive = grads(True), grads(False)
    assert set(shared) == {n for n, _ in model.named_parameters()}
    for name in naive:
        torch.testing.assert_close(shared[name], naive[name], atol=TOL, rtol=0, msg=name)
    assert shared["model.embed_tokens.weight"].abs().sum() > 0


def test_no_grad_by_default(tiny_llama):
    scores = score_completions(*tiny_llama, [pairwise_prompt("Heat", "Toy")], [" Heat"])
    assert not scores.logps.requires_grad


def test_peft_lora_model_scores_and_gradients(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_llama
    # init_lora_weights=False: random B, so the adapters change the scores.
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    prompts, completions = dmpo_group(["Toy", "Heat"])
    lora = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)

    grads = {}
    for shared_prefix in (True, False):
        peft_model.zero_grad()
        scores = score_completions(
            peft_model,
            tok,
            prompts,
            completions,
            group_ids=[0] * 4,
            shared_prefix=shared_prefix,
            grad=True,
        )
        scores.logps.sum().backward()
        grads[shared_prefix] = ({n: p.grad.clone() for n, p in lora.items()}, scores.logps.detach())
    torch.testing.assert_close(grads[True][1], grads[False][1], atol=TOL, rtol=0)
    for name in lora:
        torch.testing.assert_close(grads[True][0][name], grads[False][0][name], atol=TOL, rtol=0)
        assert grads[True][0][name].abs().sum() > 0, name
    with peft_model.disable_adapter(), torch.no_grad():
        base = score_completions(peft_model, tok, prompts, completions)
    assert (base.logps - grads[True][1]).abs().max() > 1e-3  # the adapters were active


def test_sliding_window_layers_match_naive(tiny_tokenizer):
    """Gemma 3 style: sliding-window layers get a window built from logical positions."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=1024,
    )
    model = Gemma3ForCausalLM(config).float().eval()
    prompts, completions = dmpo_group(["Toy", "Heat"])
    shared, naive = both_ways((model, tiny_tokenizer, prompts), completions, group_ids=[0] * 4)
    assert_same_scores(shared, naive)


def test_dense_mask_attention_is_required(tiny_llama):
    model, tok = tiny_llama
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="shared_prefix=False"):
        score_completions(model, tok, ["Rank"], [" Heat"])


# ----------------------------------------------------------------- the real embedded model


@pytest.mark.embedded
def test_real_smollm2_on_dmpo_ml1m_groups(embedded_model, shared_data):
    model, tok = embedded_model
    rows = json.loads((shared_data / "dmpo" / "rec_data_ml_1m_dpo_ranking_3.json").read_text())
    prompts, completions, groups = [], [], []
    for user in range(2):  # rows 3u..3u+2 are one user's K=3 prompts
        for row in rows[3 * user : 3 * user + 3]:
            for completion in row["output"]:
                prompts.append(model_input(row["instruction"]))
                completions.append(completion)
                groups.append(user)
    shared, naive = both_ways((model, tok, prompts), completions, group_ids=groups)
    assert_same_scores(shared, naive)
    assert shared.logps.max() < 0
