"""A pool of `VllmEngineActor`s: creation, start-up, failover and restart counts."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from prefect_vllm.config import ActorPoolConfig, EngineConfig
from prefect_vllm.exceptions import EngineError, EngineStartError, EngineUnavailableError

logger = logging.getLogger("prefect_vllm.pool")

#: How long a caller waits for an actor that Ray is restarting before trying another.
_UNAVAILABLE_WAIT_S = 600.0


@dataclass(frozen=True)
class GenerateRequest:
    """One batch of prompts for one actor call (a shard, or part of one).

    Attributes:
        prompts: Prompt strings (other values become row errors).
        seeds: Per-row sampling seeds, `None` for greedy rows.
        sampling: Keyword arguments for vLLM's `SamplingParams`, minus `seed`.
    """

    prompts: list[Any]
    seeds: list[int | None]
    sampling: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        """The plain dict the actor receives."""
        return {"prompts": self.prompts, "seeds": self.seeds, "sampling": self.sampling}


class VllmActorPool:
    """K Ray actors, each hosting one vLLM engine, that recover from engine death.

    The pool object is picklable: shard tasks on Ray workers receive it and call
    `generate`, which fails over to the next live actor when one is gone for good.

    Args:
        model: Hugging Face id or local folder.
        engine: How each engine is built.
        config: Actor count, resources and restart budget.
    """

    def __init__(self, model: str, engine: EngineConfig, config: ActorPoolConfig) -> None:
        self.model = model
        self.engine = engine
        self.config = config
        self.handles: list[Any] = []

    def start(self) -> list[dict[str, Any]]:
        """Create the actors and wait until every engine has started.

        Returns:
            Each actor's `info()`: pid, engine start seconds, context length.

        Raises:
            EngineStartError: An engine failed to start, or not within the timeout.
        """
        import ray

        from prefect_vllm._engine.actor import VllmEngineActor

        cfg = self.config
        num_gpus = cfg.num_gpus
        if num_gpus is None:
            resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
            has_gpus = resources.get("GPU", 0) > 0
            num_gpus = float(self.engine.tensor_parallel_size) if has_gpus else 0.0
        actor_cls = ray.remote(VllmEngineActor).options(
            num_cpus=cfg.num_cpus,
            num_gpus=num_gpus,
            max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_task_retries,
            max_concurrency=max(64, cfg.shards_per_actor * 8),
        )
        engine_config = self.engine.model_dump()
        self.handles = [
            actor_cls.remote(self.model, engine_config, cfg.max_in_flight) for _ in range(cfg.num_actors)
        ]
        try:
            return list(ray.get([h.info.remote() for h in self.handles], timeout=cfg.start_timeout_s))
        except ray.exceptions.GetTimeoutError as exc:
            self.shutdown()
            raise EngineStartError(
                f"vLLM engines for {self.model!r} did not start within {cfg.start_timeout_s:.0f} s"
            ) from exc
        except ray.exceptions.RayActorError as exc:
            self.shutdown()
            raise EngineStartError(
                f"the vLLM engine for {self.model!r} failed to start: {_root_cause(exc)}"
            ) from exc

    def generate(self, request: GenerateRequest, preferred: int = 0) -> dict[str, Any]:
        """Run one request batch, on `preferred` first, failing over to live actors.

        A call in flight on an actor whose engine died is retried by Ray on the
        restarted actor; only when Ray gives up on an actor does this move on.

        Raises:
            EngineUnavailableError: Every actor is dead.
            EngineError: The actor raised an unexpected error.
        """
        import ray

        payload = request.to_payload()
        count = len(self.handles)
        last: BaseException | None = None
        for k in range(count):
            handle = self.handles[(preferred + k) % count]
            deadline = time.monotonic() + _UNAVAILABLE_WAIT_S
            while True:
                try:
                    return dict(ray.get(handle.generate.remote(payload)))
                except ray.exceptions.ActorUnavailableError as exc:
                    # Ray is restarting it and our retries ran out: wait for the restart.
                    last = exc
                    if time.monotonic() > deadline:
                        break
                    time.sleep(1.0)
                except ray.exceptions.ActorDiedError as exc:
                    last = exc
                    logger.warning("engine actor %d is dead: %s", (preferred + k) % count, _root_cause(exc))
                    break
                except ray.exceptions.RayTaskError as exc:
                    raise EngineError(f"the engine actor failed: {_root_cause(exc)}") from exc
        raise EngineUnavailableError(
            f"no live vLLM engine actor is left out of {count}: {_root_cause(last)}"
        ) from last

    def engine_restarts(self) -> int:
        """How often Ray restarted this pool's actors (each restart is a new engine)."""
        from ray._private import state

        total = 0
        for handle in self.handles:
            info = state.actors(actor_id=handle._actor_id.hex())
            total += int(info.get("NumRestarts", 0)) if info else 0
        return total

    def shutdown(self) -> None:
        """Kill every actor for good; Ray's child-process cleanup reaps the engines."""
        import ray

        for handle in self.handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception as exc:  # a dead actor or a lost cluster: nothing left to kill
                logger.debug("could not kill actor: %r", exc)


def _root_cause(exc: BaseException | None) -> str:
    """The last meaningful line of a Ray error, which names the real cause."""
    if exc is None:
        return "unknown cause"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:500] if lines else type(exc).__name__
