"""Metrics: `metrics.jsonl` in the run dir, wandb (offline/disabled by default), and the console.

Only rank 0 writes. Every record is one JSON object: training records carry step, loss, lr,
samples_per_s, tokens_per_s (and grad_norm, mem_gb when known); evaluation records carry step,
eval_loss, eval_accuracy.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from vlm_train.config import Config


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: Config, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.max_steps = cfg.train.max_steps
        self.wandb = _start_wandb(cfg, run_dir) if enabled else None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        print(self._console_line(record), flush=True)

    def _console_line(self, record: dict) -> str:
        if "eval_accuracy" in record:
            kinds = " ".join(
                f"{k[len('eval_accuracy_') :]} {v:.2f}" for k, v in record.items() if k.startswith("eval_accuracy_")
            )
            return (
                f"eval  step {record['step']}  eval_loss {record['eval_loss']:.4f}  "
                f"eval_accuracy {record['eval_accuracy']:.3f}  ({kinds})"
            )
        width = len(str(self.max_steps))
        done = record["step"] / self.max_steps
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        return (
            f"[{bar}] step {record['step']:>{width}}/{self.max_steps}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.2e}  {record['samples_per_s']:.1f} samples/s  "
            f"{record['tokens_per_s']:.0f} tokens/s"
        )

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(cfg: Config, run_dir: Path):
    if cfg.wandb.mode == "disabled":
        return None
    import wandb

    return wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        mode=cfg.wandb.mode,
        dir=str(run_dir),
        name=run_dir.name,
        resume="allow",
        config=json.loads(json.dumps(_config_dict(cfg))),
    )


def _config_dict(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def memory_gb(device: torch.device) -> float:
    """Peak memory: the device's allocator on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kb / 2**20 if sys.platform != "darwin" else peak_kb / 2**30
