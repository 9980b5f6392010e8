"""The deadline a run stops itself at (vlm_train/training/deadline.py): where it comes from, when a
step is the last one, and the settings a user can get wrong. The stop itself runs end to end in
tests/test_fault.py (torchrun without signal forwarding) and tests/test_launch_twonode.py (Slurm)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from vlm_train.config import compose
from vlm_train.errors import ConfigError
from vlm_train.training.deadline import Deadline, StopAt, parse_time, stop_at, stop_requested_by_file

NOW = 1_800_000_000.0


def test_times_are_read_as_epoch_seconds_or_iso_8601():
    assert parse_time("1800000000", "x") == NOW
    assert parse_time("@1800000000", "x") == NOW
    assert parse_time("2027-01-15T08:00:00+00:00", "x") == datetime(2027, 1, 15, 8, tzinfo=timezone.utc).timestamp()
    assert parse_time("2027-01-15T08:00:00", "x") == datetime(2027, 1, 15, 8).timestamp()  # local time


@pytest.mark.parametrize("text", ["tomorrow", "12:00", "2027-13-01T00:00:00"])
def test_a_time_that_is_not_one_is_a_one_line_error(text):
    with pytest.raises(ConfigError, match=r"train.stop_at=.* is not a time: give epoch seconds or ISO 8601"):
        stop_at(text, None, NOW, environ={})


def test_auto_takes_the_launchers_end_time_then_slurms():
    assert stop_at("auto", None, NOW, environ={}) is None
    slurm = {"SLURM_JOB_END_TIME": str(NOW + 600)}
    assert stop_at("auto", None, NOW, environ=slurm) == StopAt(NOW + 600, "the job's time limit")
    both = {**slurm, "VLM_STOP_AT": str(NOW + 500)}
    assert stop_at("auto", None, NOW, environ=both).epoch == NOW + 500
    assert stop_at("none", None, NOW, environ=both) is None  # switched off


def test_the_earliest_of_stop_at_and_max_minutes_wins():
    env = {"VLM_STOP_AT": str(NOW + 3600)}
    assert stop_at("auto", 30, NOW, environ=env) == StopAt(NOW + 1800, "train.max_minutes=30")
    assert stop_at("auto", 90, NOW, environ=env).source == "the job's time limit"
    explicit = stop_at(str(int(NOW + 100)), 30, NOW, environ=env)
    assert explicit == StopAt(NOW + 100, f"train.stop_at={int(NOW + 100)}")


def test_a_deadline_in_the_past_or_a_non_positive_duration_is_refused():
    with pytest.raises(ConfigError, match=r"train.stop_at=1799999000 has passed"):
        stop_at("1799999000", None, NOW, environ={})
    with pytest.raises(ConfigError, match=r"train.max_minutes=0 must be positive"):
        stop_at("auto", 0, NOW, environ={})


def test_the_last_step_is_the_one_after_which_a_step_a_save_and_the_margin_no_longer_fit():
    clock = [NOW]
    deadline = Deadline(StopAt(NOW + 100, "test"), margin_s=10, clock=lambda: clock[0])
    for seconds in (30.0, 5.0, 5.0):  # the longest recent step counts, not the last
        deadline.record_step(seconds)
    deadline.record_save(20)
    deadline.record_save(8)  # the longest save counts
    assert deadline.needed_s() == 30 + 20 + 10
    clock[0] = NOW + 39.9
    assert not deadline.due()
    clock[0] = NOW + 40
    assert deadline.due()
    assert "a step 30.0 s + a save 20.0 s + train.stop_margin_s=10 would not fit" in deadline.reason()
    assert not Deadline(None, margin_s=10).due()


def test_the_longest_step_is_forgotten_after_twenty_steps():
    deadline = Deadline(StopAt(NOW + 100, "test"), margin_s=0, clock=lambda: NOW)
    deadline.record_step(50)
    for _ in range(20):
        deadline.record_step(1)
    assert deadline.needed_s() == 1


def test_the_stop_file_carries_its_reason(tmp_path):
    assert stop_requested_by_file(tmp_path) is None
    (tmp_path / "STOP").write_text("Slurm sent USR1\n")
    assert stop_requested_by_file(tmp_path) == f"{tmp_path}/STOP (Slurm sent USR1)"
    (tmp_path / "STOP").write_text("")
    assert stop_requested_by_file(tmp_path) == f"{tmp_path}/STOP (no reason given)"


def test_the_settings_compose():
    cfg = compose(["experiment=toy", "train.stop_at=2027-01-15T08:00:00", "train.max_minutes=235.5"])
    assert (cfg.train.stop_at, cfg.train.max_minutes, cfg.train.stop_margin_s) == ("2027-01-15T08:00:00", 235.5, 60.0)
    assert compose(["experiment=toy", "train.stop_at=1800000000"]).train.stop_at == "1800000000"
