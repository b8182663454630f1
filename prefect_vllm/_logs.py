"""What a run shows: our own lines, our errors in one line each, stdout for the summary.

Prefect logs the exception that ends a flow run with its traceback. Our own errors
are written for the user to read as they are, so their tracebacks are dropped from
every handler Prefect has set up (the console and the run's logs on the server),
unless `PREFECT_VLLM_DEBUG=1`. On the command line, other libraries' lines below
WARNING stay out of the terminal unless `--verbose`, and standard output carries the
summary alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TextIO

__all__ = [
    "QUIET_ENV",
    "QUIET_WORKER_ENV",
    "VLLM_NOTICES",
    "counted",
    "debugging",
    "quiet",
    "quiet_console",
    "quiet_ray_advice",
    "quiet_refusals",
    "quiet_vllm_notices",
    "quiet_worker_env",
    "summary_stdout",
]


class _RefusalWithoutTraceback(logging.Filter):
    """Prefect logs the exception that ends a flow run with its traceback. Our own errors
    (a refusal: bad settings, a changed job, a job already running, early engines made
    for other settings; shards left incomplete; an output location that refused a write) are one line each, which the
    command prints last; forty lines of traceback above it only bury it. On the
    command's console (`console`), a refusal's line is dropped whole: the command's last
    line says it."""

    def __init__(self, *, console: bool) -> None:
        super().__init__()
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect_vllm.exceptions import (
            ConfigurationError,
            HeadStartMismatchError,
            IncompleteJobError,
            JobRunningError,
            StorageError,
        )

        # Not EngineError: an engine actor that fails unexpectedly is worth its traceback.
        # A head start made for other settings names the one that differs, which is all
        # its traceback would say (PREFECT_VLLM_DEBUG=1 shows it).
        refusals = (ConfigurationError, JobRunningError, HeadStartMismatchError)
        quiet = (*refusals, IncompleteJobError, StorageError)
        if record.exc_info and isinstance(record.exc_info[1], quiet) and not debugging():
            if self.console and isinstance(record.exc_info[1], refusals):
                return False  # a refusal: the command's last line says it, not an ERROR above it
            record.exc_info = None
            record.exc_text = None
        return True


def _is_prefect_console(handler: logging.Handler) -> bool:
    from prefect.logging.handlers import PrefectConsoleHandler

    return isinstance(handler, PrefectConsoleHandler)


def quiet_refusals(*, root: bool = True) -> None:
    """Keep refusals' tracebacks out of every log handler Prefect has set up (the console
    and the run's logs on the server): each refusal is still logged, as its message.

    Args:
        root: The root logger's handlers too (the command's own process); a flow called
            from a user's program leaves the user's handlers alone.
    """
    names = [
        *([""] if root else []),
        *(n for n in logging.root.manager.loggerDict if n.startswith("prefect")),
    ]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _RefusalWithoutTraceback) for f in handler.filters):
                # On the command's console a refusal is its last line alone; the run's logs
                # on the server keep Prefect's line, without the traceback.
                console = type(handler) is logging.StreamHandler or _is_prefect_console(handler)
                handler.addFilter(_RefusalWithoutTraceback(console=root and console))


#: Set to 1 to see the tracebacks of prefect-vllm's own errors (they are one line otherwise).
DEBUG_ENV = "PREFECT_VLLM_DEBUG"

#: Set (by the command, unless `--verbose`) to quiet a run's Ray workers.
QUIET_ENV = "PREFECT_VLLM_QUIET"

#: What a run's Ray workers (engine actors, shard tasks) are told, unless `--verbose`:
#: vLLM and torch at warnings, Prefect's console at warnings (the task runs' INFO lines
#: still reach the Prefect API and the UI), no Python FutureWarnings from libraries.
QUIET_WORKER_ENV = {
    QUIET_ENV: "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}

#: Ray's own advice lines that a run's user cannot act on.
_RAY_ADVICE = ("Token authentication is enabled for this Ray cluster",)

#: What the command's last line says better: Prefect's ERROR for a flow run the user
#: stopped with Ctrl-C or SIGTERM (the run's logs on the server keep it).
_SAID_LAST = ("Execution was aborted by an interrupt signal",)


class _OursAtInfo(logging.Filter):
    """Below WARNING, only prefect-vllm's own lines: Prefect's engine logs its run's
    progress through the same run logger (`Beginning flow run`, `Finished in state`)."""

    def __init__(self, keep: tuple[str, ...]) -> None:
        super().__init__()
        self._keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return not any(said in record.getMessage() for said in (*_RAY_ADVICE, *_SAID_LAST))
        if f"{os.sep}prefect_vllm{os.sep}" in record.pathname:
            return True
        return any(kept in record.getMessage() for kept in self._keep)


def quiet_console(*, keep_run_link: bool, root: bool = True) -> None:
    """Our own lines at INFO, other libraries' at WARNING, on every console handler.

    Args:
        keep_run_link: Keep Prefect's `View at <url>` line (the server outlives the
            command); a temporary server's link would be dead once the command ends.
        root: The root logger's handlers too (the command's own process); a flow called
            from a user's program quiets Prefect's and Ray's handlers only.
    """
    import ray  # noqa: F401 - Ray's console handler must exist to be quieted

    kept = ("Starting temporary server", "View at") if keep_run_link else ("Starting temporary server",)
    quiet = _OursAtInfo(kept)
    names = [
        *([""] if root else []),
        "ray",
        *(name for name in logging.root.manager.loggerDict if name.startswith("prefect")),
    ]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, _OursAtInfo) for f in handler.filters
            ):
                handler.addFilter(quiet)


@contextlib.contextmanager
def summary_stdout() -> Iterator[TextIO]:
    """Standard output for the summary alone: everything else this process and its
    children write to file descriptor 1 (Ray prints its workers' output there) goes to
    standard error while the block runs.

    Yields:
        A stream on the original standard output.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(saved), "w", encoding="utf-8", closefd=True) as out:
            yield out
            out.flush()
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def debugging() -> bool:
    """Whether the user asked for our errors' tracebacks (`PREFECT_VLLM_DEBUG=1`)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def quiet() -> bool:
    """Whether this run keeps other libraries' lines below WARNING out: yes unless
    `QUIET_ENV` is `0` (`--verbose`), in the command and in Python alike."""
    return os.environ.get(QUIET_ENV, "1") not in ("", "0")


def quiet_worker_env() -> dict[str, str]:
    """The environment a run's Ray workers get: quiet unless the run is verbose
    (`QUIET_ENV=0`, passed on); a value set in this process's environment wins."""
    if not quiet():
        return {QUIET_ENV: "0"}
    return {key: os.environ.get(key, value) for key, value in QUIET_WORKER_ENV.items()}


