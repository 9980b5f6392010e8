"""ZeRO memory: model-state bytes per rank that DeepSpeed actually holds, at DP = 1, 2, 4, ZeRO 0-3.

    python bench/zero_memory.py [--precision fp32|bf16] [--dp 1 2 4] [--smoke]

For each DP size one torchrun launch (gloo, CPU) builds the same VLM under every ZeRO stage, runs
two training steps on a batch the real data pipeline makes of toy scenes, and sums the storage of
every tensor the engine holds after a backward: module parameters (or their ZeRO-3 shards),
gradients (or DeepSpeed's partitions of them), fp32 master partitions and Adam's moments, each
storage counted once. DeepSpeed's communication buckets (ipg buffers, sized by reduce_bucket_size,
not by the model) are listed apart. Printed: bytes per rank (the largest rank), ratios to DP=1, and
the planner's numbers (vlm_train/plan.py) with their error. tests/test_plan.py runs the DP=2
launch and checks the planner within 10%. `--smoke`: the DP=1 launch only (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _pipeline import pipeline_batch  # bench/_pipeline.py: this folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
# Wider than the toy so that most tensors pass ZeRO-3's persistence threshold (1e5 elements), as
# in any real model; the tower is frozen, as in LLaVA.
MODEL_OVERRIDES = [
    "experiment=toy",
    "vision.freeze=true",
    "vision.hidden_size=384",
    "vision.intermediate_size=1536",
    "vision.num_heads=6",
    "llm.hidden_size=384",
    "llm.intermediate_size=1024",
]
CATEGORIES = {  # engine attribute -> model-state kind
    "bit16_groups": "weights",
    "fp16_partitioned_groups": "weights",
    "fp16_partitioned_groups_flat": "weights",
    "persistent_parameters": "weights",
    "averaged_gradients": "grads",
    "grad_partitions_flat_buffer": "grads",
    "single_partition_of_fp32_groups": "optimizer",
    "fp32_partitioned_groups_flat": "optimizer",
    "fp32_groups_flat_partition": "optimizer",
    "fp32_groups_gradients": "grads",
    "fp32_groups_gradients_flat": "grads",
    "fp32_groups_gradient_flat_partition": "grads",
    "state": "optimizer",
    "param_groups": "optimizer",  # the inner optimizer's params: master partitions (ZeRO 1-3)
    "bit16_groups_flat": "weights",
}


def held_bytes(engine) -> dict[str, int]:
    """Bytes of each storage the engine holds, once each, by kind: weights, grads, optimizer,
    buffers (communication buckets) and other."""
    found: dict[int, tuple[str, int]] = {}

    def add(kind: str, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() and storage.data_ptr() not in found:
            found[storage.data_ptr()] = (kind, storage.nbytes())

    for param in engine.module.parameters():
        add("weights", param.ds_tensor if hasattr(param, "ds_tensor") else param)
        if param.grad is not None:
            add("grads", param.grad)
    for path, tensor in _tensors(engine.optimizer, ""):
        add(_kind(path), tensor)
    totals = {"weights": 0, "grads": 0, "optimizer": 0, "buffers": 0, "other": 0}
    for kind, nbytes in found.values():
        totals[kind] += nbytes
    return totals


def _kind(path: str) -> str:
    if path.endswith(".grad"):
        return "grads"
    names = [part.split("[")[0] for part in path.split(".")]
    if any("ipg" in name or "bucket" in name for name in names):
        return "buffers"
    for name in reversed(names):
        if name in CATEGORIES:
            return CATEGORIES[name]
    return "other"


def _tensors(obj, path: str, depth: int = 0):
    """(path, tensor) for every tensor reachable from a DeepSpeed/torch optimizer object."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
        if obj.grad is not None:
            yield path + ".grad", obj.grad
        return
    if depth > 6:
        return
    if isinstance(obj, (list, tuple)):
        for index, item in enumerate(obj):
            yield from _tensors(item, f"{path}[{index}]", depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, f"{path}[]", depth + 1)
    elif isinstance(obj, torch.optim.Optimizer) or type(obj).__module__.startswith("deepspeed"):
        for name, item in vars(obj).items():
            yield from _tensors(item, f"{path}.{name}", depth + 1)


