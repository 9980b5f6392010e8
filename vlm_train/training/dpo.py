"""Direct Preference Optimization (Rafailov et al., 2023) for VLMs: the loss, as TRL's DPOTrainer
computes it (`loss_type="sigmoid"`, with conservative DPO's `label_smoothing`), the metrics TRL logs,
and the reference model's log-probabilities from the same weights with every LoRA update disabled.

A pair is one prompt (image + question) with a chosen and a rejected reply. Each reply's
log-probability is the sum of its tokens' log-probabilities (TRL's `concatenated_forward`); with
pi the policy and ref the reference,

    logits = (pi(chosen) - pi(rejected)) - (ref(chosen) - ref(rejected))
    loss   = -(1 - eps) log sigmoid(beta logits) - eps log sigmoid(-beta logits)
    reward = beta (pi(reply) - ref(reply))     (chosen and rejected; detached)

Legend: P pairs, B rows (2P: the chosen replies, then the rejected ones), T tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlm_train.models.decoder import IGNORE_INDEX
from vlm_train.models.lora import lora_disabled, lora_layers


@dataclass(frozen=True)
class DPOTerms:
    losses_P: torch.Tensor  # per pair, differentiable through the policy's log-probs
    chosen_rewards_P: torch.Tensor
    rejected_rewards_P: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """The batch means TRL logs under these names."""
        chosen, rejected = self.chosen_rewards_P, self.rejected_rewards_P
        return {
            "rewards/chosen": float(chosen.mean()),
            "rewards/rejected": float(rejected.mean()),
            "rewards/margins": float((chosen - rejected).mean()),
            "rewards/accuracies": float((chosen > rejected).float().mean()),
        }


def sequence_logps(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Each row's summed next-token log-probability of its labelled tokens [B] (fp32)."""
    labels = labels_BT[:, 1:]
    labelled_BT = labels != IGNORE_INDEX
    logps_BTV = F.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    token_logps = logps_BTV.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * labelled_BT).sum(-1)


def dpo_terms(
    policy_logps_B: torch.Tensor, reference_logps_B: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> DPOTerms:
    """The DPO loss per pair and the rewards, from the chosen-then-rejected rows' log-probs."""
    if not beta > 0 or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"DPO needs beta > 0 and 0 <= label_smoothing < 0.5 (got {beta}, {label_smoothing})")
    policy_chosen, policy_rejected = policy_logps_B.chunk(2)
    reference_chosen, reference_rejected = reference_logps_B.detach().chunk(2)
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return DPOTerms(losses, chosen_rewards, rejected_rewards)


@torch.no_grad()
def reference_logps(model: Any, inputs: dict[str, Any], labels_BT: torch.Tensor) -> torch.Tensor:
    """The reference model's log-probs of the rows: the policy's own weights with every LoRA update
    off (no second copy in memory). A model without LoRA has no reference inside it."""
    if not lora_layers(model):
        raise ValueError("objective=dpo takes its reference from the base weights: give vision.lora or llm.lora")
    with lora_disabled(model):
        logits_BTV = model(**inputs).logits
    return sequence_logps(logits_BTV, labels_BT)
