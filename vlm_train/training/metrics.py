"""Metrics: `metrics.jsonl` in the run dir, wandb (offline/disabled by default), and the console.

Only rank 0 writes. Every start of a run dir (a requeue, a resume) logs to one wandb run, whose
id `<run.dir>/wandb_id` keeps. Every record is one JSON object: training records carry step, loss, lr,
samples_per_s, tokens_per_s (and grad_norm, mem_gb, mfu when known); evaluation records carry
step, eval_loss, eval_accuracy. At the end, `loss_curve.png` in the run dir.
"""

from __future__ import annotations

import json
import resource
import secrets
import string
import sys
from pathlib import Path
from typing import Literal, cast

import torch

from vlm_train.config import Config
from vlm_train.training.config_dump import redact_secrets

WANDB_ID_FILE = "wandb_id"  # in the run dir: the wandb run every start of this run logs to


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
        if "eval_preference_accuracy" in record:
            return (
                f"eval  step {record['step']}  preference_accuracy {record['eval_preference_accuracy']:.3f}  "
                f"(reference {record['eval_reference_preference_accuracy']:.3f}, {record['eval_pairs']} pairs)"
            )
        if "eval_perplexity" in record:
            return f"eval  step {record['step']}  eval_loss {record['eval_loss']:.4f}  perplexity {record['eval_perplexity']:.3f}"
        if "eval_retrieval_i2t" in record:
            return (
                f"eval  step {record['step']}  zero-shot retrieval R@1 image->text {record['eval_retrieval_i2t']:.3f}  "
                f"text->image {record['eval_retrieval_t2i']:.3f}  (chance {record['eval_retrieval_chance']:.3f}, "
                f"{record['eval_samples']} pairs)"
            )
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
            f"[{bar}] step {record['step']:>{width}}/{self.max_steps}  loss {_number(record['loss'])}  "
            f"lr {record['lr']:.2e}  {record['samples_per_s']:.1f} samples/s  "
            f"{record['tokens_per_s']:.0f} tokens/s"
            + (f"  mfu {record['mfu']:.2%}" if "mfu" in record else "")
            + (f"  reward accuracy {record['rewards/accuracies']:.2f}" if "rewards/accuracies" in record else "")
            + (f"  temperature {record['temperature']:.2f}" if "temperature" in record else "")
        )

    def close(self) -> None:
        """Finish wandb and draw the run's loss curve to `<run.dir>/loss_curve.png`."""
        if self.wandb is not None:
            self.wandb.finish()
        if self.enabled and self.path.is_file():
            draw_loss_curve(self.path, self.path.with_name("loss_curve.png"))


def draw_loss_curve(metrics_path: Path, png_path: Path, size: tuple[int, int] = (800, 500)) -> None:
    """Training loss (and evaluation loss, as dots) against step, drawn with PIL (no matplotlib)."""
    from PIL import Image, ImageDraw

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 70, 30, size[0] - 20, size[1] - 50
    draw.rectangle((left, top, right, bottom), outline="black")
    points = train + evals
    if points:
        max_step = max(step for step, _ in points) or 1
        low, high = min(loss for _, loss in points), max(loss for _, loss in points)
        span = (high - low) or 1.0

        def xy(step: float, loss: float) -> tuple[float, float]:
            return left + (right - left) * step / max_step, bottom - (bottom - top) * (loss - low) / span

        if len(train) > 1:
            draw.line([xy(*p) for p in train], fill=(31, 119, 180), width=2)
        for step, loss in evals:
            x, y = xy(step, loss)
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(214, 39, 40))
        draw.text((5, top), f"{high:.4g}", fill="black")
        draw.text((5, bottom - 10), f"{low:.4g}", fill="black")
        draw.text((right - 60, bottom + 8), f"step {max_step}", fill="black")
    draw.text((left, 8), "loss (blue: train, red: eval)", fill="black")
    draw.text((left, bottom + 8), "0", fill="black")
    image.save(png_path)


def _start_wandb(cfg: Config, run_dir: Path):
    if cfg.wandb.mode == "disabled":
        return None
    import wandb

    return wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        mode=cast(Literal["online", "offline", "disabled"], cfg.wandb.mode),  # config validation checks it
        dir=str(run_dir),
        name=run_dir.name,
        id=wandb_run_id(run_dir),
        resume="allow",  # with the id: a requeued or resumed job continues the same wandb run
        config=json.loads(redact_secrets(json.dumps(_config_dict(cfg)))),  # no token interpolated into the config
    )


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of this run dir: read from `<run.dir>/wandb_id`, made and written there by
    the first start. Without a fixed id, `resume="allow"` starts a new wandb run on every requeue.
    Only rank 0 calls this (it alone logs), so one writer."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file() and (run_id := path.read_text().strip()):
        return run_id
    alphabet = string.ascii_lowercase + string.digits  # what wandb's own ids are made of
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(run_id + "\n")
    partial.replace(path)  # atomic: a kill mid-write never leaves an empty id behind
    return run_id


def _config_dict(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(container, dict)
    return container


def _number(value: float | None) -> str:
    return "skipped" if value is None else f"{value:.4f}"


def memory_gb(device: torch.device) -> float:
    """Peak memory: the device's allocator on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kb / 2**20 if sys.platform != "darwin" else peak_kb / 2**30
