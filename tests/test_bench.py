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
    assert re.search(r"batch 4 x \d+ tokens, 4 interleaved pairs", out), out
    found = re.search(r"ratio vlm_train / bare: (\d+\.\d+)x \(median of pair ratios\), (\d+\.\d+)x", out)
    assert found, out
    assert all(0 < float(ratio) < math.inf for ratio in found.groups())


def test_data_smoke():
    out = run_smoke("data.py")
    for path in ("ours (1 worker)", "plain loop", "ours (in-process)"):
        cells = table_row(out, path)
        assert float(cells[1]) > 0 and cells[2].endswith("x"), cells  # samples/s per core, vs plain
    assert table_row(out, "plain loop")[2] == "1.00x"
    assert re.search(r"\*\*Ours \(1 worker\) / plain loop: \d+\.\d+x per core\*\*", out), out
    assert "section of" not in out  # --smoke leaves docs/benchmarks.md as it is


def test_checkpoint_smoke():
    out = run_smoke("checkpoint.py")
    _, kind, stage, _, trainable, megabytes, ratio, save_s, load_s = table_row(out, "toy")
    assert (kind, stage) == ("full", "1")
    # ZeRO-1, fp32: weights, master copy and two Adam moments of the trainable parameters, 4 B each
    assert 0.9 < float(ratio.rstrip("x")) < 1.3, (trainable, megabytes, ratio)
    assert float(save_s) >= 0 and float(load_s) >= 0


def test_zero_memory_smoke():
    out = run_smoke("zero_memory.py")
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d\s+1\s", line)]
    assert [row[0] for row in rows] == ["0", "1", "2", "3"], out
    for row in rows:
        states, error = float(row[5]), float(row[8].rstrip("%"))
        assert states > 0 and abs(error) <= 10, row  # the planner within 10% (tests/test_plan.py: DP=2)


def test_connectors_smoke():
    out = run_smoke("connectors.py")
    mlp, adapter = table_row(out, "mlp"), table_row(out, "ln_adapter (frozen bridge)")
    assert int(adapter[1].replace(",", "")) < 0.05 * int(mlp[1].replace(",", ""))  # trainable connector params
    for cells in (mlp, adapter):
        assert math.isfinite(float(cells[8])) and float(cells[9]) > 0, cells  # final loss, samples/s
    assert "## The founding question" in out


def test_every_bench_script_has_a_smoke_test():
    """A new bench/ script without a smoke run here would rot unnoticed (helpers start with "_")."""
    scripts = {p.name for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_")}
    smoked = set(re.findall(r'run_smoke\("(\w+\.py)"', Path(__file__).read_text()))
    assert scripts == smoked