#: vLLM warnings that say what prefect-vllm chose on purpose (CPU engines run eager, prefill
#: whole, one process) or that no user of the CPU wheel can act on, by the logger that emits
#: them. Filters on these loggers outlive vLLM's own logging set-up, which it redoes as an
#: engine starts (handlers are replaced; its module loggers are not).
VLLM_NOTICES: dict[str, tuple[str, ...]] = {
    "vllm.engine.arg_utils": ("does not officially support disabling chunked prefill",),
    "vllm.config.vllm": ("Enforce eager set", "Inductor compilation was disabled", "requires Triton"),
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type"),
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",),
    "vllm.v1.worker.cpu_worker": ("is not found in LD_PRELOAD",),
    # An engine death: its traceback says only "EngineCore encountered an issue" (the
    # cause is the death record's, which the run logs and counts by cause).
    "vllm.v1.engine.async_llm": ("AsyncLLM output_handler failed",),
    "vllm.v1.engine.core_client": ("engine core exited unexpectedly",),
}


class _WithoutNotices(logging.Filter):
    def __init__(self, notices: tuple[str, ...]) -> None:
        super().__init__()
        self._notices = notices

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in self._notices)


def quiet_vllm_notices() -> None:
    """Drop `VLLM_NOTICES` when the run is quiet. Call before importing vLLM (it warns
    while it is imported); the engine process forked from this one keeps the filters."""
    if not quiet():
        return
    for name, notices in VLLM_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WithoutNotices) for f in logger.filters):
            logger.addFilter(_WithoutNotices(notices))


def quiet_ray_advice() -> None:
    """Drop Ray's advice that a run's user cannot act on (`_RAY_ADVICE`) from Ray's own
    console handler, when the run is quiet. Call after importing Ray, before `ray.init`."""
    if not quiet():
        return
    for handler in logging.getLogger("ray").handlers:
        if not any(isinstance(f, _WithoutNotices) for f in handler.filters):
            handler.addFilter(_WithoutNotices(_RAY_ADVICE))


def counted(n: int, noun: str) -> str:
    """`n` and `noun`, plural unless `n` is 1: "1 shard", "0 poison rows"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
