"""Writing one rank's checkpoint files, now or in a background thread while training goes on.

`write_rank_files` is the whole write of one rank's part of a save: every file through a temporary
name with its SHA-256 computed from the bytes as they go (checksums.py), fsynced and renamed, then
the rank's `SHA256SUMS.rank<R>`, then an fsync of the folder. A synchronous save runs it in the
main thread; an async one (`train.async_save`) hands it to a `BackgroundWriter` after the
snapshot. The writer thread runs no collective: that every rank's files are durable is agreed
through the trainer's per-step all-reduce, and rank 0 publishes in the main thread (checkpoint.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from vlm_train.files import fsync_dir
from vlm_train.parallel.engine_checkpoint import PendingFile
from vlm_train.training.checksums import write_hashed, write_manifest


def write_rank_files(folder: Path, files: list[PendingFile], rank: int, fault: Callable[[str], None]) -> None:
    """Write `files` (all inside `folder`) durably with their checksums; `fault(point)` is the
    fault-injection hook at "snapshot" (nothing written yet), "write" (the first file half written)
    and "durable" (everything durable, not yet reported)."""
    fault("snapshot")
    digests = {}
    for index, file in enumerate(files):
        assert file.path.parent == folder, f"{file.path} is not in {folder}"
        mid_write = (lambda: fault("write")) if index == 0 else None
        digests[file.path.name] = write_hashed(file.path, file.write, after_first_write=mid_write)
    write_manifest(folder, rank, digests)
    fsync_dir(folder)  # the renames above are durable only once the folder is
    fault("durable")


class BackgroundWriter:
    """One save's `write_rank_files` in a daemon thread; at most one at a time.

    `durable()` polls it (re-raising in the caller what the thread raised), `wait()` blocks until it
    is done. The thread runs at the lowest CPU priority. A process that dies mid-write leaves a
    `step_<N>.partial` folder that is never published.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._what = ""

    @property
    def busy(self) -> bool:
        """A job was started and not yet collected with `wait()`."""
        return self._thread is not None

    def start(self, job: Callable[[], None], what: str) -> None:
        assert self._thread is None, "one checkpoint write at a time: wait() for the previous one"
        self._done.clear()
        self._error, self._what = None, what
        self._thread = threading.Thread(target=self._run, args=(job,), name=f"checkpoint-writer {what}", daemon=True)
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        _yield_cpu_to_training()
        try:
            job()
        except BaseException as err:  # handed to the main thread by durable()/wait()
            self._error = err
        else:
            self._done.set()

    def durable(self) -> bool:
        """Whether the job has finished: every file written, hashed, fsynced, listed."""
        self._raise_error()
        return self._done.is_set()

    def wait(self) -> None:
        """Block until the job is done, then forget it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing {self._what} in the background failed: {error}") from error


def _yield_cpu_to_training() -> None:
    """Lowest CPU priority (nice 19) for the calling thread only (on Linux a thread is a task of its
    own): where cores are short, the writer takes what training leaves instead of slowing its steps
    (measured: +18-32% step time while writing at normal priority, 0-9% at nice 19, 2 ranks on 2
    cores; docs/checkpointing.md). Elsewhere, or if refused, the thread keeps its priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
