"""bench/gpu.py --smoke on CPU: both sides (vlm_train's Trainer and the plain transformers + DeepSpeed
loop) train the toy on the same batches from the same weights, so the script that is meant to run
on a GPU the first time it gets one has run everything but its CUDA calls here."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # fresh processes that import DeepSpeed and train two sides: ~30 s each on 2 cores

SIDES = ("vlm_train", "baseline")


def smoke_output(*flags: str) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, whatever the machine
    command = [sys.executable, "bench/gpu.py", "--smoke", *flags]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"gpu.py --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def table(out: str) -> dict[str, dict[str, str]]:
    """The Markdown table's rows by their first cell, each a {column: cell} dict."""
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]
    return {cells[0]: dict(zip(header, cells)) for cells in rows}


@pytest.mark.parametrize("stage", [1, 2], ids=["stage1-projector", "stage2-decoder"])
def test_gpu_smoke_runs_both_sides_on_the_same_batches_and_weights(stage):
    out = smoke_output("--stage", str(stage))
    assert out.startswith("## GPU\n") and f"`python bench/gpu.py --smoke --stage {stage}` on " in out, out[-3000:]
    rows = table(out)
    assert set(rows) == {*SIDES, "vlm_train / baseline"}, out[-3000:]
    for side in SIDES:
        row = rows[side]
        assert float(row["tokens/s"]) > 0 and float(row["samples/s"]) > 0, row
        assert 0 < float(row["MFU"].rstrip("%")) < 100, row  # against the measured CPU matmul peak
        phases = sum(float(row[phase]) for phase in ("data wait", "forward", "backward", "optimizer"))
        assert 0 < phases <= float(row["ms/step"]) * 1.01, row
        assert row["peak GB"] == "n/a", row  # GPU memory only
    vlm, base = rows["vlm_train"], rows["baseline"]
    assert int(vlm["tokens"]) == int(base["tokens"]) > 0, (vlm, base)  # the same number of tokens trained
    # same initial weights, same first batch, fp32: the two sides' first losses agree to rounding,
    # and so do the later ones (the same updates; a baseline that skipped its optimizer would drift)
    assert abs(float(vlm["first loss"]) - float(base["first loss"])) < 1e-5, (vlm, base)
    drift = re.search(r"Losses, step by step \(.*\): max \|difference\| (\S+) over 4 steps\.", out)
    assert drift and float(drift.group(1)) < 1e-5, out[-2000:]
    ratio = re.search(r"\*\*vlm_train / baseline: (\d+\.\d+)x tokens/s\*\*", out)
    assert ratio and 0 < float(ratio.group(1)) < 100, out[-2000:]
    assert rows["vlm_train / baseline"]["tokens/s"] == f"{float(ratio.group(1)):.3f}x"
    assert re.search(r"Same batches on both sides: yes \((\d+) and \1 taken", out), out[-2000:]
    assert re.search(r"Trainable parameters: vlm_train ([\d,]+), baseline \1\.", out), out[-2000:]
    assert "section of" not in out and str(REPO / "docs") not in out  # --smoke writes nothing
