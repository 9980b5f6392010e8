"""Start-up checks for real clusters (vlm_train/parallel/distributed.py): a node that was given GPUs
but cannot use them fails in one line instead of training on CPU with gloo; a job that requires
InfiniBand fails unless NCCL's own log says it uses it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO
from vlm_train.config import ParallelConfig
from vlm_train.errors import LayoutError
from vlm_train.parallel.distributed import gpus_expected, nccl_network_problem, pick_backend

# Lines as NCCL 2.2x writes them with NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET.
IB_LOG = """\
dgx001:81234:81234 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_3:1/IB [2]mlx5_4:1/IB [3]mlx5_5:1/IB ; OOB ibp24s0:10.1.0.11<0>
dgx001:81234:81234 [0] NCCL INFO Using network IB
dgx001:81234:81290 [0] NCCL INFO Channel 00/0 : 0[0] -> 8[0] [send] via NET/IB/0
"""
SOCKET_LOG = """\
pod-0:51:51 [0] NCCL INFO NET/IB : No device found.
pod-0:51:51 [0] NCCL INFO NET/Socket : Using [0]eth0:10.244.1.7<0>
pod-0:51:51 [0] NCCL INFO Using network Socket
"""
SHARP_LOG = "dgx002:9:9 [3] NCCL INFO Using network IBext_v8\n"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU machine has CUDA: nothing to refuse")
@pytest.mark.parametrize(
    ("environ", "reason"),
    [
        ({"SLURM_GPUS_ON_NODE": "8"}, "Slurm allocated 8 GPU(s) on this node, but torch sees no usable GPU on "),
        ({"VLM_REQUIRE_CUDA": "1"}, "VLM_REQUIRE_CUDA=1, but torch sees no usable GPU on "),
    ],
)
def test_gpus_allocated_but_unusable_is_refused_not_run_on_cpu(environ, reason):
    with pytest.raises(LayoutError) as err:
        pick_backend(ParallelConfig(), environ)
    assert str(err.value).startswith(reason) and "\n" not in str(err.value)
    with pytest.raises(LayoutError, match="parallel.backend=nccl, but torch sees no usable GPU"):
        pick_backend(ParallelConfig(backend="nccl"), {})
    assert pick_backend(ParallelConfig(backend="gloo"), environ) == "gloo"  # CPU on purpose


def test_no_gpus_expected_means_gloo_on_cpu():
    assert gpus_expected({}) is None
    assert gpus_expected({"SLURM_GPUS_ON_NODE": "0"}) is None
    assert gpus_expected({"VLM_REQUIRE_CUDA": "0"}) is None
    if not __import__("torch").cuda.is_available():
        assert pick_backend(ParallelConfig(), {"SLURM_GPUS_ON_NODE": "0"}) == "gloo"


def test_the_cli_refuses_a_gpu_node_without_cuda_in_one_line(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("CUDA works here")
    env = {**os.environ, "SLURM_GPUS_ON_NODE": "4"}
    env.pop("SLURM_JOB_ID", None)
    command = [sys.executable, "-m", "vlm_train.train", "experiment=toy", f"run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("vlm-train: error: Slurm allocated 4 GPU(s)"), result.stderr
    assert not (tmp_path / "run").exists()


def test_the_network_check_reads_what_nccl_chose():
    assert nccl_network_problem(IB_LOG, "IB") is None
    assert nccl_network_problem(SHARP_LOG, "IB") is None  # NVIDIA's SHARP plugin runs over the HCAs
    assert nccl_network_problem(SOCKET_LOG, "IB") == "NCCL chose network Socket (NET/IB : No device found.)"
    assert nccl_network_problem("", "IB") == "NCCL logged no network choice (no inter-node communicator?)"
