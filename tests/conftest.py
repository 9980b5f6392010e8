"""Shared fixtures: environment without network and toy data made once. Plain helpers: tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """Synthetic scenes: 10 train shards of 64 and one held-out shard of 32."""
    from vlm_train.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("toy"), train=640, eval=32, seed=1)


@pytest.fixture(scope="module")
def one_rank():
    """A world of one gloo rank (as `vlm-train` without torchrun), torn down after the module."""
    from tests.helpers import free_port
    from vlm_train.config import compose
    from vlm_train.parallel.distributed import init_distributed, launch_env, shutdown

    saved = dict(os.environ)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        init_distributed(compose(["experiment=toy"]).parallel, launch_env())
        yield
    finally:
        shutdown()
        os.environ.clear()
        os.environ.update(saved)
