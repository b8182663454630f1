"""Why an engine died, as its actor knows it, kept for the actor Ray restarts.

The dying actor reads the engine process's exit status (the signal that killed it) or
the last error the engine logged into the actor's log files, records the cause in a
file on its node, and crash-exits; the actor Ray restarts on that node reads the record
and reports it with its `info()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = [
    "HANG_CAUSE",
    "actor_id",
    "deaths_dir",
    "engine_log_cause",
    "exit_status",
    "log_offsets",
    "record_death",
    "recorded_deaths",
    "signal_name",
    "worker_cause",
    "worker_death",
]

#: The folder of death records under Ray's session folder (or, outside Ray, the temp folder).
DEATHS_FOLDER = "prefect-vllm-deaths"

#: The cause of a death that hit its call's deadline.
HANG_CAUSE = "hang: no progress within the call's deadline"

#: How long a dying actor waits for its engine process's exit status.
EXIT_WAIT_S = 2.0


#: An error line vLLM logged: `... ERROR 11-25 03:43:24 [core.py:1510] RuntimeError: ...`.
_LOGGED_ERROR = re.compile(r"\bERROR \S+ \S+ \[[^\]]+\] ([A-Za-z_][\w.]*(?:Error|Exception): .+)$")


#: vLLM's multiprocess executor on a worker's death: `Worker proc VllmWorker-1 died
#: unexpectedly (exit code: -9), shutting down executor.`
_WORKER_DIED = re.compile(r"Worker proc (\S+) died unexpectedly \(exit code: ([^)]*)\)")


def _log_files() -> list[str]:
    """The files this actor's stdout and stderr go to (Ray sends a worker's there)."""
    paths = []
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            path = os.readlink(f"/proc/self/fd/{fd}")
            if os.path.isfile(path):
                paths.append(path)
    return paths


def log_offsets() -> dict[str, int]:
    """How far this actor's log files reach now: a later look reads only what follows."""
    offsets = {}
    for path in _log_files():
        with contextlib.suppress(OSError):
            offsets[path] = os.path.getsize(path)
    return offsets


def _log_lines(since: dict[str, int] | None) -> list[str]:
    """The lines of this actor's log files from `since` (`log_offsets()`), else their
    last 256 KiB."""
    lines: list[str] = []
    for path in _log_files():
        try:
            size = os.path.getsize(path)
            start = (since or {}).get(path, max(0, size - (256 << 10)))
            with open(path, "rb") as f:
                f.seek(max(start, size - (256 << 10)))
                lines.extend(f.read().decode("utf-8", "replace").splitlines())
        except OSError:
            continue
    return lines


def engine_log_cause(since: dict[str, int] | None = None, *, engine_only: bool = False) -> str | None:
    """The last exception line that the engine's processes logged into this actor's log.

    When the engine process fails to start, vLLM raises "Engine core initialization
    failed. See root cause above", and when it dies while running, the front end
    raises `EngineDeadError` ("see stack trace above"): the cause is only in the log
    that the engine processes share with this actor.

    Args:
        since: Read each file from this offset (`log_offsets()`), else its last 256 KiB.
        engine_only: Only lines the engine process logged, never the front end's.
    """
    causes: list[str] = []
    for line in _log_lines(since):
        match = _LOGGED_ERROR.search(line)
        if not match or "Engine core initialization failed" in match.group(1):
            continue
        if engine_only and ("(EngineCore" not in line or "EngineDeadError" in line):
            continue
        causes.append(match.group(1).strip())
    return causes[-1][:600] if causes else None


def worker_death(since: dict[str, int] | None = None) -> str | None:
    """The first worker of a multiprocess engine (tensor parallelism, a GPU's layout)
    that vLLM logged as dead, and how: `worker VllmWorker-1 killed by SIGKILL`.

    A worker is `VLLM::EngineCore`'s child, not the actor's: its exit status reaches
    the actor only through the line vLLM's executor logs before it shuts the engine
    down.
    """
    for line in _log_lines(since):
        cause = worker_cause(line)
        if cause is not None:
            return cause
    return None


def worker_cause(line: str) -> str | None:
    """A death cause from vLLM's "Worker proc ... died unexpectedly" log line, else None.

    Examples:
        ```python
        from prefect_vllm._engine.deaths import worker_cause

        line = "Worker proc VllmWorker-1 died unexpectedly (exit code: -9), shutting down executor."
        assert worker_cause(line) == "worker VllmWorker-1 killed by SIGKILL"
        assert worker_cause(line.replace("-9", "1")) == "worker VllmWorker-1 exited (status 1)"
        assert "not known" in worker_cause(line.replace("-9", "None"))
        ```
    """
    match = _WORKER_DIED.search(line)
    if match is None:
        return None
    name, code = match.group(1), match.group(2)
    if not code.lstrip("-").isdigit():  # logged before the process was reaped
        return f"worker {name} died (exit status not known yet when vLLM noticed)"
    if int(code) < 0:
        return f"worker {name} killed by {signal_name(-int(code))}"
    return f"worker {name} exited (status {code})"


def actor_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_actor_id())


def deaths_dir() -> Path:
    """Where this node's actors record why their engines died: in Ray's session folder
    (the parent of the actor's log folder), so the records go with the session and belong
    to whoever runs Ray; else the temp folder."""
    for path in _log_files():
        return Path(path).parent.parent / DEATHS_FOLDER
    return Path(tempfile.gettempdir()) / DEATHS_FOLDER


def recorded_deaths(folder: Path, actor_id: str) -> list[str]:
    """The causes recorded by this actor's earlier processes, oldest first."""
    try:
        lines = (folder / f"{actor_id}.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    causes = []
    for line in lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            causes.append(str(json.loads(line)["cause"]))
    return causes


def record_death(folder: Path, actor_id: str, cause: str) -> None:
    """Append one death's cause to the actor's record (best effort: the actor is dying)."""
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{actor_id}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"cause": cause, "pid": os.getpid(), "at": time.time()}) + "\n")


def exit_status(child: Any) -> int | None:
    """A child process's exit status (negative: the signal that killed it), waiting up
    to `EXIT_WAIT_S` for it to exit; None if it still runs.

    vLLM's own threads may reap the process first: the status then appears on the
    shared `Process` object a moment later, so it is read until it does.
    """
    deadline = time.monotonic() + EXIT_WAIT_S
    child.join(timeout=EXIT_WAIT_S)
    while child.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    code = child.exitcode
    return int(code) if code is not None else None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
