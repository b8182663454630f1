"""One writer per job: a lock file beside the checkpoints, kept alive by a heartbeat.

Two triggers of the same job (a schedule firing while yesterday's run still goes, a
second click in the UI) must never write the same shards at once. The lock lives in
the output location, like the checkpoints, so it holds across machines and Prefect
databases. A run that died leaves its lock behind: it is taken over at once when its
process is gone from this host, else once its heartbeat is older than `STALE_S`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any

import psutil

from prefect_vllm._checkpoint import CheckpointStore
from prefect_vllm.exceptions import JobRunningError

__all__ = ["LOCK", "JobLock", "check_not_running"]

LOCK = "_lock.json"

#: How often the holder rewrites its heartbeat, and when a silent holder is presumed dead.
HEARTBEAT_S = 10.0
STALE_S = 60.0


class JobLock:
    """The lock of the job in one output location; a context manager.

    Args:
        store: The job's output location.
        job_id: The job's id, for the messages.
        owner: Who holds it, for the messages (e.g. the flow run's name).
    """

    def __init__(self, store: CheckpointStore, job_id: str, owner: str) -> None:
        self._store = store
        self._record: dict[str, Any] = {
            "job_id": job_id,
            "token": uuid.uuid4().hex,
            "owner": owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started_at": psutil.Process().create_time(),
            "started_at": time.time(),
        }
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
        held = self._read()
        if held is not None and held.get("token") != self._record["token"] and not _is_stale(held):
            raise JobRunningError(_held_message(held))
        self._write()
        # Two runs that both found no lock both wrote one: the last write wins, the other
        # reads it back and stands down.
        time.sleep(0.2)
        held = self._read()
        if held is None or held.get("token") != self._record["token"]:
            raise JobRunningError(_held_message(held or self._record))
        self._beat = threading.Thread(target=self._heartbeat, name="prefect-vllm-lock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        held = self._read()
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

    def _read(self) -> dict[str, Any] | None:
        data = self._store.read_bytes(LOCK)
        if data is None:
            return None
        try:
            record = json.loads(data)
        except json.JSONDecodeError:
            return None  # a torn write by a dead holder: nobody holds it
        return record if isinstance(record, dict) else None


def check_not_running(store: CheckpointStore) -> None:
    """Raise if a live run holds the job's lock in `store` (a look, not a take).

    Raises:
        JobRunningError: Naming the run that holds it.
    """
    held = JobLock(store, "", owner="")._read()
    if held is not None and not _is_stale(held):
        raise JobRunningError(_held_message(held))


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


def _held_message(held: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("started_at") or 0)))
    return (
        f"job {held.get('job_id')!r} is already running ({held.get('owner')}, pid {held.get('pid')} on "
        f"{held.get('host')}, since {since}): two runs never write one job at once. Wait for it to "
        f"finish, or stop it; a run that died frees the job at once on its host, else after {STALE_S:.0f} s."
    )
