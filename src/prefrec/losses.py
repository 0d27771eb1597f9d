"""Preference losses (DPO, DMPO, S-DPO) and the SFT ("ftx") term, as pure functions.

Every preference loss reads sequence log-probs (summed over completion tokens) of one
preferred completion and K dispreferred ones per group:

    policy_chosen [B], policy_rejected [B, K], ref_chosen [B], ref_rejected [B, K]

and an optional ``mask`` [B, K] (bool, True = a real negative) for groups padded to K.
Masked negatives contribute nothing to the loss or its gradient. The implicit reward of a
completion is

    r(y|x) = beta * (log pi_theta(y|x) - log pi_ref(y|x)).

Each loss returns a :class:`PreferenceLossOutput` with the unreduced per-group losses and
the (detached) rewards for logging; :func:`combined_loss` reduces over the batch and adds
the SFT term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prefrec.errors import PrefrecError

DEFAULT_BETA = 0.1  # the DPO paper's, TRL's and DMPO's default


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Per-group losses and the implicit rewards behind them.

    ``losses`` [B] carries the gradient; ``chosen_rewards`` [B] and ``rejected_rewards``
    [B, K] are detached (padded entries hold 0); ``mask`` [B, K] marks the real negatives
    (all True when unpadded).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    mask: Tensor

    @property
    def margins(self) -> Tensor:
        """r_w - mean_i r_l_i over the real negatives, per group [B]."""
        return self.chosen_rewards - _masked_mean(self.rejected_rewards, self.mask)

    @property
    def reward_accuracies(self) -> Tensor:
        """Share of a group's real negatives whose reward is below r_w, per group [B]."""
        beaten = (self.chosen_rewards.unsqueeze(-1) > self.rejected_rewards).to(
            self.chosen_rewards.dtype
        )
        return _masked_mean(beaten, self.mask)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the last dim of the entries where ``mask`` is True."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum(-1)
    return total / mask.sum(-1).to(values.dtype)


def _rewards(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Check shapes and return (r_w [B], r_l [B, K], mask [B, K]) in at least float32."""
    if policy_chosen.dim() != 1 or ref_chosen.shape != policy_chosen.shape:
        raise ValueError(
            f"chosen log-probs must both be [B]; got policy {tuple(policy_chosen.shape)}, "
            f"ref {tuple(ref_chosen.shape)}"
        )
    n_groups = policy_chosen.shape[0]
    if policy_rejected.dim() != 2 or policy_rejected.shape[0] != n_groups:
        raise ValueError(
            f"policy_rejected must be [B, K] with B = {n_groups}; got {tuple(policy_rejected.shape)}"
        )
    if ref_rejected.shape != policy_rejected.shape:
        raise ValueError(
            f"ref_rejected {tuple(ref_rejected.shape)} must match policy_rejected {tuple(policy_rejected.shape)}"
        )
    if mask is None:
        mask = torch.ones(policy_rejected.shape, dtype=torch.bool, device=policy_rejected.device)
    elif mask.shape != policy_rejected.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(policy_rejected.shape)}")
    elif not bool(mask.any(-1).all()):
        # Means and logsumexps over no negatives are nan / -inf.
        raise ValueError("every group needs at least one unmasked negative")
    # Log-probs summed over a completion may arrive in bf16; the sigmoid of their difference
    # needs float32 to keep small margins.
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    chosen_rewards = beta * (policy_chosen.to(dtype) - ref_chosen.to(dtype))
    rejected_rewards = beta * (policy_rejected.to(dtype) - ref_rejected.to(dtype))
    # Replace padded rewards before any arithmetic, so that whatever they hold (even inf or
    # nan) never reaches the loss or its gradient: torch.where passes no gradient to them.
    rejected_rewards = torch.where(mask, rejected_rewards, torch.zeros_like(rejected_rewards))
    return chosen_rewards, rejected_rewards, mask


def _output(losses: Tensor, chosen: Tensor, rejected: Tensor, mask: Tensor) -> PreferenceLossOutput:
    return PreferenceLossOutput(losses, chosen.detach(), rejected.detach(), mask)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = DEFAULT_BETA,
    mask: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """DPO, the mean of the K pairwise losses of a group.

        L = (1/K) * sum_i -log sigmoid(r_w - r_l_i)

    With ``label_smoothing`` eps > 0 each pair uses conservative DPO (cDPO), which assumes
    the preference label is flipped with probability eps:

        l_i = -(1 - eps) * log sigmoid(r_w - r_l_i) - eps * log sigmoid(r_l_i - r_w)
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}")
    r_w, r_l, mask = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, mask)
    logits = r_w.unsqueeze(-1) - r_l
    pair_losses = -(1 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing:
        pair_losses = pair_losses - label_smoothing * F.logsigmoid(-logits)
    return _output(_masked_mean(pair_losses, mask), r_w, r_l, mask)


def dmpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = DEFAULT_BETA,
    mask: Tensor | None = None,
) -> PreferenceLossOutput:
    """DMPO: the negatives' rewards are averaged inside the sigmoid.

        L = -log sigmoid(r_w - (1/K) * sum_i r_l_i)
    """
    r_w, r_l, mask = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, mask)
    losses = -F.logsigmoid(r_w - _masked_mean(r_l, mask))
    return _output(losses, r_w, r_l, mask)


def sdpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = DEFAULT_BETA,
    mask: Tensor | None = None,
) -> PreferenceLossOutput:
    """S-DPO (Plackett-Luce with one preferred item against K negatives).

        L = -log sigmoid(-log sum_i exp(r_l_i - r_w))  =  log(1 + sum_i exp(r_l_i - r_w))

    computed with logsumexp, so huge reward gaps neither overflow nor produce nan gradients.
    """
    r_w, r_l, mask = _rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, mask)
    gaps = torch.where(mask, r_l - r_w.unsqueeze(-1), torch.full_like(r_l, float("-inf")))
    losses = -F.logsigmoid(-torch.logsumexp(gaps, dim=-1))
    return _output(losses, r_w, r_l, mask)


def sft_loss(chosen_logps: Tensor, chosen_n_tokens: Tensor) -> Tensor:
    """The ftx term: mean negative log-likelihood per completion token, per group [B].

        L_sft = -(log pi_theta(y_w|x) / |y_w|)
    """
    n_tokens = chosen_n_tokens.to(chosen_logps.dtype).clamp(min=1)  # an empty completion costs 0
    return -(chosen_logps / n_tokens)


def sft_token_mean_loss(logps: Tensor, n_tokens: Tensor) -> Tensor:
    """SFT on a batch of completions: the negative log-likelihood per completion token,
    pooled over the batch (what transformers' causal-LM loss computes from ``labels``).

        L = -(sum_i log pi_theta(y_i|x_i)) / (sum_i |y_i|)
    """
    return -logps.sum() / n_tokens.sum().to(logps.dtype).clamp(min=1)


PreferenceLoss = Callable[..., PreferenceLossOutput]

PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": dpo_loss,
    "dmpo": dmpo_loss,
    "sdpo": sdpo_loss,
}

# With one negative (K = 1) these are one objective, -log sigmoid(r_w - r_l): the mean of
# one pair loss, the mean of one reward and the logsumexp of one gap all reduce to it. The
# same data and seed then train the same adapter, so the runner trains and scores it once
# (prefrec.runner.model_aliases).
SAME_AT_ONE_NEGATIVE = frozenset({"dpo", "dmpo", "sdpo"})


@dataclass(frozen=True)
class CombinedLossOutput:
    """The scalar training loss and the parts it was made of, for logging."""

    loss: Tensor
    preference: PreferenceLossOutput
    sft_losses: Tensor | None  # [B], None when ftx == 0

    def metrics(self) -> dict[str, float]:
        """Batch means as plain floats, named like TRL's DPO logs."""
        pref = self.preference
        logs = {
            "loss": self.loss.item(),
            "loss/preference": pref.losses.mean().item(),
            "rewards/chosen": pref.chosen_rewards.mean().item(),
            "rewards/rejected": _masked_mean(pref.rejected_rewards, pref.mask).mean().item(),
            "rewards/margins": pref.margins.mean().item(),
            "rewards/accuracies": pref.reward_accuracies.mean().item(),
        }
        if self.sft_losses is not None:
            logs["loss/sft"] = self.sft_losses.mean().item()
        return logs


def combined_loss(
    name: str,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = DEFAULT_BETA,
    mask: Tensor | None = None,
    ftx: float = 0.0,
    chosen_n_tokens: Tensor | None = None,
) -> CombinedLossOutput:
    """The preference stage's objective, averaged over the B groups of a batch.

        L = (1/B) * sum_b (L_pref[b] + ftx * L_sft[b])

    ``name`` picks L_pref from :data:`PREFERENCE_LOSSES`; L_sft is :func:`sft_loss` on the
    policy's chosen log-probs, so ``chosen_n_tokens`` [B] is needed when ftx != 0.
    """
    if name not in PREFERENCE_LOSSES:
        raise PrefrecError(
            f"unknown preference loss '{name}': expected one of {', '.join(PREFERENCE_LOSSES)}"
        )
    preference = PREFERENCE_LOSSES[name](
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, mask=mask
    )
    per_group = preference.losses
    sft_losses = None
    if ftx:
        if chosen_n_tokens is None:
            raise ValueError("ftx != 0 needs chosen_n_tokens, the preferred completions' lengths")
        sft_losses = sft_loss(policy_chosen, chosen_n_tokens).to(per_group.dtype)
        per_group = per_group + ftx * sft_losses
    return CombinedLossOutput(per_group.mean(), preference, sft_losses)
