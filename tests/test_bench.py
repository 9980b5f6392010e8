"""Every bench/ script runs in its --smoke mode (toy size, seconds each), so a benchmark cannot rot
unnoticed: its batches come from the real data pipeline and its steps from the real trainer, and a
key the trainer needs that a bench's batch lacks fails here. Smoke runs write nothing into docs/."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # five fresh processes that import DeepSpeed: some 2 minutes on 2 cores


def run_smoke(script: str, timeout: int = 600) -> str:
    """`python bench/<script> --smoke` as a user runs it; its stdout, after checking that it
    succeeded and wrote no file under docs/ (each script prints the path of what it writes)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, f"bench/{script}", "--smoke"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert str(REPO / "docs") not in done.stdout, done.stdout[-2000:]
    return done.stdout


def table_row(out: str, first_cell: str) -> list[str]:
    """The cells of the Markdown table row that starts with `first_cell`."""
    rows = [line for line in out.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, (first_cell, out[-2000:])
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_overhead_smoke():
    out = run_smoke("overhead.py")
    assert "## Overhead\n" in out, out[-2000:]
    assert re.search(r": 4 samples x \d+ tokens\. ", out) and "4 single steps of each" in out, out
    for side in ("vlm_train step", "bare PyTorch"):
        median_ms, fastest_ms = map(float, table_row(out, side)[1:])
        assert 0 < fastest_ms <= median_ms, (side, median_ms, fastest_ms)
    found = re.search(r"\*\*vlm_train / bare: (\d+\.\d+)x\*\* \(median of the 4 per-pair ratios\), (\d+\.\d+)x", out)
    assert found, out
    assert all(0 < float(ratio) < math.inf for ratio in found.groups())
    assert re.search(r"goal <= 1\.05x \(issue 21\): (met|not met)\.", out), out
    assert "section of" not in out  # --smoke leaves docs/benchmarks.md as it is


def test_data_smoke():
    out = run_smoke("data.py")
    small, large = out.split("### 1600x1200 sources")
    large, anyres = large.split("### AnyRes images")
    anyres, video = anyres.split("### Video")
    assert "### 640x480 sources" in small, out[-3000:]
    for table, paths in ((small, ()), (large, ("ours (1 worker, jpeg_draft)",))):
        for path in ("ours (1 worker)", "plain loop", "ours (in-process)", *paths):
            cells = table_row(table, path)
            assert float(cells[1]) > 0 and cells[2].endswith("x"), cells  # samples/s per core, vs plain
        assert table_row(table, "plain loop")[2] == "1.00x"
        verdict = r"\*\*Ours \(1 worker\) / plain loop: \d+\.\d+x per core, \d+\.\d+x in wall time\*\*"
        assert re.search(verdict, table), table
    assert re.search(r"mean absolute difference \d+\.\d+ of 255 levels", large), large  # draft vs full decode
    for table in (anyres, video):  # samples/s, visual tokens/s per core, vs plain (the same work: checked)
        for path in ("ours (1 worker)", "plain loop"):
            cells = table_row(table, path)
            assert float(cells[1]) > 0 and float(cells[2].replace(",", "")) > 0 and cells[3].endswith("x"), cells
        assert table_row(table, "plain loop")[3] == "1.00x"
        assert re.search(r"\d+ visual tokens per sample on average", table), table
    assert "section of" not in out  # --smoke leaves docs/benchmarks.md as it is


def test_checkpoint_smoke():
    out = run_smoke("checkpoint.py")
    assert "## Checkpointing\n" in out and "`python bench/checkpoint.py --smoke` on " in out, out[-2000:]
    _, kind, stage, _, trainable, megabytes, ratio, save_s, load_s = table_row(out, "toy")
    assert (kind, stage) == ("full", "1")
    # ZeRO-1, fp32: weights, master copy and two Adam moments of the trainable parameters, 4 B each
    assert 0.9 < float(ratio.rstrip("x")) < 1.3, (trainable, megabytes, ratio)
    assert float(save_s) >= 0 and float(load_s) >= 0
    assert "section of" not in out


def test_zero_memory_smoke():
    out = run_smoke("zero_memory.py")
    assert "## ZeRO memory\n" in out and "\nfp32:\n" in out and "\nbf16:\n" not in out, out[-3000:]
    for stage in ("0", "1", "2", "3"):  # --smoke: fp32 at DP=1 only, so one row per stage
        _, dp, weights, grads, optimizer, states, vs_dp1, _, error = table_row(out, stage)
        assert (dp, vs_dp1) == ("1", "1.000x"), (stage, dp, vs_dp1)
        assert float(states) >= float(weights) + float(grads) + float(optimizer) - 0.02 > 0, stage
        assert abs(float(error.rstrip("%"))) <= 10, (stage, error)  # the planner within 10% (tests/test_plan.py: DP=2)
    assert "**ZeRO-3 per rank vs DP=1: not measured (DP=1 only).**" in out, out[-3000:]
    assert "section of" not in out


def test_connectors_smoke():
    """The study's pipeline at toy budget: both pretraining runs, two variants x two seeds in setting A on
    both tasks, tables with mean ± spread, and a verdict per task."""
    out = run_smoke("connectors.py")
    assert "## The pretrained parts" in out and out.count("sha256 `") == 2, out[-3000:]
    for task in ("single", "relations"):
        section = out.split(f"## Task {task} ")[1].split("\n## ")[0]
        mlp, minimal = (table_row(section, name) for name in ("mlp", "ln_adapter + modality norms"))
        assert int(minimal[2].replace(",", "")) < 0.05 * int(mlp[2].replace(",", ""))  # trainable parameters
        for cells in (mlp, minimal):
            assert re.fullmatch(r"\d\.\d{3} ± \d\.\d{3}", cells[3]) and float(cells[-2]) > 0, cells
            assert re.fullmatch(r"(\d+|-)/(\d+|-)", cells[-3]), cells  # steps to 90% of the best, per seed
    assert len(re.findall(r"^- (single|relations): \*\*(yes|no)\*\*", out, re.M)) == 2, out[-2000:]


def test_every_bench_script_has_a_smoke_test():
    """A new bench/ script without a smoke run here would rot unnoticed (helpers start with "_")."""
    scripts = {p.name for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_")}
    smoked = set(re.findall(r'run_smoke\("(\w+\.py)"', Path(__file__).read_text()))
    for other in Path(__file__).parent.glob("test_bench_*.py"):  # a script with a test file of its own
        smoked |= set(re.findall(r'"bench/(\w+\.py)"', other.read_text()))
    assert scripts == smoked
