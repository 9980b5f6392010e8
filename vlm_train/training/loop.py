"""The step loop: micro-batches -> token-weighted loss -> the engine's backward/step -> metrics.

The loss of a step is the summed cross-entropy of every answer token of the global batch (all
micro-batches, all data-parallel ranks) divided by their count, so a rank or micro-batch with
few answer tokens weighs exactly as much as its tokens, not as much as a mean of means would.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from vlm_train.config import Config
from vlm_train.data import token_budget
from vlm_train.data.pipeline import SKIP_REASONS, TrainBatches
from vlm_train.data.templates import NATIVE_INPUTS, VIDEO_INPUTS
from vlm_train.errors import DataError, TrainingDiverged
from vlm_train.models.vlm import IGNORE_INDEX
from vlm_train.parallel.engine import TrainEngine, resolve_precision
from vlm_train.parallel.layout import Layout
from vlm_train.parallel.signals import Preempted, StopFlag, requeue_slurm_job
from vlm_train.training import checkpoint, deadline, dpo
from vlm_train.training.contrastive import contrastive_forward, real_pairs
from vlm_train.training.flops import TrainingFlops, mfu, peak_flops
from vlm_train.training.metrics import MetricsLogger, memory_gb
from vlm_train.training.pretraining import PretrainingFlops
from vlm_train.training.rng import rng_state, set_rng_state
from vlm_train.training.stall import StallWarning, data_stall


class GlobalCounts(NamedTuple):
    """What one step's micro-batches hold, summed over all ranks (one all-reduce)."""

    answer_tokens: float  # the loss divisor: label tokens that are not IGNORE_INDEX
    samples: float
    tokens: float  # attention-mask tokens (packed: sample numbers)
    stop_requests: float  # ranks that caught a stop signal
    deadline_due: float  # ranks where one more step and a save would not fit before the deadline
    stop_file: float  # 1 when rank 0 found <run.dir>/STOP
    saves_writing: float  # ranks whose async checkpoint is not durable yet (0: publish it)
    model_flops: float
    visual_tokens: float
    skipped_by_reason: list[float]  # bad samples replaced by placeholders, per SKIP_REASONS


