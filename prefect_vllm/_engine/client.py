"""The engine actors as a shard task sees them: handles, calls and failover, nothing else.

The pool (`VllmActorPool`, in the flow) owns the actors: it starts them, counts their
restarts and shuts them down. Shard tasks get an `EngineClient`: small, picklable, with
no model settings and no secrets. It checks liveness only when a call fails: a call's
stream first yields `GenerateStarted` once it has its turn on the engine, and that is
the proof of life; the actor's watchdog looks after an idle engine.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Any

from prefect_vllm._engine.protocol import GenerateCall, GenerateResult, GenerateStarted
from prefect_vllm.exceptions import EngineCrashedError, EngineError, EngineStartError, EngineUnavailableError

logger = logging.getLogger("prefect_vllm.pool")

__all__ = ["EngineClient", "actor_state", "root_cause"]

#: How long a call waits in all for an actor that Ray is restarting, before giving up.
UNAVAILABLE_WAIT_S = 600.0

#: How often a call lost before it started is sent again before it counts as a death.
UNSTARTED_RETRIES = 8


class Unanswered(enum.Enum):
    """Why an actor did not answer a call that never started on its engine."""

    #: Ray is restarting the actor: the call never reached the engine.
    RESTARTING = "restarting"
    #: The actor died (or froze and was killed) before the call started: send it again.
    LOST = "lost"
    #: Ray will not restart the actor: leave it out.
    DEAD = "dead"


@dataclass(frozen=True)
class EngineClient:
    """Calls into a pool's engine actors, failing over from one to the next.

    Attributes:
        handles: The Ray actor handles, in the pool's order.
        probe_timeout_s: Past a call's deadline (twice over), how long the caller waits
            more before it kills an actor whose process itself is stuck.
    """

    handles: tuple[Any, ...]
    probe_timeout_s: float = 60.0

    def generate(self, call: GenerateCall, preferred: int = 0) -> GenerateResult:
        """Run one call on actor `preferred`, or on the next one that can take it.

        An actor that Ray is restarting is skipped for another, and waited for when
        none can take the call; one that is dead for good is left out. A call lost
        before it had its turn on the engine (the actor died, or froze and was killed,
        while the call waited) is sent again: its rows are not to blame.

        Raises:
            EngineCrashedError: The engine died or hung while the call was running;
                Ray is restarting its actor. The caller decides how to retry the rows.
            EngineUnavailableError: Every actor is dead for good, or none came back
                within `UNAVAILABLE_WAIT_S`.
            EngineError: The actor raised an unexpected error.
        """
        count = len(self.handles)
        dead: set[int] = set()
        lost_unstarted = [0] * count
        deadline = time.monotonic() + UNAVAILABLE_WAIT_S
        index = preferred % count
        tried_since_wait = 0
        while len(dead) < count and time.monotonic() < deadline:
            if index in dead:
                index = (index + 1) % count
                continue
            outcome = self._call(index, call)
            if isinstance(outcome, GenerateResult):
                return outcome
            if outcome is Unanswered.DEAD:
                logger.warning("engine actor %d is dead for good; trying the next one", index)
                dead.add(index)
            elif outcome is Unanswered.LOST:
                lost_unstarted[index] += 1
                if lost_unstarted[index] >= UNSTARTED_RETRIES:
                    raise EngineCrashedError(
                        f"engine actor {index} died {UNSTARTED_RETRIES} times before the call started",
                        actor_index=index,
                    )
            tried_since_wait += 1
            if tried_since_wait >= count - len(dead):  # every live actor is restarting: wait
                time.sleep(0.5)
                tried_since_wait = 0
            index = (index + 1) % count
        if len(dead) == count:
            raise EngineUnavailableError(f"no live vLLM engine actor is left out of {count}", for_good=True)
        raise EngineUnavailableError(
            f"no vLLM engine actor took the call within {UNAVAILABLE_WAIT_S:.0f} s (all restarting)"
        )

    def _call(self, index: int, call: GenerateCall) -> GenerateResult | Unanswered:
        """One call on actor `index`: its result, or why there is none (`Unanswered`)."""
        import ray

        handle = self.handles[index]
        stream = handle.generate.options(num_returns="streaming").remote(call)
        backstop = _backstop_s(call.deadline_s, self.probe_timeout_s)
        started = False
        try:
            waited = self._wait_start(index, stream, backstop)
            if waited is not None:
                return waited
            started = True
            result = _next_item(stream, backstop)
        except ray.exceptions.GetTimeoutError as exc:
            # The call ran past twice its deadline, and the actor's own deadline did not
            # fire: its process itself is stuck.
            logger.error("engine actor %d did not answer in time; killing it for a restart", index)
            ray.kill(handle, no_restart=False)
            raise EngineCrashedError(
                f"engine actor {index} hung past the call's deadline and was restarted",
                actor_index=index,
                hung=True,
            ) from exc
        except ray.exceptions.RayActorError as exc:
            if started:
                raise EngineCrashedError(
                    f"the engine of actor {index} died during the call: {root_cause(exc)}",
                    actor_index=index,
                ) from exc
            return self._unstarted(index)
        except ray.exceptions.RayTaskError as exc:
            raise EngineError(f"the engine actor failed: {root_cause(exc)}") from exc
        if not isinstance(result, GenerateResult):
            raise EngineError(f"engine actor {index} answered with {type(result).__name__}, not its rows")
        return result

    def _wait_start(self, index: int, stream: Any, backstop: float | None) -> Unanswered | None:
        """Wait for the call's `GenerateStarted`: None once it came, else why it will not.

        A call may wait its turn behind others (an exclusive call keeps the engine to
        itself). Every `probe_timeout_s` without a start, the actor is asked whether it
        answers at all (the only liveness probe, and only for a call slow to start): an
        actor that is alive but silent is frozen and is killed for a restart; the call's
        rows never ran, so they are not to blame.

        Raises:
            ray.exceptions.RayActorError: The actor died before the call started.
        """
        import ray

        deadline = None if backstop is None else time.monotonic() + backstop
        while True:
            slice_s = self.probe_timeout_s
            if deadline is not None:
                slice_s = max(0.1, min(slice_s, deadline - time.monotonic()))
            try:
                first = _next_item(stream, slice_s)
            except ray.exceptions.GetTimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    return self._frozen(index, "the call did not start in time")
                if not self._answers(index):
                    return self._unstarted(index, silent=True)
                continue
            if not isinstance(first, GenerateStarted):
                raise EngineError(f"engine actor {index} did not say the call started")
            return None

    def _answers(self, index: int) -> bool:
        """Whether actor `index` answers `info` within `probe_timeout_s`."""
        import ray

        try:
            ray.get(self.handles[index].info.remote(), timeout=self.probe_timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return False
        return True

    def _unstarted(self, index: int, *, silent: bool = False) -> Unanswered:
        """What to do with a call that did not start on actor `index`, from Ray's view of it."""
        state = actor_state(self.handles[index])
        if state == "DEAD":
            return Unanswered.DEAD
        if state == "ALIVE":
            if silent:  # alive, and no answer to anything: frozen
                return self._frozen(index, "it is alive but does not answer")
            logger.info("engine actor %d died before the call started; sending it again", index)
            return Unanswered.LOST
        return Unanswered.RESTARTING  # the call never reached the engine

    def _frozen(self, index: int, why: str) -> Unanswered:
        import ray

        logger.error("engine actor %d: %s; killing it for a restart", index, why)
        ray.kill(self.handles[index], no_restart=False)
        return Unanswered.LOST


