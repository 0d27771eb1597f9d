"""Preference losses: hand-computed values, equivalences, masking, and TRL's DPO as reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from prefrec.errors import PrefrecError
from prefrec.losses import (
    PREFERENCE_LOSSES,
    SAME_AT_ONE_NEGATIVE,
    combined_loss,
    dmpo_loss,
    dpo_loss,
    sdpo_loss,
    sft_loss,
)

LOSS_NAMES = sorted(PREFERENCE_LOSSES)


# --- scalar references written with math, independent of torch ---------------------------


def softplus(x: float) -> float:
    """log(1 + e^x) = -log sigmoid(-x), stable for any x."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def log1p_sum_exp(gaps: list[float]) -> float:
    """log(1 + sum_i e^{d_i}), stable for any d_i (the S-DPO loss in gap form)."""
    top = max([0.0, *gaps])
    return top + math.log(math.exp(-top) + sum(math.exp(d - top) for d in gaps))


def leaves(*rows, dtype=torch.float64):
    """Tensors that require grad, from nested lists."""
    return [torch.tensor(r, dtype=dtype, requires_grad=True) for r in rows]


def loss_and_grads(loss_fn, policy_chosen, policy_rejected, ref_chosen, ref_rejected, **kw):
    pc, pr = (t.detach().clone().requires_grad_(True) for t in (policy_chosen, policy_rejected))
    out = loss_fn(pc, pr, ref_chosen, ref_rejected, **kw)
    out.losses.sum().backward()
    return out, pc.grad, pr.grad


# --- the three losses agree where they should ----------------------------------------------


def test_k1_all_losses_equal_dpo_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    pc, rc = torch.randn(6, generator=gen) * 5, torch.randn(6, generator=gen) * 5
    pr, rr = torch.randn(6, 1, generator=gen) * 5, torch.randn(6, 1, generator=gen) * 5
    ref_out, ref_gc, ref_gr = loss_and_grads(dpo_loss, pc, pr, rc, rr, beta=0.3)
    # The pairwise DPO loss itself, by hand: -log sigmoid(beta * (dc - dr)).
    for b in range(6):
        margin = 0.3 * ((pc[b] - rc[b]) - (pr[b, 0] - rr[b, 0])).item()
        assert ref_out.losses[b].item() == pytest.approx(softplus(-margin), rel=1e-5)
    # The runner trains these once at K=1 (model_aliases), so every member must match.
    for name in SAME_AT_ONE_NEGATIVE:
        out, gc, gr = loss_and_grads(PREFERENCE_LOSSES[name], pc, pr, rc, rr, beta=0.3)
        torch.testing.assert_close(out.losses, ref_out.losses)
        torch.testing.assert_close(gc, ref_gc)
        torch.testing.assert_close(gr, ref_gr)


