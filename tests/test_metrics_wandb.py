"""wandb resumes its run: every start of one run dir (a requeue, a resume) logs to the same wandb
run, whose id the run dir keeps; no network (WANDB_MODE=offline)."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli, step_losses, toy_overrides
from vlm_train.training.metrics import WANDB_ID_FILE, wandb_run_id


def test_the_wandb_id_is_made_once_per_run_dir(tmp_path):
    first = wandb_run_id(tmp_path / "run")
    assert (tmp_path / "run" / WANDB_ID_FILE).read_text().strip() == first
    assert wandb_run_id(tmp_path / "run") == first  # a requeue reads it back
    assert wandb_run_id(tmp_path / "other") != first  # another run dir, another wandb run


@pytest.mark.slow
def test_a_resumed_run_logs_to_the_same_wandb_run(toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    for steps in (2, 4):  # the second start resumes from the first one's step-2 checkpoint
        overrides = toy_overrides(toy_data, run_dir, f"train.max_steps={steps}", "train.save_every=2")
        result = run_cli([*overrides, "wandb.mode=offline"])
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert sorted(step_losses(run_dir)) == [1, 2, 3, 4]
    offline_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))  # offline-run-<time>-<id>
    run_ids = {name.rsplit("-", 1)[1] for name in offline_runs}
    assert len(offline_runs) == 2 and len(run_ids) == 1, offline_runs  # two starts, one wandb run
    assert run_ids == {(run_dir / WANDB_ID_FILE).read_text().strip()}  # the one the run dir keeps
