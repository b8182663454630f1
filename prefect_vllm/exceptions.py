"""The whole error tree of prefect-vllm.

```
PrefectVllmError                       base; `retryable` says if a re-run may help
├── ConfigurationError (ValueError)    bad usage or settings; exit 2, before any engine starts
│   ├── InputError                     malformed input: names file, line, column, field
│   └── FingerprintMismatchError       resuming a job whose parameters changed
├── EngineError (RuntimeError)         the vLLM engine or its actors failed
│   ├── EngineStartError               an engine could not start (bounded attempts)
│   ├── EngineCrashedError             an engine died or hung while a call was in flight
│   └── EngineUnavailableError         no healthy actor is left to take work
├── HeadStartMismatchError (RuntimeError)  the command's early engines are not the flow's (a bug)
├── IncompleteJobError (RuntimeError)  shards remain uncommitted; a re-run resumes them
├── JobRunningError (RuntimeError)     another live run holds the job's lock
└── StorageError (OSError)             the output location refused a write (full, no permission)
```

Ray and vLLM exceptions never leave `flows/` and `tasks/` as they are: they are
translated into these classes (`raise ... from exc`) at the boundary.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigurationError",
    "EngineCrashedError",
    "EngineError",
    "EngineStartError",
    "EngineUnavailableError",
    "FingerprintMismatchError",
    "HeadStartMismatchError",
    "IncompleteJobError",
    "InputError",
    "JobRunningError",
    "PrefectVllmError",
    "StorageError",
]


class PrefectVllmError(Exception):
    """Base class of every error raised by prefect-vllm."""

    #: Whether running the same job again may succeed without changing anything.
    retryable: bool = False

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (a shard task's failure reaches the flow through
        # Ray): rebuild them from their message and attributes, never by calling an
        # `__init__` whose arguments differ from `args`.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[PrefectVllmError], args: tuple[Any, ...], state: dict[str, Any]) -> PrefectVllmError:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigurationError(PrefectVllmError, ValueError):
    """Bad usage or configuration, found before any engine starts (exit status 2)."""

    retryable = False


class InputError(ConfigurationError):
    """Malformed input data; the message names the file, line, column or field.

    Attributes:
        path: The input file, when one is to blame.
        line: The 1-based line number in a text input, when known.
        column: The column or field name, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.path = path
        self.line = line
        self.column = column


class FingerprintMismatchError(ConfigurationError):
    """The output folder holds a job whose parameters differ from this run's.

    Attributes:
        changed: The names of the parameters whose values differ.
    """

    def __init__(self, message: str, *, changed: list[str]) -> None:
        super().__init__(message)
        self.changed = changed


class EngineError(PrefectVllmError, RuntimeError):
    """The vLLM engine or the Ray actors hosting it failed."""

    retryable = True


class EngineStartError(EngineError):
    """An engine failed to start; attempts are bounded, never a crash loop."""

    retryable = False


class EngineCrashedError(EngineError):
    """An engine died or hung while a call was in flight; its actor is being restarted.

    The shard logic catches it to retry the rows, alone, then split them, so that a
    row which kills every engine it meets ends as a row error instead of a crash loop.

    Attributes:
        actor_index: The pool index of the actor whose engine was lost.
        hung: True when the call ran past its deadline and the actor was killed.
    """

    retryable = True

    def __init__(self, message: str, *, actor_index: int, hung: bool = False) -> None:
        super().__init__(message)
        self.actor_index = actor_index
        self.hung = hung


class EngineUnavailableError(EngineError):
    """No healthy engine actor is left (Ray exhausted its restarts, or a node was lost).

    Retryable by a re-run, which starts engines of its own; within the run, only while
    some actor may still come back.

    Attributes:
        for_good: True when every actor of the pool is dead for good (Ray will restart
            none of them): no shard of this run can be served any more.
    """

    retryable = True

    def __init__(self, message: str, *, for_good: bool = False) -> None:
        super().__init__(message)
        self.for_good = for_good


class HeadStartMismatchError(PrefectVllmError, RuntimeError):
    """The engines `prefect-vllm run` started while its server started were made for other
    settings than the flow decided: a bug of ours (both ask one deciding step). The run
    stops, naming the difference, rather than start a second set of engines."""

    retryable = False


class IncompleteJobError(PrefectVllmError, RuntimeError):
    """Some shards have no commit marker; running the same job again resumes them.

    Attributes:
        incomplete: The ids of the shards that were not committed.
        result: The run's summary, when the run got far enough to make one.
    """

    retryable = True

    def __init__(self, message: str, *, incomplete: list[str], result: Any = None) -> None:
        super().__init__(message)
        self.incomplete = incomplete
        self.result = result


class JobRunningError(PrefectVllmError, RuntimeError):
    """Another live run of the same job holds its lock: two writers never share a job.

    Retryable: once that run ends (or dies), the same job can run again.
    """

    retryable = True


class StorageError(PrefectVllmError, OSError):
    """The output location refused a write: a full filesystem, no permission, an object
    store that failed the request. The shard being written is not committed.

    Not retryable within the run (the run ends, naming the location and the error);
    a re-run resumes once the cause is fixed.

    Also raised when the location cannot be reached or read before a run starts (an
    unknown bucket, no network, no permission): the command then exits 2.

    Attributes:
        location: The file that could not be written (or read, or the location reached).
        reason: The operating system's or the store's error.
    """

    retryable = False

    def __init__(self, location: str, reason: str, *, action: str = "write") -> None:
        super().__init__(f"cannot {action} {location}: {reason}")
        self.location = location
        self.reason = reason