def actor_record(handle: Any) -> dict[str, Any]:
    """The actor's record in Ray's control store (`State`, `NumRestarts`, `Address`, ...);
    empty when Ray has none. The one place we read Ray's internal actor state."""
    from ray._private import state

    return dict(state.actors(actor_id=handle._actor_id.hex()) or {})


def actor_state(handle: Any) -> str:
    """The actor's state in Ray's control store: ALIVE, RESTARTING, DEAD, ..."""
    return str(actor_record(handle).get("State", "UNKNOWN"))


def _next_item(stream: Any, timeout: float | None) -> Any:
    """The next item of a streaming actor call, or GetTimeoutError after `timeout`."""
    import ray

    ready, _ = ray.wait([stream], timeout=timeout)
    if not ready:
        raise ray.exceptions.GetTimeoutError(f"no answer within {timeout} s")
    return ray.get(next(stream))


def _backstop_s(deadline_s: float | None, margin_s: float) -> float | None:
    """How long a caller waits for an answer: the actor's own deadline fires first,
    and a call may first wait for an exclusive one to finish."""
    return None if deadline_s is None else 2 * deadline_s + margin_s


def root_cause(exc: BaseException | None) -> str:
    """The line of a Ray error that names the real cause: our own start failure's
    message, else the last line that reads like an exception, else the last line."""
    import re

    if exc is None:
        return "unknown cause"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # The actor's constructor raises `EngineStartError` (the tree's own class); Ray passes
    # a constructor's exception on only as text, in its traceback.
    ours = f"{EngineStartError.__name__}: "
    for line in reversed(lines):
        if ours in line:
            return line.split(ours, 1)[1][:600]
    exception_line = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Failure): ")
    for line in reversed(lines):
        if exception_line.match(line):
            return line[:600]
    return lines[-1][:600] if lines else type(exc).__name__
