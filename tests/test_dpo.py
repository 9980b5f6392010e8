"""DPO's objective (training/dpo.py) against TRL's formula, its sequence log-probs against per-token
cross-entropy, and its reference model: the policy's weights with the LoRA updates off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import make_batch, toy_model
from vlm_train.models.vlm import IGNORE_INDEX
from vlm_train.training.dpo import dpo_terms, reference_logps, sequence_logps


def trl_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 beta, label_smoothing):  # fmt: skip
    """TRL's DPOTrainer.dpo_loss for loss_type="sigmoid" (trl/trainer/dpo_trainer.py), as written there."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )  # fmt: skip
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


@pytest.mark.parametrize(("beta", "label_smoothing"), [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_loss_rewards_and_gradients_equal_trls(beta, label_smoothing):
    torch.manual_seed(0)
    policy = (torch.randn(16, dtype=torch.float64) * 20 - 40).requires_grad_()
    reference = torch.randn(16, dtype=torch.float64) * 20 - 40
    terms = dpo_terms(policy, reference, beta, label_smoothing)
    (grad,) = torch.autograd.grad(terms.losses_P.mean(), policy)
    trl_policy = policy.detach().clone().requires_grad_()
    expected = trl_dpo_loss(*trl_policy.chunk(2), *reference.chunk(2), beta, label_smoothing)
    (expected_grad,) = torch.autograd.grad(expected[0].mean(), trl_policy)
    for got, want in zip((terms.losses_P, terms.chosen_rewards_P, terms.rejected_rewards_P), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    metrics = terms.metrics()
    chosen, rejected = expected[1], expected[2]
    assert metrics["rewards/accuracies"] == pytest.approx(float((chosen > rejected).double().mean()))
    assert metrics["rewards/margins"] == pytest.approx(float((chosen - rejected).mean()))
    with pytest.raises(ValueError, match="beta > 0"):
        dpo_terms(policy, reference, 0.0)


def test_sequence_logps_sum_the_labelled_tokens_log_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = IGNORE_INDEX  # the prompt
    labels[2, 5:] = IGNORE_INDEX  # padding
    per_token = -F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    torch.testing.assert_close(sequence_logps(logits, labels), per_token.sum(-1), rtol=1e-6, atol=1e-6)


def test_the_reference_is_the_policy_with_its_lora_updates_off():
    """After the updates moved, the reference log-probs are the base model's exactly (no second copy);
    the policy's differ. Without LoRA there is no reference in the model: a one-line error."""
    from vlm_train.data.tokenizer import build_toy_tokenizer
    from vlm_train.models.lora import lora_layers

    tokenizer = build_toy_tokenizer()
    base, policy = toy_model(tokenizer=tokenizer).eval(), toy_model("llm.lora.rank=4", tokenizer=tokenizer).eval()
    with torch.no_grad():
        for _, layer in lora_layers(policy):
            layer.lora.lora_B.weight.normal_(std=0.1)
    pixel_values, input_ids, mask, labels = make_batch(base, tokenizer)
    inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": mask}
    with torch.no_grad():
        expected = sequence_logps(base(**inputs).logits, labels)
        moved = sequence_logps(policy(**inputs).logits, labels)
    assert torch.equal(reference_logps(policy, inputs, labels), expected)
    assert not torch.allclose(moved, expected)
    with pytest.raises(ValueError, match="give vision.lora or llm.lora"):
        reference_logps(base, inputs, labels)


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory):
    from vlm_train.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("preference"), train=512, eval=32, shards=4, seed=2, layout="preference")


def dpo_run(data, run_dir, *extra: str) -> list[str]:
    from tests.helpers import toy_overrides

    return toy_overrides(
        data, run_dir, "experiment=toy-dpo", f"data.urls={data}/train-{{000000..000003}}.tar",
        f"data.eval_urls={data}/eval-000000.tar", "data.eval_samples=32", "train.micro_batch_size=4",
        "train.precision=fp32", *extra,
    )[1:]  # fmt: skip


@pytest.mark.slow
def test_dpo_trains_alike_at_zero_0_and_3_and_reports_rewards_and_held_out_preference(preference_data, tmp_path):
    """objective=dpo on 2 ranks, 8 steps: ZeRO-3's per-step losses equal ZeRO-0's (1e-6 relative); the
    first step's loss is log 2 with zero rewards (the policy is its reference); every step logs TRL's
    reward metrics; the run ends with the held-out preference accuracy of policy and reference."""
    from tests.helpers import read_metrics, run_cli, step_losses

    losses = {}
    for stage in (0, 3):
        run_dir = tmp_path / f"zero{stage}"
        extra = ("train.max_steps=8", f"parallel.zero_stage={stage}", "train.eval=true")
        result = run_cli(dpo_run(preference_data, run_dir, *extra), nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[stage] = list(step_losses(run_dir).values())
        records = read_metrics(run_dir)
        first = records[0]
        assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6) and first["rewards/accuracies"] == 0
        assert all("rewards/margins" in r for r in records if "loss" in r)
        final = records[-1]
        assert final["eval_pairs"] == 32 and 0 <= final["eval_reference_preference_accuracy"] <= 1
    assert losses[3] == pytest.approx(losses[0], rel=1e-6, abs=0)


@pytest.mark.slow
def test_the_toy_dpo_run_teaches_the_preference_from_chance(tmp_path):
    """experiment=toy-dpo as a user runs it (300 steps, LoRA on an untrained decoder): on 100 held-out
    pairs the reference prefers the right colour about half the time, the trained policy > 90%."""
    from tests.helpers import read_metrics, run_cli

    data = tmp_path / "data"
    overrides = [
        "experiment=toy-dpo",
        f"run.dir={tmp_path / 'run'}",
        f"data.synthetic_dir={data}",
        "data.eval_samples=100",
    ]
    result = run_cli(overrides, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    final = read_metrics(tmp_path / "run")[-1]
    assert final["eval_pairs"] == 100 and final["eval_preference_accuracy"] > 0.9, final
    assert 0.3 < final["eval_reference_preference_accuracy"] < 0.7, final


def test_with_full_tuning_the_reference_is_a_frozen_copy_of_the_initial_model():
    """More than LoRA trains (here the whole decoder and connector): the reference is a frozen copy made
    before training, whose log-probs stay the initial model's while the policy moves."""
    from vlm_train.data.tokenizer import build_toy_tokenizer
    from vlm_train.training.dpo import frozen_reference, needs_reference_copy

    tokenizer = build_toy_tokenizer()
    policy = toy_model(tokenizer=tokenizer).eval()
    assert needs_reference_copy(policy)
    assert not needs_reference_copy(toy_model("llm.lora.rank=4", "connector.freeze=true", tokenizer=tokenizer))
    frozen = frozen_reference(policy, torch.device("cpu"), torch.float32)
    pixel_values, input_ids, mask, labels = make_batch(policy, tokenizer)
    inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": mask}
    with torch.no_grad():
        initial = sequence_logps(policy(**inputs).logits, labels)
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        assert not torch.allclose(sequence_logps(policy(**inputs).logits, labels), initial)
    assert torch.equal(reference_logps(policy, inputs, labels, frozen), initial)
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.slow
def test_full_tuning_dpo_trains_alike_at_zero_0_and_2_and_zero_3_is_refused(preference_data, tmp_path):
    """objective=dpo with the connector and the decoder trained fully (a frozen reference copy): the
    same per-step losses at ZeRO-0 and ZeRO-2 on 2 ranks, log 2 at step 1; ZeRO-3 (which would not
    shard the copy) stops at start in one line."""
    from tests.helpers import run_cli, step_losses

    full = ("llm.lora.rank=0", "connector.freeze=false", "dpo.beta=0.5", "train.max_steps=6", "train.eval=false")
    losses = {}
    for stage in (0, 2):
        run_dir = tmp_path / f"zero{stage}"
        result = run_cli(dpo_run(preference_data, run_dir, *full, f"parallel.zero_stage={stage}"), nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[stage] = list(step_losses(run_dir).values())
    assert losses[0][0] == pytest.approx(0.6931471805599453, abs=1e-6) and losses[0][-1] != losses[0][0]
    assert losses[2] == pytest.approx(losses[0], rel=1e-6, abs=0)
    result = run_cli(dpo_run(preference_data, tmp_path / "zero3", *full, "parallel.zero_stage=3"))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        "vlm-train: error: objective=dpo"
    )
