"""Checkpoint checksums (vlm_train/training/checksums.py) and the choice of the checkpoint to resume
(`checkpoint.resume_checkpoint`), in this process on small folders: manifests `sha256sum -c`
accepts, a flipped byte, a truncated file, a missing file or rank manifest rejected with one line
naming the file and the fallback, every rank agreeing; a folder written before checksums loads
with a warning. The real CLI on damaged DeepSpeed checkpoints: tests/test_checkpoint_async.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from vlm_train.training import checksums
from vlm_train.training.checkpoint import NoUsableCheckpoint, resume_checkpoint

FILES = {  # what a 2-rank ZeRO-1 save holds, in miniature
    0: {"mp_rank_00_model_states.pt": 3000, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 5000, "config.yaml": 40},
    1: {"zero_pp_rank_1_mp_rank_00_optim_states.pt": 5000},
}


def write_checkpoint(root, step: int, manifests: bool = True):
    """A step folder as two ranks write it: files through `write_hashed`, one manifest per rank."""
    folder = root / f"step_{step}"
    folder.mkdir(parents=True)
    for rank, files in FILES.items():
        files = {**files, f"trainer_rank{rank:05d}.pt": 100}
        digests = {
            name: checksums.write_hashed(folder / name, lambda f, n=size: f.write(os.urandom(n)))
            for name, size in files.items()
        }
        if manifests:
            checksums.write_manifest(folder, rank, digests)
    return folder


def make_run(tmp_path, steps=(2, 4, 6), latest: int = 6):
    root = tmp_path / "checkpoints"
    for step in steps:
        write_checkpoint(root, step)
    (root / "latest").write_text(f"step_{latest}")
    return tmp_path


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_manifests_are_what_sha256sum_checks_and_hash_the_written_bytes(tmp_path):
    folder = write_checkpoint(tmp_path, 2)
    for name in sorted(folder.iterdir()):
        if not name.name.startswith(checksums.MANIFEST_PREFIX):
            assert checksums.read_manifests(folder)[name.name] == hashlib.sha256(name.read_bytes()).hexdigest()
    manifests = sorted(p.name for p in folder.glob("SHA256SUMS.rank*"))
    assert manifests == ["SHA256SUMS.rank00000", "SHA256SUMS.rank00001"]
    if shutil.which("sha256sum"):
        done = subprocess.run(["sha256sum", "--strict", "-c", *manifests], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.count(": OK") == 6, done.stdout + done.stderr
    assert not list(folder.glob("*.tmp"))  # every file went through a temporary name


def test_a_good_latest_is_resumed(one_rank, tmp_path, capsys):
    run_dir = make_run(tmp_path)
    assert resume_checkpoint(run_dir) == run_dir / "checkpoints" / "step_6"
    assert capsys.readouterr().err == ""


def test_no_latest_means_a_fresh_start(one_rank, tmp_path):
    write_checkpoint(tmp_path / "checkpoints", 2)  # killed before its first `latest`
    assert resume_checkpoint(tmp_path) is None


def test_a_flipped_byte_falls_back_to_the_previous_checkpoint_in_one_line(one_rank, tmp_path, capsys):
    run_dir = make_run(tmp_path)
    flip_byte(run_dir / "checkpoints" / "step_6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert resume_checkpoint(run_dir) == run_dir / "checkpoints" / "step_4"
    assert capsys.readouterr().err.splitlines() == [
        "vlm-train: warning: checkpoint step_6: optimizer file zero_pp_rank_1_mp_rank_00_optim_states.pt fails "
        "its checksum (flipped or truncated): resuming from step_4 instead"
    ]


def test_truncated_and_flipped_checkpoints_are_both_named_and_skipped(one_rank, tmp_path, capsys):
    run_dir = make_run(tmp_path, steps=(2, 4, 6, 8), latest=6)  # step_8: renamed, `latest` never moved
    truncate(run_dir / "checkpoints" / "step_6" / "mp_rank_00_model_states.pt")
    flip_byte(run_dir / "checkpoints" / "step_4" / "trainer_rank00001.pt")
    assert resume_checkpoint(run_dir) == run_dir / "checkpoints" / "step_2"
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "vlm-train: warning: checkpoint step_6: model file mp_rank_00_model_states.pt fails its checksum (flipped "
        "or truncated); checkpoint step_4: trainer-state file trainer_rank00001.pt fails its checksum (flipped or "
        "truncated): resuming from step_2 instead"
    ]


def test_missing_files_and_missing_manifests_are_named(one_rank, tmp_path, capsys):
    run_dir = make_run(tmp_path)
    (run_dir / "checkpoints" / "step_6" / "config.yaml").unlink()
    (run_dir / "checkpoints" / "step_4" / "SHA256SUMS.rank00001").unlink()
    assert resume_checkpoint(run_dir) == run_dir / "checkpoints" / "step_2"
    err = capsys.readouterr().err
    assert (
        "checkpoint step_6: file config.yaml is missing; checkpoint step_4: checksum list SHA256SUMS.rank00001 is missing"
        in err
    )


def test_no_good_checkpoint_is_one_line_error(one_rank, tmp_path):
    run_dir = make_run(tmp_path, steps=(4, 6))
    truncate(run_dir / "checkpoints" / "step_6" / "trainer_rank00000.pt")
    shutil.rmtree(run_dir / "checkpoints" / "step_4")
    (run_dir / "checkpoints" / "step_2").mkdir()
    (run_dir / "checkpoints" / "step_2" / "SHA256SUMS.rank00000").write_text("not a digest  x\n")  # a damaged list
    with pytest.raises(NoUsableCheckpoint) as caught:
        resume_checkpoint(run_dir)
    message = str(caught.value)
    assert "\n" not in message and NoUsableCheckpoint.same_on_every_rank
    assert message.startswith("checkpoint step_6: trainer-state file trainer_rank00000.pt fails its checksum")
    assert "checkpoint step_2: its checksum list cannot be read" in message
    assert message.endswith(
        f"no complete checkpoint is left in {run_dir / 'checkpoints'} (move the folder away to start the run over)"
    )


def test_a_checkpoint_without_checksums_loads_with_a_warning(one_rank, tmp_path, capsys):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 4, manifests=False)
    (root / "latest").write_text("step_4")
    assert resume_checkpoint(tmp_path) == root / "step_4"
    assert capsys.readouterr().err == (
        "vlm-train: warning: checkpoint step_4 has no checksums (an older vlm_train wrote it): loading it unverified\n"
    )


def test_the_work_is_split_by_size_across_ranks(tmp_path):
    folder = write_checkpoint(tmp_path, 2)
    names = sorted(checksums.read_manifests(folder))
    shares = [checksums.share_of_work(folder, names, rank, 2) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == names
    sizes = [sum((folder / name).stat().st_size for name in share) for share in shares]
    assert abs(sizes[0] - sizes[1]) <= 3000  # the two 5000-byte optimizer files go to different ranks


def test_pruning_removes_folders_after_latest_and_keeps_the_fallbacks(tmp_path):
    """A damaged step_8 skipped by the resume (or one renamed by a save killed before `latest` moved)
    is deleted at the next publish instead of counting among the `train.keep_last` kept."""
    from vlm_train.training.publish import prune

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (root / f"step_{step}").mkdir(parents=True)
    (root / "step_10.partial").mkdir()
    (root / "latest").write_text("step_6")
    prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_4", "step_6"]
