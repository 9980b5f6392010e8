"""One job per run directory: `<run.dir>/run.lock`, held for the job's whole life.

Two jobs writing one run.dir interleave metrics.jsonl and race each other publishing `step_N`
and `latest`. The lock refuses the second job before it writes anything:

- Rank 0 takes an exclusive `fcntl` lock on byte 0 of the file and writes its identity there
  (host, pid, Slurm job, start time) with a heartbeat it refreshes every `heartbeat_every(stale)`
  seconds. Every other rank locks byte `rank`. The kernel drops a process's locks when it dies,
  however it dies, so a SIGKILLed job leaves nothing that needs cleaning up.
- A new job's rank 0 first locks the *whole* file: that fails while any process of an earlier
  job still holds its byte (a rank still saving after its launcher died, say), and the job exits
  with one line naming the holder.
- fcntl locks are only as good as the filesystem's: coherent across nodes on local disks (one
  node), NFSv4 and NFSv3 with lockd, GPFS/Spectrum Scale, and Lustre mounted with `flock`; local
  to each node on Lustre with `localflock` and BeeGFS without global file locks; refused on Lustre
  with `noflock`. So the heartbeat is checked too: a holder on another host whose heartbeat is
  still advancing is alive, whatever the lock said; one silent for `run.lock_stale_s` is dead,
  and its lock is taken over (logged). `run.lock=heartbeat` skips fcntl for filesystems whose
  locks are node-local; `run.lock=off` disables the check.
- A restart of the same job (a Slurm requeue, keeping its job id; `torchrun --max-restarts` with
  a named `--rdzv-id`) takes the lock over at once: its earlier start has ended.

Heartbeat ages compare clocks across hosts: keep them within a small part of `run.lock_stale_s`
(NTP does). Never open the lock file a second time in a holding process: closing any descriptor
of a file drops all of that process's fcntl locks on it (POSIX).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from vlm_train.errors import UserError

LOCK_NAME = "run.lock"
RECORD_BYTES = 1024  # one fixed-size record, rewritten in place (a rename would change the locked inode)
EXIT_RUN_DIR_IN_USE = 73  # sysexits' EX_CANTCREAT: the output (run.dir) cannot be had now
LOCKS_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
LOCK_HELD = {errno.EAGAIN, errno.EACCES}


class RunDirInUse(UserError):
    """Another live job holds the run dir."""

    exit_code = EXIT_RUN_DIR_IN_USE
    same_on_every_rank = True  # every rank raises it: only rank 0 prints it


@dataclass
class Holder:
    """Who holds (or last held) a run dir, as the lock file records it."""

    host: str
    pid: int
    job: str  # "slurm:<id>", "torchrun:<rdzv id>", or "" for a job without a name
    started: float  # Unix time
    heartbeat: float  # Unix time of the last refresh
    token: str  # unique per start: tells our own record from a rival's
    released: bool = False

    @classmethod
    def of_this_process(cls, environ: Mapping[str, str] = os.environ) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), job_name(environ), now, now, uuid.uuid4().hex)

    def describe(self, now: float) -> str:
        job = self.job.replace("slurm:", "Slurm job ").replace("torchrun:", "torchrun job ") or "an unnamed job"
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        return f"{job} on host {self.host}, pid {self.pid}, started {started}, last heartbeat {now - self.heartbeat:.0f} s ago"

    def encode(self) -> bytes:
        data = json.dumps(asdict(self)).encode()
        assert len(data) < RECORD_BYTES, data
        return data.ljust(RECORD_BYTES - 1) + b"\n"


def job_name(environ: Mapping[str, str] = os.environ) -> str:
    """What stays the same across restarts of one job: the Slurm job id, else a named torchrun
    rendezvous (torchrun's default id, "none", names nothing)."""
    if environ.get("SLURM_JOB_ID"):
        return f"slurm:{environ['SLURM_JOB_ID']}"
    run_id = environ.get("TORCHELASTIC_RUN_ID", "none")
    return f"torchrun:{run_id}" if run_id != "none" else ""


def heartbeat_every(stale_s: float) -> float:
    return max(0.2, min(10.0, stale_s / 4))


def read_holder(fd: int) -> Holder | None:
    """The record in the lock file; None when empty or unreadable (torn by a concurrent write:
    read again)."""
    for _ in range(3):
        raw = os.pread(fd, RECORD_BYTES, 0).strip()
        if not raw:
            return None
        try:
            return Holder(**json.loads(raw))
        except (ValueError, TypeError):
            time.sleep(0.05)
    return None


def lock_owner_pid(fd: int) -> int | None:
    """The pid holding a conflicting fcntl lock on this host (F_GETLK), when the kernel knows it."""
    flock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        _, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, flock))
    except OSError:
        return None
    return pid or None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """This job's hold on a run dir: `acquire()` on rank 0, `join(rank)` on the others, `release()`."""

    def __init__(self, run_dir: Path, mode: str, stale_s: float):
        self.path = Path(run_dir) / LOCK_NAME
        self.mode, self.stale_s = mode, stale_s
        self.fd: int | None = None
        self.uses_fcntl = False
        self.me: Holder | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Hold the run dir or raise RunDirInUse; returns a line to log when a lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if self.mode == "fcntl":
                self.uses_fcntl = self._lock_whole_file()
            previous = read_holder(self.fd)
            me = Holder.of_this_process()
            taken_over = self._judge(previous, me)
            self.me = me
            os.pwrite(self.fd, me.encode(), 0)
            os.fsync(self.fd)
            if not self.uses_fcntl:
                self._check_no_rival()
            else:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 0, 1)  # keep byte 0; the other ranks lock their own
        except BaseException:
            self._close()
            raise
        self._start_heartbeat()
        return taken_over

    def join(self, rank: int, uses_fcntl: bool) -> None:
        """A rank > 0 marks itself in the lock (byte `rank`), so a new job sees it while it lives."""
        self.uses_fcntl = uses_fcntl
        if not uses_fcntl:
            return
        self.fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, rank)
        except OSError as err:
            pid = lock_owner_pid(self.fd)
            self._close()
            if err.errno in LOCK_HELD:
                raise RunDirInUse(
                    f"run.dir={self.path.parent} is still in use: a process of an earlier job (pid {pid} on host "
                    f"{socket.gethostname()}) holds rank {rank}'s lock; wait for it to end or choose another run.dir"
                ) from None
            raise

    def release(self) -> None:
        """Stop the heartbeat and mark the record released (a clean end; a crash leaves it unmarked,
        which is fine: the kernel drops the lock and the heartbeat stops)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.me is not None and self.fd is not None:
            self.me.released = True
            self._write_record()
        self._close()

    def _lock_whole_file(self) -> bool:
        """True when fcntl locks work here; RunDirInUse when any live process holds part of the file."""
        assert self.fd is not None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in LOCK_HELD:
                raise self._in_use(read_holder(self.fd), lock_owner_pid(self.fd)) from None
            if err.errno in LOCKS_UNSUPPORTED:
                print(
                    f"vlm-train: warning: the filesystem of {self.path.parent} refuses fcntl locks ({err.strerror}): "
                    "guarding run.dir by the heartbeat alone (set run.lock=heartbeat to say so)",
                    file=sys.stderr,
                    flush=True,
                )
                return False
            raise
        return True

    def _judge(self, previous: Holder | None, me: Holder) -> str | None:
        """Whether the recorded holder is gone: None (nothing to take over), a takeover line, or RunDirInUse."""
        if previous is None or previous.released:
            return None
        now = time.time()
        taking = f"taking over run.dir={self.path.parent} from {previous.describe(now)}"
        if me.job and previous.job == me.job:
            return f"{taking}: an earlier start of this job"
        if previous.host == me.host:
            if self.uses_fcntl or not pid_alive(previous.pid):
                return f"{taking}: that process is gone"
            raise self._in_use(previous, previous.pid)
        if now - previous.heartbeat > self.stale_s:
            return f"{taking}: no heartbeat for {now - previous.heartbeat:.0f} s (run.lock_stale_s={self.stale_s:g})"
        return self._wait_for_silence(previous, taking)

    def _wait_for_silence(self, previous: Holder, taking: str) -> str:
        """A holder on another host, heard from recently: alive if its heartbeat moves again."""
        assert self.fd is not None
        wait_s = self.stale_s - (time.time() - previous.heartbeat)
        print(
            f"vlm-train: {previous.describe(time.time())} held run.dir={self.path.parent}: "
            f"waiting up to {max(wait_s, 0):.0f} s for its heartbeat",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(min(heartbeat_every(self.stale_s) / 2, max(deadline - time.monotonic(), 0)))
            now_holder = read_holder(self.fd)
            if now_holder is not None and (
                now_holder.heartbeat != previous.heartbeat or now_holder.token != previous.token
            ):
                if now_holder.released:
                    return f"run.dir={self.path.parent} was released by {now_holder.describe(time.time())}"
                raise self._in_use(now_holder, None)
        return f"{taking}: no heartbeat for {self.stale_s:g} s (run.lock_stale_s)"

    def _check_no_rival(self) -> None:
        """Heartbeat-only: two jobs that started together both wrote; the later write wins."""
        assert self.fd is not None and self.me is not None
        time.sleep(min(1.0, heartbeat_every(self.stale_s)))
        now_holder = read_holder(self.fd)
        if now_holder is not None and now_holder.token != self.me.token:
            self.me = None
            raise self._in_use(now_holder, None)

    def _in_use(self, holder: Holder | None, pid: int | None) -> RunDirInUse:
        who = holder.describe(time.time()) if holder is not None else "a process whose record is unreadable"
        if holder is not None and holder.released:
            who = f"a process of the job that ran there last ({who}, released by its rank 0)"
        if pid is not None and (holder is None or pid != holder.pid):
            who += f"; pid {pid} holds the lock"
        return RunDirInUse(
            f"run.dir={self.path.parent} is in use by {who}: wait for that job to end, stop it, or choose another run.dir"
        )

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(heartbeat_every(self.stale_s)):
                self._write_record()

        self._beat = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    def _write_record(self) -> None:
        assert self.me is not None and self.fd is not None
        self.me.heartbeat = time.time()
        try:
            os.pwrite(self.fd, self.me.encode(), 0)
            os.fsync(self.fd)  # to the server now: another node's client sees it once its attribute cache expires
        except OSError as err:  # a full or flaky filesystem: training goes on, the lock may look stale
            print(f"vlm-train: warning: cannot refresh {self.path}: {err.strerror}", file=sys.stderr, flush=True)

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextmanager
def hold_run_dir(run_dir: Path, mode: str, stale_s: float, rank: int, world: int) -> Iterator[None]:
    """Hold `run_dir` for the body, on every rank of the job; RunDirInUse (on every rank) when
    another live job holds it. Rank 0 decides, the others follow (one broadcast, one gather)."""
    import torch.distributed as dist  # here: the lock itself needs no torch (its test helpers start fast)

    if mode == "off":
        yield
        return
    lock = RunLock(run_dir, mode, stale_s)
    outcome: list[tuple[bool, bool, str]] = [(False, False, "")]  # ok, uses fcntl, refusal: rank 0's, broadcast
    if rank == 0:
        try:
            taken_over = lock.acquire()
            outcome = [(True, lock.uses_fcntl, "")]
            if taken_over:
                print(f"vlm-train: {taken_over}", file=sys.stderr, flush=True)
        except RunDirInUse as err:
            outcome = [(False, False, str(err))]
        except OSError as err:  # a run.dir that cannot be created or locked: the user's to fix
            outcome = [(False, False, f"cannot hold run.dir={run_dir}: {err.strerror}: {err.filename}")]
    try:
        if world > 1:
            dist.broadcast_object_list(outcome, src=0)
        ok, uses_fcntl, message = outcome[0]
        if not ok:
            raise RunDirInUse(message)
        if world > 1:
            _join_on_every_rank(lock, rank, world, uses_fcntl)
        yield
    finally:
        lock.release()


def _join_on_every_rank(lock: RunLock, rank: int, world: int, uses_fcntl: bool) -> None:
    import torch.distributed as dist

    refusal = ""
    if rank > 0:
        try:
            lock.join(rank, uses_fcntl)
        except RunDirInUse as err:
            refusal = str(err)
        except OSError as err:  # e.g. the lock file not visible on this node
            refusal = f"cannot hold run.dir={lock.path.parent} on rank {rank}: {err.strerror}: {err.filename}"
    refusals: list[str] = [""] * world
    dist.all_gather_object(refusals, refusal)
    first = next((r for r in refusals if r), "")
    if first:
        raise RunDirInUse(first)
