"""Direct Preference Optimization (Rafailov et al., 2023) for VLMs: the loss, as TRL's DPOTrainer
computes it (`loss_type="sigmoid"`, with conservative DPO's `label_smoothing`), the metrics TRL logs,
and the reference model's log-probabilities from the same weights with every LoRA update disabled
(or, when more than LoRA trains, from a frozen copy of the model as built).

A pair is one prompt (image + question) with a chosen and a rejected reply. Each reply's
log-probability is the sum of its tokens' log-probabilities (TRL's `concatenated_forward`); with
pi the policy and ref the reference,

    logits = (pi(chosen) - pi(rejected)) - (ref(chosen) - ref(rejected))
    loss   = -(1 - eps) log sigmoid(beta logits) - eps log sigmoid(-beta logits)
    reward = beta (pi(reply) - ref(reply))     (chosen and rejected; detached)

Legend: P pairs, B rows (2P: the chosen replies, then the rejected ones), T tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlm_train.models.decoder import IGNORE_INDEX
from vlm_train.models.lora import lora_disabled, lora_updates


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
    """Each row's summed next-token log-probability of its labelled tokens [B] (fp32; only the N
    labelled positions are taken to fp32, as token_cross_entropy does)."""
    labels_BT = labels_BT[:, 1:]
    labelled_BT = labels_BT != IGNORE_INDEX
    logits_NV = logits_BTV[:, :-1][labelled_BT].float()
    token_logps_N = -F.cross_entropy(logits_NV, labels_BT[labelled_BT], reduction="none")
    rows_N = labelled_BT.nonzero()[:, 0]
    return torch.zeros(len(labels_BT), device=logits_BTV.device).index_add(0, rows_N, token_logps_N)


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
def reference_logps(
    model: Any, inputs: dict[str, Any], labels_BT: torch.Tensor, frozen: Any | None = None
) -> torch.Tensor:
    """The reference model's log-probs of the rows: a `frozen` copy of the initial model when one is
    given (full tuning), else the policy's own weights with every LoRA update off (no second copy)."""
    if frozen is not None:
        return sequence_logps(frozen(**inputs).logits, labels_BT)
    if not lora_updates(model):
        raise ValueError("objective=dpo takes its reference from the base weights: give vision.lora or llm.lora")
    with lora_disabled(model):
        logits_BTV = model(**inputs).logits
    return sequence_logps(logits_BTV, labels_BT)


def needs_reference_copy(model: Any) -> bool:
    """Whether anything but LoRA updates trains: then LoRA-off weights are not the initial model."""
    return any(p.requires_grad and ".lora." not in name for name, p in model.named_parameters())


def frozen_reference(model: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A frozen copy of the model as built (the initial policy), on `device` in the run's `dtype`."""
    import copy

    reference = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    reference.requires_grad_(False)
    return reference


def pairs_first(rows_B: torch.Tensor) -> torch.Tensor:
    """Rows as the loader lays pairs out (chosen, rejected, chosen, ...) -> all chosen, then all rejected."""
    return rows_B.view(-1, 2).t().flatten()


def labelled_pairs(labels_BT: torch.Tensor) -> torch.Tensor:
    """[P] bool: pairs whose chosen row has labels (a skipped sample's stand-in has none)."""
    return (labels_BT[0::2, 1:] != IGNORE_INDEX).any(-1)


STATS = ("pairs", "chosen", "rejected", "correct")  # what `dpo_forward` sums, in this order


def dpo_forward(
    engine: Any, inputs: dict[str, Any], cfg: Any, frozen: Any | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch of pairs: the summed DPO loss of its labelled pairs (differentiable), and
    [pairs, sum of chosen rewards, sum of rejected rewards, pairs whose chosen reward is higher]."""
    labels_BT = inputs["labels"]
    inputs = {name: value for name, value in inputs.items() if name != "labels"}
    reference_B = pairs_first(reference_logps(engine.module, inputs, labels_BT, frozen))
    policy_B = pairs_first(sequence_logps(engine(**inputs).logits, labels_BT))
    terms = dpo_terms(policy_B, reference_B, cfg.beta, cfg.label_smoothing)
    valid_P = labelled_pairs(labels_BT)
    chosen, rejected = terms.chosen_rewards_P * valid_P, terms.rejected_rewards_P * valid_P
    correct = (terms.chosen_rewards_P > terms.rejected_rewards_P) & valid_P
    stats = torch.stack([valid_P.sum(), chosen.sum(), rejected.sum(), correct.sum()]).double()
    return (terms.losses_P * valid_P).sum(), stats


def step_metrics(stats: torch.Tensor) -> dict[str, float]:
    """The step's DPO metrics (TRL's names) from the summed `dpo_forward` stats of all ranks."""
    pairs, chosen, rejected, correct = stats.tolist()
    pairs = max(pairs, 1.0)
    return {
        "rewards/chosen": chosen / pairs,
        "rewards/rejected": rejected / pairs,
        "rewards/margins": (chosen - rejected) / pairs,
        "rewards/accuracies": correct / pairs,
    }


@torch.no_grad()
def preference_accuracy(model: Any, batches: Iterable[dict[str, Any]], frozen: Any | None = None) -> dict[str, float]:
    """Held-out pairs: how often the policy gives the chosen reply a higher log-probability than the
    rejected one, and how often the reference (LoRA off) does."""
    wins = torch.zeros(3, dtype=torch.float64)  # policy, reference, pairs
    for inputs in batches:
        labels_BT = inputs["labels"]
        forward = {name: value for name, value in inputs.items() if name != "labels"}
        policy_P2 = pairs_first(sequence_logps(model(**forward).logits, labels_BT)).view(2, -1)
        reference_P2 = pairs_first(reference_logps(model, forward, labels_BT, frozen)).view(2, -1)
        valid_P = labelled_pairs(labels_BT)
        for index, logps in enumerate((policy_P2, reference_P2)):
            wins[index] += float(((logps[0] > logps[1]) & valid_P).sum())
        wins[2] += float(valid_P.sum())
    policy, reference, pairs = wins.tolist()
    return {
        "eval_preference_accuracy": policy / max(pairs, 1.0),
        "eval_reference_preference_accuracy": reference / max(pairs, 1.0),
        "eval_pairs": int(pairs),
    }