def worker(precision: str, data: str, out: str) -> None:
    """One rank: every ZeRO stage on the same model; rank 0 writes the per-rank maximum."""
    import torch.distributed as dist

    from vlm_train.build import build_model
    from vlm_train.config import compose
    from vlm_train.data.tokenizer import load_tokenizer
    from vlm_train.parallel.distributed import init_distributed
    from vlm_train.parallel.engine import build_engine
    from vlm_train.parallel.launch_env import launch_env
    from vlm_train.parallel.layout import Layout

    env = launch_env()
    overrides = [f"train.precision={precision}", "train.micro_batch_size=2", f"data.synthetic_dir={data}"]
    cfg = compose([*MODEL_OVERRIDES, *overrides, "data.num_workers=0"])
    layout = Layout.from_config(cfg, world=env.world, rank=env.rank)
    device = init_distributed(cfg.parallel, env)
    tokenizer = load_tokenizer(cfg.llm)
    batch = pipeline_batch(cfg, tokenizer, build_model(cfg, tokenizer), layout)
    results = {}
    for stage in range(4):
        cfg.parallel.zero_stage = stage
        torch.manual_seed(0)
        model = build_model(cfg, tokenizer)
        engine = build_engine(model, cfg, Layout.from_config(cfg, world=env.world, rank=env.rank), device)
        _two_steps(engine, batch)
        local = held_bytes(engine)
        gathered = [None] * env.world
        dist.all_gather_object(gathered, local)
        results[stage] = {kind: max(r[kind] for r in gathered) for kind in local}
        engine.destroy()
    if env.rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    # Done: leave without interpreter finalization. After four engines (ZeRO-3 last) were built
    # and destroyed in one process, a rank sometimes aborted in teardown (about 1 run in 50:
    # "terminate called without an active exception", a C++ destructor with no Python frame),
    # and torchrun then failed the measurement that was already complete.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _two_steps(engine, batch: dict) -> None:
    """Step once (creates the optimizer states), then backward again: grads and states both held."""
    inputs = [batch[name] for name in ("pixel_values", "input_ids", "attention_mask", "labels")]
    for step in range(2):
        engine.backward(engine(*inputs).loss_sum)
        if step == 0:
            engine.step()


def measure(dp: int, precision: str, timeout: int = 600) -> dict[int, dict[str, int]]:
    """Launch `dp` gloo ranks and return {stage: bytes per kind} of the largest rank."""
    from vlm_train.data.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        data = generate(Path(tmp) / "data", train=max(20, 4 * dp), eval=1)  # toy scenes: a batch of 2 per rank
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={dp}",
            f"--master_port={_free_port()}",
        ]
        command += [str(Path(__file__).resolve()), "--worker", "--precision", precision]
        command += ["--data", str(data), "--out", str(out)]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
            "PYTHONFAULTHANDLER": "1",
        }
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"zero_memory worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return {int(stage): kinds for stage, kinds in json.loads(out.read_text()).items()}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def planned(dp: int, precision: str) -> dict[int, float]:
    """The planner's model-state bytes per rank for the benchmark model, per ZeRO stage."""
    from vlm_train.config import compose
    from vlm_train.plan import build_meta_model, model_state_bytes

    model = build_meta_model(compose(MODEL_OVERRIDES))
    return {stage: model_state_bytes(model, precision, stage, dp).total for stage in range(4)}


def model_states(kinds: dict[str, int]) -> int:
    return kinds["weights"] + kinds["grads"] + kinds["optimizer"] + kinds["other"]


def report(precision: str, dps: list[int]) -> str:
    measured = {dp: measure(dp, precision) for dp in dps}
    lines = [
        f"ZeRO model-state bytes per rank ({precision}, gloo on CPU; MB = 1e6 bytes; the largest rank)",
        f"{'ZeRO':>4} {'DP':>3} {'weights':>9} {'grads':>9} {'optim':>9} {'states':>9} {'vs DP=1':>8} "
        f"{'planned':>9} {'error':>7} {'buckets':>9}",
    ]
    for stage in range(4):
        for dp in dps:
            kinds = measured[dp][stage]
            states, plan = model_states(kinds), planned(dp, precision)[stage]
            ratio = states / model_states(measured[dps[0]][stage])
            lines.append(
                f"{stage:>4} {dp:>3} {kinds['weights'] / 1e6:>9.2f} {kinds['grads'] / 1e6:>9.2f} "
                f"{kinds['optimizer'] / 1e6:>9.2f} {states / 1e6:>9.2f} {ratio:>7.3f}x {plan / 1e6:>9.2f} "
                f"{plan / states - 1:>+7.1%} {kinds['buffers'] / 1e6:>9.1f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--smoke", action="store_true", help="one launch at DP=1: checks that it runs (tests)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.dp = [1]
    if args.worker:
        worker(args.precision, args.data, args.out)
    else:
        print(report(args.precision, args.dp))


if __name__ == "__main__":
    main()
