"""What the data benchmarks share: CPU and wall clocks that count a loader worker's CPU, our pipeline
as a timed path, rounds that interleave the paths, and their table."""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path


class Clock:
    """Wall time, CPU time and its kernel part of this process: CPU seconds are what a path costs,
    however busy the machine was (a loader worker's are added by `Ours`)."""

    def __init__(self):
        self.wall, (self.cpu, self.kernel) = time.perf_counter(), self._cpu()

    @staticmethod
    def _cpu() -> tuple[float, float]:
        mine = resource.getrusage(resource.RUSAGE_SELF)
        return mine.ru_utime + mine.ru_stime, mine.ru_stime

    def stop(self) -> tuple[float, float, float]:
        cpu, kernel = self._cpu()
        return time.perf_counter() - self.wall, cpu - self.cpu, kernel - self.kernel


def running_cpu(pids: list[int]) -> tuple[float, float]:
    """(CPU, kernel) seconds used so far by running processes (/proc/<pid>/stat utime, stime)."""
    tick, cpu, kernel = os.sysconf("SC_CLK_TCK"), 0.0, 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # from field 3 on
        user, system = int(fields[11]) / tick, int(fields[12]) / tick  # fields 14 and 15
        cpu, kernel = cpu + user + system, kernel + system
    return cpu, kernel


class Ours:
    """Our pipeline, one epoch per round, with `workers` DataLoader workers (0: in-process).

    The loader and its worker live across rounds, as they live across epochs in training (the
    first round pays the worker's start). The worker's CPU is read from /proc while it runs, from
    the end of this path's previous round to the end of this one: that includes the batches it
    prefetched while the other paths were timed, which this round then takes. Those prefetched
    batches are also added to this round's wall time (as the worker CPU seconds they cost: one
    single-threaded worker), so that neither number gains from work done outside the round."""

    def __init__(
        self,
        urls: str,
        batch_size: int,
        workers: int,
        tokenizer,
        transform,
        image_tokens,
        *overrides: str,
        video_tokens=None,
    ):
        from vlm_train import compose
        from vlm_train.data.pipeline import build_train_batches

        data = [f"data.urls={urls}", f"data.num_workers={workers}", "data.max_length=1024", *overrides]
        cfg = compose(["experiment=toy", *data]).data
        self.batches = build_train_batches(
            cfg,
            tokenizer,
            transform,
            image_tokens,
            video_tokens=video_tokens,
            dp_rank=0,
            dp_size=1,
            batch_size=batch_size,
            seed=0,
        )
        self.visual_ids = [
            tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>") if t in tokenizer.get_vocab()
        ]
        self.visual_tokens = self.samples = self.skipped = 0  # slots, samples, skipped samples: last round
        self.worker_cpu = (0.0, 0.0)  # the worker's (CPU, kernel) seconds at the end of the previous round

    def round(self) -> tuple[int, float, float, float]:
        between, _ = running_cpu(self.batches.worker_pids)
        clock = Clock()
        samples = self.visual_tokens = self.skipped = 0
        for _ in range(self.batches.batches_per_epoch):
            batch = next(self.batches)
            samples += len(batch["keys"])
            self.skipped += int(batch["skipped"])
            self.visual_tokens += sum(int((batch["input_ids"] == i).sum()) for i in self.visual_ids)
        wall, cpu, kernel = clock.stop()
        self.samples = samples
        worker_cpu, worker_kernel = running_cpu(self.batches.worker_pids)
        wall += max(0.0, between - self.worker_cpu[0])  # prefetched while the other paths ran
        cpu, kernel = cpu + worker_cpu - self.worker_cpu[0], kernel + worker_kernel - self.worker_cpu[1]
        self.worker_cpu = (worker_cpu, worker_kernel)
        return samples, wall, cpu, kernel

    def close(self) -> None:
        self.batches.close()


def measure(paths: dict, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per round and path: samples per CPU second ("core") and per wall second, paths alternating."""
    rates: dict[str, dict[str, list[float]]] = {name: {"core": [], "wall": [], "kernel": []} for name in paths}
    for index in range(rounds):
        for name, path in paths.items():
            samples, wall, cpu, kernel = path.round()
            rates[name]["core"].append(samples / cpu)
            rates[name]["wall"].append(samples / wall)
            rates[name]["kernel"].append(kernel / cpu)
            print(f"round {index + 1}: {name:<18} {samples / cpu:7.1f} samples/s per core, {samples / wall:7.1f} wall")
    return rates


def ratio(rates: dict, name: str, kind: str) -> float:
    return statistics.median(a / b for a, b in zip(rates[name][kind], rates["plain loop"][kind]))


def table(rates: dict) -> list[str]:
    lines = [
        "| path | samples/s per core | vs plain | samples/s wall | vs plain | kernel CPU | per core, each round |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rates.items():
        each = ", ".join(f"{x:.1f}" for x in r["core"])
        core, wall = statistics.median(r["core"]), statistics.median(r["wall"])
        lines.append(
            f"| {name} | {core:.1f} | {ratio(rates, name, 'core'):.2f}x | {wall:.1f} "
            f"| {ratio(rates, name, 'wall'):.2f}x | {statistics.median(r['kernel']):.0%} | {each} |"
        )
    return lines