class Trainer:
    def __init__(
        self,
        engine: TrainEngine,
        batches: TrainBatches,
        cfg: Config,
        layout: Layout,
        device: torch.device,
        metrics: MetricsLogger,
        flops: TrainingFlops | PretrainingFlops,
        reference: torch.nn.Module | None = None,
    ):
        self.engine, self.batches, self.cfg = engine, batches, cfg
        self.reference = reference  # objective=dpo with more than LoRA training: the frozen initial model
        self.flops = flops  # training FLOPs of a micro-batch, for MFU
        self.peak_flops = peak_flops(device, resolve_precision(cfg.train.precision, device), cfg.train.peak_tflops)
        self.step_flops = 0.0  # model FLOPs of the last step, all ranks
        self.layout, self.device, self.metrics = layout, device, metrics
        self.run_dir = Path(cfg.run.dir)
        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.grad_norm: float | None = None
        self.stop_flag = StopFlag().install()
        self.deadline = deadline.Deadline(
            deadline.stop_at(cfg.train.stop_at, cfg.train.max_minutes, deadline.PROCESS_START), cfg.train.stop_margin_s
        )
        self.stop_requested_by_file: str | None = None  # rank 0: the request in <run.dir>/STOP
        self.stop_everywhere = False
        self.stop_counts: GlobalCounts | None = None  # the all-reduce that decided the stop
        self.checkpoints = checkpoint.Checkpointer(engine, self.run_dir, cfg)  # train.async_save: overlaps training
        self.saves_writing = 0.0  # ranks still writing the pending async checkpoint, as of the last step
        self.skipped_by_reason = torch.zeros(len(SKIP_REASONS), dtype=torch.float64)  # bad samples, all ranks
        self.bad_steps = 0  # steps skipped for a non-finite loss
        self.timer = PhaseTimer(device)
        self.local_visual_tokens = 0.0  # this rank's visual tokens in the last step
        self.step_forwards = cfg.train.grad_accum  # forwards of the last step (data.max_tokens_per_batch: varies)
        self.step_visual_tokens = 0.0  # all data-parallel ranks'
        self.stall_warning = StallWarning(cfg.data.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self.logged_steps = LoggedSteps(cfg.train.log_every, cfg.train.max_steps)
        self.nan_steps = {int(s) for s in os.environ.get("VLM_TRAIN_NAN_STEPS", "").split(",") if s.strip()}
        self.dpo_stats = torch.zeros(len(dpo.STATS), dtype=torch.float64)  # objective=dpo: this rank's, this step
        # the last step's objective metrics: dpo's rewards (all ranks), clip/siglip's temperature and bias
        self.objective_metrics: dict[str, float] = {}
        self.evaluation: Callable[[], None] | None = None  # train.eval_every: a held-out evaluation (collective)

    def fit(self) -> None:
        train = self.cfg.train
        fit_started, first_loss, loss = time.perf_counter(), None, None
        while self.step < train.max_steps:
            started = time.perf_counter()
            loss, samples, tokens = self.train_step()
            first_loss = loss if first_loss is None else first_loss
            elapsed = time.perf_counter() - started
            self.deadline.record_step(elapsed)
            self.step += 1
            self.samples_seen += samples
            self.tokens_seen += tokens
            if self.step in self.logged_steps:
                self.log_step(loss, samples, tokens, elapsed)
            if self.evaluation is not None and train.eval_every and self.step % train.eval_every == 0:
                if self.step < train.max_steps:  # the last step's evaluation is the run's own, after saving
                    self.evaluation()
            self.checkpoints.publish_if_durable(self.saves_writing)  # async: every rank's files are durable
            if self.step == train.max_steps or (train.save_every and self.step % train.save_every == 0):
                self.save()
            elif self.stop_everywhere:
                self.save()
            if self.stop_everywhere and self.step < train.max_steps:
                self.checkpoints.finish()  # the stop's checkpoint is published before the exit
                self.stop_for_preemption()
            self.deadline.record_save(self.checkpoints.longest_save_s)
        self.checkpoints.finish()  # async: the last save, published before evaluation and exit
        if self.layout.rank == 0 and first_loss is not None:
            took = time.perf_counter() - fit_started
            print(f"trained to step {self.step}: loss {first_loss:.4f} -> {loss:.4f} in {took:.0f} s", flush=True)

    def train_step(self) -> tuple[float, int, int]:
        """One optimizer step over `grad_accum` micro-batches; returns the global loss, samples, tokens.

        A step whose global loss is not finite (on any rank) is skipped: gradients are dropped,
        weights and optimizer state stay as they were, the batch counts as consumed."""
        timer = self.timer
        timer.start(sync=self.step + 1 in self.logged_steps)
        with timer.phase("data_wait"):
            loaded = [next(self.batches) for _ in range(self.cfg.train.grad_accum)]
        micro_batches = self.forwards_of(loaded)
        counts = self.global_counts(micro_batches)
        micro_batches += self.idle_forwards(micro_batches)
        self.step_flops, self.step_visual_tokens = counts.model_flops, counts.visual_tokens
        self.stop_everywhere = counts.stop_requests + counts.deadline_due + counts.stop_file > 0
        self.stop_counts = counts
        self.saves_writing = counts.saves_writing
        # The engine divides by grad_accum and averages gradients over dp ranks; undo both so the
        # gradient is that of (sum of token losses) / (answer tokens in the global batch); DPO: of
        # (sum of pair losses) / (pairs in the global batch).
        scale = self.cfg.train.grad_accum * self.layout.dp / max(counts.answer_tokens, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for index, mb in enumerate(micro_batches):
            self.engine.begin_micro_batch(last=index == len(micro_batches) - 1)
            with timer.phase("forward"):
                # only the loss is kept: the output's logits [B, T, V] are freed before backward
                mb_loss_sum = self.inject_fault(self.micro_batch_loss(mb))
            with timer.phase("backward"):
                self.engine.backward(mb_loss_sum * scale)
            loss_sum += mb_loss_sum.detach().double()
            if index < len(micro_batches) - 1:
                with timer.phase("optimizer"):
                    self.engine.micro_step()
        global_loss = float(self.all_reduce(loss_sum)) / max(counts.answer_tokens, 1.0)
        if self.cfg.objective == "dpo":
            self.objective_metrics = dpo.step_metrics(self.all_reduce(self.dpo_stats.to(self.device)))
            self.dpo_stats.zero_()
        with timer.phase("optimizer"):
            # A non-finite loss on any rank cancels the update everywhere (the engine knows how).
            result = self.engine.step(skip=not math.isfinite(global_loss), grad_norm=self.step + 1 in self.logged_steps)
        self.grad_norm = result.grad_norm
        if not result.updated:
            self.count_bad_step(global_loss)
        self.count_skipped_samples(counts.skipped_by_reason, counts.samples)
        return global_loss, int(counts.samples), int(counts.tokens)

    def micro_batch_loss(self, mb: dict) -> torch.Tensor:
        """The summed loss of a micro-batch: its labelled tokens' cross-entropy (sft: answers, lm: every
        token), its pairs' DPO losses (dpo), or its rows' contrastive losses (clip, siglip)."""
        if self.cfg.objective in ("clip", "siglip"):
            loss_sum, self.objective_metrics = contrastive_forward(
                self.engine, self.model_inputs(mb), self.cfg.objective
            )
            return loss_sum
        if self.cfg.objective != "dpo":
            return self.engine(**self.model_inputs(mb)).loss_sum
        loss_sum, stats = dpo.dpo_forward(self.engine, self.model_inputs(mb), self.cfg.dpo, self.reference)
        self.dpo_stats += stats.cpu()
        return loss_sum

    def loss_units(self, mb: dict) -> float:
        """What the loss is a mean over: labelled tokens, or pairs (dpo: labelled pairs; clip, siglip:
        image-caption rows that are not placeholders)."""
        if self.cfg.objective == "dpo":
            return float(dpo.labelled_pairs(mb["labels"]).sum())
        if self.cfg.objective in ("clip", "siglip"):
            return float(real_pairs(mb["labels"]).sum())
        return float((mb["labels"][:, 1:] != IGNORE_INDEX).sum())

    def forwards_of(self, loaded: list[dict]) -> list[dict]:
        """The step's forwards: its loaded batches, each cut to data.max_tokens_per_batch when set."""
        budget = self.cfg.data.max_tokens_per_batch
        if budget is None:
            return loaded
        return [forward for batch in loaded for forward in token_budget.forwards(batch, budget)]

    def idle_forwards(self, forwards: list[dict]) -> list[dict]:
        """Forwards that add nothing, so that this rank runs as many as the rank with the most
        (data.max_tokens_per_batch; one max all-reduce)."""
        if self.cfg.data.max_tokens_per_batch is None:
            return []
        most = torch.tensor([float(len(forwards))], dtype=torch.float64, device=self.device)
        if self.layout.world > 1:
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
        self.step_forwards = int(most.item())
        return [token_budget.idle_forward(forwards[-1])] * (self.step_forwards - len(forwards))

    def count_bad_step(self, global_loss: float) -> None:
        """Count a skipped step; stop when there were too many (the last checkpoint stays good)."""
        self.bad_steps += 1
        if self.layout.rank == 0:
            print(f"step {self.step + 1}: loss {global_loss} is not finite, step skipped", flush=True)
        if self.bad_steps > self.cfg.train.max_bad_steps:
            latest = checkpoint.latest_checkpoint(self.run_dir)
            raise TrainingDiverged(
                f"{self.bad_steps} steps had a non-finite loss (train.max_bad_steps={self.cfg.train.max_bad_steps})"
                f"; stopped at step {self.step + 1}, last good checkpoint: {latest or 'none'}"
            )

    def inject_fault(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """Fault injection for tests: VLM_TRAIN_NAN_STEPS=3,4 makes the last rank's loss NaN at those steps."""
        if self.step + 1 in self.nan_steps and self.layout.rank == self.layout.world - 1:
            return loss_sum * float("nan")
        return loss_sum

    def global_counts(self, micro_batches: list[dict]) -> GlobalCounts:
        """Answer tokens, samples, tokens, stop requests, model FLOPs and skipped samples per reason,
        summed over all ranks."""
        self.local_visual_tokens = float(sum(self.flops.visual_tokens(mb) for mb in micro_batches))
        local = torch.tensor(
            [
                sum(self.loss_units(mb) for mb in micro_batches),
                sum(float(mb["input_ids"].shape[0]) for mb in micro_batches),
                sum(float((mb["attention_mask"] > 0).sum()) for mb in micro_batches),  # packed: sample numbers
                float(self.stop_flag.raised),  # a signal on any rank stops every rank after this step
                float(self.deadline.due()),  # so does the deadline seen from any rank
                float(self.stop_file_found()),
                self.checkpoints.writing_here(),  # an async save is published once no rank is still writing
                sum(self.flops(mb) for mb in micro_batches),
                self.local_visual_tokens,
                *sum(mb["skipped_by_reason"].double() for mb in micro_batches).tolist(),
            ],
            dtype=torch.float64,
            device=self.device,
        )
        reduced = self.all_reduce(local).tolist()
        answer_tokens, samples, tokens, stop_requests, due, stop_file, writing, model_flops, visual, *skipped = reduced
        return GlobalCounts(
            answer_tokens, samples, tokens, stop_requests, due, stop_file, writing, model_flops, visual, skipped
        )

    def stop_file_found(self) -> bool:
        """Rank 0 looks for <run.dir>/STOP before every step (one stat; the all-reduce tells the others)."""
        if self.layout.rank == 0:
            self.stop_requested_by_file = deadline.stop_requested_by_file(self.run_dir)
        return self.stop_requested_by_file is not None

    def count_skipped_samples(self, skipped: list[float], samples: float) -> None:
        """Bad samples were replaced by placeholders; too many of them end the run (data.max_skip_fraction),
        judged once 10 were skipped so that a few bad ones early on do not."""
        self.skipped_by_reason += torch.tensor(skipped, dtype=torch.float64)
        total, limit = float(self.skipped_by_reason.sum()), self.cfg.data.max_skip_fraction
        seen = self.samples_seen + samples
        if total > limit * seen and (total >= 10 or limit == 0):
            reasons = ", ".join(
                f"{reason} {int(count)}"
                for reason, count in zip(SKIP_REASONS, self.skipped_by_reason.tolist())
                if count
            )
            raise DataError(
                f"{int(total)} of {int(seen)} samples were skipped as bad ({reasons}; see the warnings above), more "
                f"than data.max_skip_fraction={limit}: fix the data or raise the limit"
            )

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over all ranks of values every rank of a tensor-parallel group holds identically
        (its batch, its full loss): the world sum counts each data-parallel rank `tp` times."""
        if self.layout.world > 1:  # a group of one: nothing to add, and gloo still costs a round trip
            dist.all_reduce(tensor)
        return tensor / self.layout.tp if self.layout.tp > 1 else tensor

    def slowest_ranks(self) -> tuple[float, float]:
        """The largest data wait and the largest visual-token count of the last step over all ranks
        (one max all-reduce, on logged steps only)."""
        local = torch.tensor([self.timer.seconds["data_wait"], self.local_visual_tokens], dtype=torch.float64)
        if self.layout.world > 1:
            local = local.to(self.device)
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        wait, visual = local.tolist()
        return wait, visual

    def model_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The model's inputs by name; AnyRes batches add `image_sizes`, video batches their frames."""
        names = ("pixel_values", "input_ids", "attention_mask", "labels", "image_sizes", *VIDEO_INPUTS, *NATIVE_INPUTS)
        return {name: batch[name].to(self.device, non_blocking=True) for name in names if name in batch}

    def log_step(self, loss: float, samples: int, tokens: int, elapsed: float) -> None:
        slowest_wait, most_visual = self.slowest_ranks()
        mean_visual = self.step_visual_tokens / self.layout.dp
        record: dict[str, float | None] = {
            "step": self.step,
            "loss": loss,
            "lr": self.engine.lr,
            "samples_per_s": samples / elapsed,
            "tokens_per_s": tokens / elapsed,
            "mem_gb": round(memory_gb(self.device), 3),
            "mfu": mfu(self.step_flops, elapsed, self.peak_flops, self.layout.world),
            "step_s": elapsed,
            **{f"{name}_s": seconds for name, seconds in self.timer.seconds.items()},
            "data_stall": data_stall(slowest_wait, elapsed),  # the slowest rank's wait: everyone's
            "visual_tokens": self.step_visual_tokens,  # all ranks' visual tokens in this step
            "visual_tokens_imbalance": most_visual / mean_visual if mean_visual else 1.0,
        }
        if not math.isfinite(loss):
            record["loss"] = None  # JSON has no NaN
        if self.bad_steps:
            record["bad_steps"] = self.bad_steps
        if self.grad_norm is not None:
            record["grad_norm"] = float(self.grad_norm)
        record.update(self.objective_metrics)
        if self.cfg.data.max_tokens_per_batch is not None:
            record["forwards"] = self.step_forwards  # per rank: the most any rank needed (token budget)
        if self.skipped_by_reason.any():
            record["data_skipped"] = int(self.skipped_by_reason.sum())
            for reason, count in zip(SKIP_REASONS, self.skipped_by_reason.tolist()):
                if count:
                    record[f"data_skipped_{reason}"] = int(count)
        self.metrics.log(record)
        warning = self.stall_warning.message(self.step, slowest_wait, elapsed)
        if warning and self.layout.rank == 0:
            print(warning, flush=True)

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "bad_steps": self.bad_steps,
            "skipped_by_reason": dict(zip(SKIP_REASONS, self.skipped_by_reason.tolist())),
            "data": self.batches.state_dict(),
            "rng": rng_state(),
            "save_s": self.deadline.save_s,  # the longest save so far: a resumed run plans its deadline stop with it
        }

    def stop_for_preemption(self) -> None:
        """After the stop's checkpoint: requeue (train.requeue) and exit 75 with why we stopped."""
        if self.stop_requested_by_file is not None:
            deadline.clear_stop_file(self.run_dir)  # honoured: the next start must not stop again
        requeued = self.cfg.train.requeue and self.layout.rank == 0 and requeue_slurm_job()
        message = f"stopped by {self.stop_cause()} after step {self.step}, checkpoint saved"
        if self.layout.rank == 0:
            # For the batch script: torchrun reports a worker's 75 as its own 1.
            deadline.write_stopped(self.run_dir, message)
        if self.layout.world > 1:
            dist.barrier()  # written before any rank exits (a launcher may kill the rest then)
        raise Preempted(message + ("; job requeued" if requeued else "; start again with the same run.dir to resume"))

    def stop_cause(self) -> str:
        """This rank's own reason first; what the all-reduce reported from other ranks otherwise."""
        if self.stop_flag.signal_name:
            return self.stop_flag.signal_name
        if self.stop_requested_by_file:
            return f"request {self.stop_requested_by_file}"
        if self.deadline.at is not None and self.deadline.due():
            return self.deadline.reason()
        counts = self.stop_counts
        if counts is not None and counts.stop_file:
            return "a request in <run.dir>/STOP"
        if counts is not None and counts.deadline_due:
            return "the deadline (as another rank measured it)"
        return "a signal on another rank"

    def save(self) -> None:
        """Collective: checkpoint this step (published on return, or with train.async_save once
        every rank's background write is durable; the trainer state is taken now either way)."""
        self.checkpoints.save(self.step, self.trainer_state())

    def resume(self, folder: Path) -> None:
        state = checkpoint.load(self.engine, folder)
        self.step, self.samples_seen, self.tokens_seen = state["step"], state["samples_seen"], state["tokens_seen"]
        self.bad_steps = state.get("bad_steps", 0)
        self.deadline.record_save(state.get("save_s", 0.0))
        saved = state.get("skipped_by_reason", {})
        self.skipped_by_reason = torch.tensor([saved.get(r, 0.0) for r in SKIP_REASONS], dtype=torch.float64)
        self.batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        if self.layout.rank == 0:
            print(f"resumed from {folder} at step {self.step}", flush=True)


class LoggedSteps:
    """The steps that get a metrics record: every `log_every`-th, the first and the last."""

    def __init__(self, log_every: int, max_steps: int):
        self.log_every, self.max_steps = log_every, max_steps

    def __contains__(self, step: int) -> bool:
        return step % self.log_every == 0 or step in (1, self.max_steps)


class PhaseTimer:
    """Seconds per phase of one step (data_wait, forward, backward, optimizer), summed over its
    micro-batches. On GPU, kernels run asynchronously: on steps that get logged the timer
    synchronises at phase edges so the split is true; other steps run unsynchronised."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sync = False
        self.seconds: dict[str, float] = {}

    def start(self, sync: bool) -> None:
        self.sync = sync and self.device.type == "cuda"
        self.seconds = {"data_wait": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    @contextmanager
    def phase(self, name: str):
        self._synchronize()
        started = time.perf_counter()
        yield
        self._synchronize()
        self.seconds[name] += time.perf_counter() - started

    def _synchronize(self) -> None:
        if self.sync:
            torch.cuda.synchronize(self.device)