def test_dpo_matches_trl_dpo_trainer_sigmoid_loss(tiny_llama, tmp_path):
    """K=1: our dpo loss on our own log-probs equals TRL's DPOTrainer (loss_type sigmoid),
    and so do the gradients with respect to every policy parameter."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, tokenizer = tiny_llama
    ref = copy.deepcopy(policy)  # a frozen reference that differs from the policy
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    data = Dataset.from_dict(
        {
            "prompt": [
                "Here is the user's history <Title:Toy Story (1995)> Rank",
                "### Instruction: movie recommendations",
                "You are an assistant working on",
            ],
            "chosen": [" <Title:Heat (1995)>", " Toy Story", " movie"],
            "rejected": [" <Title:Toy Story (1995)> ,", " Heat (1995) Rank", " recommendations"],
        }
    )
    beta = 0.7
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=beta,
        loss_type=["sigmoid"],
        per_device_train_batch_size=3,
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    trainer = DPOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer
    )
    assert not trainer.precompute_ref_logps  # TRL runs our ref model itself
    batch = next(iter(trainer.get_train_dataloader()))  # rows: [chosen..., rejected...]
    params = [p for p in policy.parameters() if p.requires_grad]

    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_grads = torch.autograd.grad(trl_loss, params)

    def completion_logps(model):
        ids, completion = batch["input_ids"], batch["completion_mask"][:, 1:]
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]
        token_logps = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])
        return (token_logps.squeeze(-1) * completion).sum(-1).chunk(2)

    policy_chosen, policy_rejected = completion_logps(policy)
    with torch.no_grad():
        ref_chosen, ref_rejected = completion_logps(ref)
    ours = dpo_loss(
        policy_chosen, policy_rejected[:, None], ref_chosen, ref_rejected[:, None], beta=beta
    )
    our_loss = ours.losses.mean()
    our_grads = torch.autograd.grad(our_loss, params)

    assert abs(trl_loss.item() - math.log(2)) > 1e-3  # the rewards are not all zero
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert len(our_grads) == len(trl_grads)
    for ours_g, trl_g in zip(our_grads, trl_grads, strict=True):
        torch.testing.assert_close(ours_g, trl_g, rtol=1e-4, atol=1e-6)


# --- hand-computed values at K = 3 ------------------------------------------------------------

# beta = 0.5; r_w = 0.5 * (-10 - -12) = 1.0; r_l = 0.5 * ([-11, -9, -14] - -10) = [-0.5, 0.5, -2].
BETA = 0.5
HAND = ([-10.0], [[-11.0, -9.0, -14.0]], [-12.0], [[-10.0, -10.0, -10.0]])
R_W, R_L = 1.0, [-0.5, 0.5, -2.0]


def test_dmpo_hand_computed_k3():
    pc, pr, rc, rr = leaves(*HAND)
    out = dmpo_loss(pc, pr, rc.detach(), rr.detach(), beta=BETA)
    out.losses.sum().backward()
    z = R_W - sum(R_L) / 3  # = 5/3
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-5 / 3)), rel=1e-12)
    dl_dz = -1 / (1 + math.exp(z))  # d/dz of -log sigmoid(z)
    assert pc.grad.item() == pytest.approx(BETA * dl_dz, rel=1e-12)
    assert pr.grad[0].tolist() == pytest.approx([-BETA * dl_dz / 3] * 3, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(R_W)
    assert out.rejected_rewards[0].tolist() == pytest.approx(R_L)


def test_sdpo_hand_computed_k3():
    pc, pr, rc, rr = leaves(*HAND)
    out = sdpo_loss(pc, pr, rc.detach(), rr.detach(), beta=BETA)
    out.losses.sum().backward()
    # -log sigmoid(-log S) = log(1 + S), S = sum_i exp(r_l_i - r_w) = e^-1.5 + e^-0.5 + e^-3.
    s = math.exp(-1.5) + math.exp(-0.5) + math.exp(-3.0)
    assert out.losses.item() == pytest.approx(math.log(1 + s), rel=1e-12)
    # dL/dr_l_i = exp(r_l_i - r_w) / (1 + S), dL/dr_w = -S / (1 + S); then times beta.
    assert pc.grad.item() == pytest.approx(-BETA * s / (1 + s), rel=1e-12)
    expected = [BETA * math.exp(r - R_W) / (1 + s) for r in R_L]
    assert pr.grad[0].tolist() == pytest.approx(expected, rel=1e-12)


def test_dpo_hand_computed_k3_and_label_smoothing():
    pc, pr, rc, rr = leaves(*HAND)
    out = dpo_loss(pc, pr, rc, rr, beta=BETA)
    pair = [math.log1p(math.exp(r - R_W)) for r in R_L]  # -log sigmoid(r_w - r_l_i)
    assert out.losses.item() == pytest.approx(sum(pair) / 3, rel=1e-12)

    smoothed = dpo_loss(pc, pr, rc, rr, beta=BETA, label_smoothing=0.1)
    cdpo = [0.9 * math.log1p(math.exp(r - R_W)) + 0.1 * math.log1p(math.exp(R_W - r)) for r in R_L]
    assert smoothed.losses.item() == pytest.approx(sum(cdpo) / 3, rel=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)


# --- extreme rewards ------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_extreme_rewards_give_finite_exact_losses_and_gradients(name):
    beta = 50.0
    # Log-prob gaps of +-1e4 with beta = 50: reward gaps of +-5e5, far beyond exp's range.
    policy_chosen = torch.zeros(3)
    policy_rejected = torch.tensor(
        [[1e4, -1e4, 1e4], [-1e4, -1e4, -1e4], [1e4, 1e4, 1e4]], dtype=torch.float32
    )
    zeros = torch.zeros(3), torch.zeros(3, 3)
    out, gc, gr = loss_and_grads(
        PREFERENCE_LOSSES[name], policy_chosen, policy_rejected, *zeros, beta=beta
    )
    for t in (out.losses, gc, gr):
        assert torch.isfinite(t).all()
    gaps = (beta * policy_rejected).tolist()  # r_l_i - r_w, since r_w = 0
    if name == "dpo":
        expected = [sum(softplus(d) for d in row) / 3 for row in gaps]
    elif name == "dmpo":
        expected = [softplus(sum(row) / 3) for row in gaps]
    else:
        expected = [log1p_sum_exp(row) for row in gaps]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # The group whose negatives all lose by far has no gradient; in the others the losing
    # side gets the whole slope beta, split as the loss's mean or softmax dictates.
    b = beta
    expected_grads = {
        "dpo": ([-2 * b / 3, 0.0, -b], [[b / 3, 0.0, b / 3], [0.0] * 3, [b / 3] * 3]),
        "dmpo": ([-b, 0.0, -b], [[b / 3] * 3, [0.0] * 3, [b / 3] * 3]),
        "sdpo": ([-b, 0.0, -b], [[b / 2, 0.0, b / 2], [0.0] * 3, [b / 3] * 3]),
    }[name]
    # float32 spaces numbers near 5e5 by 1/32, so logsumexp's backward exp(d - lse) is off
    # by up to ~3% here; the point is the right split, and no nan or inf.
    assert gc.tolist() == pytest.approx(expected_grads[0], rel=0.05)
    for row, expected_row in zip(gr.tolist(), expected_grads[1], strict=True):
        assert row == pytest.approx(expected_row, rel=0.05)


# --- structure: equal negatives, permutations, masking -------------------------------------------


def test_sdpo_with_k_equal_negatives_is_dpo_shifted_by_log_k():
    k, beta = 4, 0.8
    pc, rc = torch.tensor([-3.0, -7.0]), torch.tensor([-4.0, -6.5])
    pr = torch.tensor([[-5.0] * k, [-2.0] * k])
    rr = torch.tensor([[-5.5] * k, [-4.0] * k])
    out = sdpo_loss(pc, pr, rc, rr, beta=beta)
    for b in range(2):
        r_w = beta * (pc[b] - rc[b]).item()
        r_l = beta * (pr[b, 0] - rr[b, 0]).item()
        # -log sigmoid(-(log K + r_l - r_w))
        expected = -math.log(1 / (1 + math.exp(math.log(k) + r_l - r_w)))
        assert out.losses[b].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_losses_are_invariant_to_the_order_of_negatives(name):
    gen = torch.Generator().manual_seed(3)
    pc, rc = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    pr, rr = torch.randn(4, 5, generator=gen) * 3, torch.randn(4, 5, generator=gen) * 3
    perm = torch.tensor([3, 0, 4, 2, 1])
    loss_fn = PREFERENCE_LOSSES[name]
    out, gc, gr = loss_and_grads(loss_fn, pc, pr, rc, rr, beta=0.5)
    out_p, gc_p, gr_p = loss_and_grads(loss_fn, pc, pr[:, perm], rc, rr[:, perm], beta=0.5)
    torch.testing.assert_close(out_p.losses, out.losses)
    torch.testing.assert_close(gc_p, gc)
    torch.testing.assert_close(gr_p, gr[:, perm])


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("padding", [1e6, float("inf"), float("nan")])
def test_masked_negatives_do_not_contribute(name, padding):
    """Group 0 has 2 real negatives padded to K=3 with an absurd log-prob; group 1 has 3."""
    loss_fn = PREFERENCE_LOSSES[name]
    pc, rc = torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -5.0])
    pr = torch.tensor([[-6.0, -3.0, padding], [-7.0, -2.0, -5.0]])
    rr = torch.tensor([[-5.0, -5.0, 0.0], [-5.0, -5.0, -5.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out, gc, gr = loss_and_grads(loss_fn, pc, pr, rc, rr, beta=0.5, mask=mask)
    alone, gc_alone, gr_alone = loss_and_grads(
        loss_fn, pc[:1], pr[:1, :2], rc[:1], rr[:1, :2], beta=0.5
    )
    full, _, gr_full = loss_and_grads(loss_fn, pc[1:], pr[1:], rc[1:], rr[1:], beta=0.5)
    torch.testing.assert_close(out.losses, torch.cat([alone.losses, full.losses]))
    assert gr[0, 2].item() == 0.0  # the padded negative gets no gradient, not even nan
    torch.testing.assert_close(gr[0, :2], gr_alone[0])
    torch.testing.assert_close(gr[1], gr_full[0])
    torch.testing.assert_close(gc[:1], gc_alone)
    assert out.margins[0].item() == pytest.approx(alone.margins.item())
    assert out.reward_accuracies[0].item() == pytest.approx(alone.reward_accuracies.item())


def test_a_group_without_negatives_and_bad_shapes_are_refused():
    pc, rc, pr, rr = torch.zeros(2), torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3)
    empty_group = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="at least one unmasked negative"):
        dmpo_loss(pc, pr, rc, rr, mask=empty_group)
    with pytest.raises(ValueError, match=r"policy_rejected must be \[B, K\]"):
        sdpo_loss(pc, pr[:, 0], rc, rr[:, 0])
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        dpo_loss(pc, pr, rc, rr, mask=torch.ones(2, 3))


def test_reward_statistics_margin_and_share_of_negatives_beaten():
    pc, rc = torch.tensor([-10.0]), torch.tensor([-12.0])  # r_w = 1.0 at beta 0.5
    pr = torch.tensor([[-11.0, -9.0, -6.0]], requires_grad=True)  # r_l = [-0.5, 0.5, 2.0]
    rr = torch.full((1, 3), -10.0)
    out = dmpo_loss(pc, pr, rc, rr, beta=0.5)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.margins.item() == pytest.approx(1.0 - 2.0 / 3)
    assert out.reward_accuracies.item() == pytest.approx(2 / 3)
    masked = dmpo_loss(pc, pr, rc, rr, beta=0.5, mask=torch.tensor([[True, True, False]]))
    assert masked.margins.item() == pytest.approx(1.0)
    assert masked.reward_accuracies.item() == pytest.approx(1.0)


def test_low_precision_log_probs_are_scored_in_float32():
    pc = torch.tensor([-10.0], dtype=torch.bfloat16)
    pr = torch.tensor([[-11.0]], dtype=torch.bfloat16)
    out = dpo_loss(pc, pr, pc.float(), pr.float(), beta=0.1)
    assert out.losses.dtype == torch.float32


# --- the SFT term and the combined objective ----------------------------------------------------


def test_sft_loss_is_mean_nll_per_completion_token():
    logps = torch.tensor([-6.0, -3.0, 0.0])
    n_tokens = torch.tensor([3, 2, 0])
    assert sft_loss(logps, n_tokens).tolist() == pytest.approx([2.0, 1.5, 0.0])


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_combined_loss_adds_ftx_times_sft(name):
    pc, pr, rc, rr = leaves([-6.0, -3.0], [[-7.0, -5.0], [-2.0, -4.0]], [-5.0, -3.5], [[-6.0] * 2] * 2)
    n_tokens = torch.tensor([3, 2])
    plain = combined_loss(name, pc, pr, rc.detach(), rr.detach(), beta=0.5)
    assert plain.sft_losses is None
    assert plain.loss.item() == pytest.approx(plain.preference.losses.mean().item())
    (grad_plain,) = torch.autograd.grad(plain.loss, pc)

    ftx = 0.7
    mixed = combined_loss(
        name, pc, pr, rc.detach(), rr.detach(), beta=0.5, ftx=ftx, chosen_n_tokens=n_tokens
    )
    pref = mixed.preference.losses.tolist()
    # sft = [6/3, 3/2]; mean over B = 2 groups of pref + ftx * sft.
    expected = (pref[0] + ftx * 2.0 + pref[1] + ftx * 1.5) / 2
    assert mixed.loss.item() == pytest.approx(expected, rel=1e-12)
    assert mixed.sft_losses.tolist() == pytest.approx([2.0, 1.5])
    # d/d logp_w of ftx * -(logp_w / n) / B is -ftx / (n * B).
    (grad_mixed,) = torch.autograd.grad(mixed.loss, pc)
    assert (grad_mixed - grad_plain).tolist() == pytest.approx([-ftx / 6, -ftx / 4], rel=1e-12)

    logs = mixed.metrics()
    assert logs["loss"] == pytest.approx(expected)
    assert logs["loss/sft"] == pytest.approx(1.75)
    assert logs["rewards/chosen"] == pytest.approx(0.5 * ((-6 + 5) + (-3 + 3.5)) / 2)


def test_combined_loss_refuses_unknown_names_and_missing_lengths():
    pc, pr = torch.zeros(1), torch.zeros(1, 2)
    with pytest.raises(PrefrecError, match="unknown preference loss 'ipo': expected one of dpo"):
        combined_loss("ipo", pc, pr, pc, pr)
    with pytest.raises(ValueError, match="chosen_n_tokens"):
        combined_loss("dpo", pc, pr, pc, pr, ftx=1.0)
