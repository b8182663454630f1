"""One writer per job: a lock file beside the checkpoints.

Two triggers of the same job (a schedule firing while yesterday's run still goes, a
second click in the UI) must never write the same shards at once. The lock lives in
the output location, like the checkpoints, so it holds across machines and Prefect
databases.

On a local or network filesystem the lock is the kernel's (`flock` on `_lock.json`):
taking it is atomic, and it is freed the moment its holder's process ends, however it
ends. Object stores have no such lock, nor a conditional write that pyarrow can send,
so there the lock is advisory: a record with a heartbeat, written then read back, which
catches a second run that starts after the first has written it. A dead holder's
record is taken over once its process is gone from this host, else once its heartbeat
is older than `STALE_S`. The deployment's concurrency limit is the real guard there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any

import psutil

from prefect_vllm._store.checkpoint import CheckpointStore
from prefect_vllm.exceptions import JobRunningError

__all__ = ["LOCK", "JobLock", "check_not_running"]

LOCK = "_lock.json"

#: What `flock` answers on a filesystem that has no such lock.
_NO_KERNEL_LOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}

#: How often the holder of an advisory lock rewrites its heartbeat, and when a silent
#: holder is presumed dead.
HEARTBEAT_S = 10.0
STALE_S = 60.0


class JobLock:
    """The lock of the job in one output location; a context manager.

    Args:
        store: The job's output location.
        job_id: The job's id, for the messages.
        owner: Who holds it, for the messages (e.g. the flow run's name).
        flow_run_id: The holder's flow run, for `prefect-vllm cancel`.
        api_url: The Prefect API that flow run reports to, for `prefect-vllm cancel`.
        deployment_id: The flow run's deployment, if a Prefect worker or runner runs it
            (a Prefect cancellation stops those; a flow called directly gets SIGTERM).
    """

    def __init__(
        self,
        store: CheckpointStore,
        job_id: str,
        owner: str,
        flow_run_id: str | None = None,
        api_url: str | None = None,
        deployment_id: str | None = None,
    ) -> None:
        self._store = store
        self._record: dict[str, Any] = {
            "job_id": job_id,
            "token": uuid.uuid4().hex,
            "owner": owner,
            "flow_run_id": flow_run_id,
            "api_url": api_url,
            "deployment_id": deployment_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started_at": psutil.Process().create_time(),
            "started_at": time.time(),
        }
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise naming the run that holds it.

        Raises:
            JobRunningError: Another live run holds the lock.
        """
        if self._store.is_local:
            try:
                self._fd = _take_kernel_lock(self._store, self._record)
                return
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_LOCK:
                    raise
                # A filesystem without flock (some network mounts): the advisory record.
        held = _read(self._store)
        if held is not None and held.get("token") != self._record["token"] and not _is_stale(held):
            raise JobRunningError(_held_message(held))
        self._write()
        # Two runs that both found no record both wrote one: the last write wins, the
        # other reads it back and stands down.
        time.sleep(0.2)
        held = _read(self._store)
        if held is None or held.get("token") != self._record["token"]:
            raise JobRunningError(_held_message(held or self._record))
        self._beat = threading.Thread(target=self._heartbeat, name="prefect-vllm-lock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Give the lock up and remove its file, if it is still ours."""
        if self._fd is not None:
            path = self._store.path(LOCK)
            if _same_file(self._fd, path):
                os.unlink(path)  # before unlocking: a run waiting on this file sees it gone
            os.close(self._fd)  # frees the kernel lock
            self._fd = None
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        held = _read(self._store)
        if held is not None and held.get("token") == self._record["token"]:
            self._store.fs.delete_file(self._store.path(LOCK))

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except OSError:
                continue  # a storage hiccup: the next beat tries again

    def _write(self) -> None:
        self._store.write_bytes(LOCK, json.dumps({**self._record, "heartbeat_at": time.time()}).encode())


def check_not_running(store: CheckpointStore) -> None:
    """Raise if a live run holds the job's lock in `store` (a look, not a take).

    Raises:
        JobRunningError: Naming the run that holds it.
    """
    held = running_holder(store)
    if held is not None:
        raise JobRunningError(_held_message(held or None))


def _take_kernel_lock(store: CheckpointStore, record: dict[str, Any]) -> int:
    """Lock the job's lock file for this process and write `record` into it: the open
    descriptor.

    A holder removes the file as it lets go; a run that opened it just before then
    locks a file nobody will look at again, so it opens the path anew.
    """
    path = store.path(LOCK)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JobRunningError(_held_message(_read(store))) from None
        except OSError:
            os.close(fd)
            raise
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            return fd
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def running_holder(store: CheckpointStore) -> dict[str, Any] | None:
    """The lock record of the live run that holds the job in `store`, or None if no run
    holds it (a record torn by a dying holder reads as `{}`)."""
    if store.is_local:
        try:
            fd = os.open(store.path(LOCK), os.O_RDWR)  # NFS locks a write lock on writable files only
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return _read(store) or {}
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_LOCK:
                raise
        finally:
            os.close(fd)
    held = _read(store)
    return held if held is not None and not _is_stale(held) else None


def _read(store: CheckpointStore) -> dict[str, Any] | None:
    data = store.read_bytes(LOCK)
    if not data:
        return None  # a holder between create and write: its record comes next
    try:
        record = json.loads(data)
    except json.JSONDecodeError:
        return None  # a torn write by a dead holder
    return record if isinstance(record, dict) else None


def _is_stale(held: dict[str, Any]) -> bool:
    if held.get("host") == socket.gethostname() and not _alive(held.get("pid"), held.get("pid_started_at")):
        return True
    return time.time() - float(held.get("heartbeat_at") or 0) > STALE_S


def _alive(pid: Any, started_at: Any) -> bool:
    """Whether the holder's process still runs: its pid, started when the holder's did
    (a reused pid belongs to a process started later)."""
    try:
        proc = psutil.Process(int(pid))
        if started_at is not None and abs(proc.create_time() - float(started_at)) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, TypeError, ValueError):
        return False


def _held_message(held: dict[str, Any] | None) -> str:
    if not held:
        return "this job is already running (another process holds its lock): two runs never write one job at once"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("started_at") or 0)))
    return (
        f"job {held.get('job_id')!r} is already running ({held.get('owner')}, pid {held.get('pid')} on "
        f"{held.get('host')}, since {since}): two runs never write one job at once. Wait for it to "
        f"finish, or stop it; a run that dies frees the job at once (on object stores, after {STALE_S:.0f} s)."
    )
