"""What a flow run sends its many Ray tasks once: put in Ray's object store by the flow,
read once per Ray worker process.

Thousands of shard tasks share a flow run's settings, its context, the task itself and
the job (`ShardJob`, with the engine actors' handles). Sent with each task, every one
would be serialized, deserialized and walked by Prefect on both sides; sent once, each
task carries a key and an object reference (nested in its arguments, so Ray does not
fetch it for every task), and each worker reads the value the first time it meets it.
"""

from __future__ import annotations

import uuid
from typing import Any, Generic, TypeVar

__all__ = ["SentOnce"]

T = TypeVar("T")

#: In a Ray worker: what was sent once, by key, newest last (a worker serves few runs at once).
_RECEIVED: dict[str, Any] = {}
_RECEIVED_KEPT = 16


class SentOnce(Generic[T]):
    """A value in Ray's object store: its key in the workers' cache, and its object ref.

    Not a dataclass on purpose: Prefect walks a task's dataclass parameters field by
    field, and this is to stay one opaque parameter (the value is not walked either).

    Attributes:
        key: The value's key in each worker's cache.
        ref: Its Ray object reference.
    """

    def __init__(self, key: str, ref: Any, local: T | None = None) -> None:
        self.key = key
        self.ref = ref
        self._local = local

    @classmethod
    def put(cls, value: T) -> SentOnce[T]:
        """`value`, put in the object store now (where Ray is connected: the flow)."""
        import ray

        return cls(uuid.uuid4().hex, ray.put(value), value)

    def __getstate__(self) -> dict[str, Any]:
        return {"key": self.key, "ref": self.ref}  # the value itself stays behind

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.key, self.ref, self._local = state["key"], state["ref"], None

    def get(self) -> T:
        """The value: the one put, in the process that put it; else read from the object
        store the first time in this worker process."""
        if self._local is not None:
            return self._local
        if self.key not in _RECEIVED:
            import ray

            while len(_RECEIVED) >= _RECEIVED_KEPT:  # oldest first
                del _RECEIVED[next(iter(_RECEIVED))]
            _RECEIVED[self.key] = ray.get(self.ref)
        value: T = _RECEIVED[self.key]
        return value
