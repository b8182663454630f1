"""A pool of `VllmEngineActor`s, as the flow owns it: creation, start-up, restart counts,
the causes of engine deaths, shutdown. Shard tasks get its `client()` instead."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import SecretStr

from prefect_vllm._engine.client import EngineClient, actor_record, actor_state, root_cause
from prefect_vllm._engine.placement import check_fits, cluster_grows
from prefect_vllm._engine.protocol import EngineInfo
from prefect_vllm.config import ActorPoolConfig, EngineConfig
from prefect_vllm.exceptions import (
    ConfigurationError,
    EngineStartError,
)

logger = logging.getLogger("prefect_vllm.pool")

#: The Ray namespace of warm pools' named actors (`<pool>/<index>`).
WARM_NAMESPACE = "prefect-vllm"

#: How often a start that is still waiting for its engines says so.
PROGRESS_EVERY_S = 10.0

#: `progress(ready, total, seconds)`: engines ready of all, seconds since the wait began.
Progress = Callable[[int, int, float], None]

#: Engine processes crashing while they start, over the pool, that end the start.
_START_CRASHES = 2

#: The cause of a restart no actor recorded: the actor process itself was lost.
LOST_ACTOR_CAUSE = "actor process lost (killed while stuck, or its node lost)"

#: Restarts whose cause was not read: an actor was still restarting when the run ended.
UNREPORTED_CAUSE = "not reported (its actor was restarting when the run ended)"


def count_causes(reported: list[list[str] | None], before: list[int], restarts: int) -> dict[str, int]:
    """Engine deaths by cause, from each actor's record (None: the actor did not answer).

    Args:
        reported: Each actor's causes, oldest first, as its `info()` gave them.
        before: How many of each actor's causes predate the run (a warm pool's).
        restarts: The run's engine restarts, which the causes should account for.

    Examples:
        ```python
        from prefect_vllm._engine.pool import LOST_ACTOR_CAUSE, count_causes

        causes = count_causes([["killed by SIGKILL", "hang"], None], [1, 0], restarts=3)
        assert causes == {"hang": 1, "not reported (its actor was restarting when the run ended)": 2}
        assert count_causes([[]], [0], restarts=1) == {LOST_ACTOR_CAUSE: 1}
        ```
    """
    causes: dict[str, int] = {}
    for index, deaths in enumerate(reported):
        if deaths is None:
            continue
        for cause in deaths[before[index] if index < len(before) else 0 :]:
            causes[cause] = causes.get(cause, 0) + 1
    unaccounted = restarts - sum(causes.values())
    if unaccounted > 0:
        causes[UNREPORTED_CAUSE if None in reported else LOST_ACTOR_CAUSE] = unaccounted
    return causes


class VllmActorPool:
    """K Ray actors, each hosting one vLLM engine, that recover from engine death.

    The flow owns the pool; shard tasks on Ray workers get its `client()`, which
    holds the actor handles only and fails over to the next live actor.

    A *warm* pool has a name: its actors are named, detached Ray actors that
    outlive the process that started them, so many runs use the same engines
    (`attach`) and only `shutdown` ends them.

    Args:
        model: Hugging Face id or local folder.
        engine: How each engine is built.
        config: Actor count, resources and restart budget.
        hf_token: Hugging Face token for gated models; it reaches the actors as a
            constructor argument (never a logged environment or runtime_env).
        name: The warm pool's name; None for a pool that lives as long as its run.
    """

    def __init__(
        self,
        model: str,
        engine: EngineConfig,
        config: ActorPoolConfig,
        hf_token: SecretStr | None = None,
        name: str | None = None,
    ) -> None:
        self.model = model
        self.engine = engine
        self.config = config
        self.hf_token = hf_token
        self.name = name
        self.handles: list[Any] = []
        self._restarts_before: list[int] = []
        self._deaths_before: list[int] = []

    @property
    def warm(self) -> bool:
        """Whether this is a warm pool: its engines outlive the run that uses them."""
        return self.name is not None

    @classmethod
    def attach(cls, name: str, config: ActorPoolConfig | None = None) -> VllmActorPool:
        """The warm pool `name` on the connected Ray cluster, ready for a run.

        Args:
            name: The pool's name, as given to `prefect-vllm pool start`.
            config: The run's pool settings; only `shards_per_actor` (a run-side
                window) is taken from it, the rest are the pool's own.

        Raises:
            ConfigurationError: No pool of that name runs on this cluster.
            EngineStartError: Its engines do not answer.
        """
        handles = warm_pool_handles(name)
        if not handles:
            raise ConfigurationError(
                f"pool: no warm pool named {name!r} runs on this Ray cluster; start it with "
                f"`prefect-vllm pool start {name} --model MODEL` (see `prefect-vllm pool list`)"
            )
        pool = cls("", EngineConfig(), config or ActorPoolConfig(), name=name)
        pool.handles = handles
        pool._restarts_before = pool._actor_restarts()  # restarts before this run are not its own
        infos = pool._wait_started((config or ActorPoolConfig()).start_timeout_s)
        pool._deaths_before = [len(info.deaths) for info in infos]
        first = infos[0]
        pool.model = first.model
        pool.engine = EngineConfig.model_validate(first.engine)
        pool.config = ActorPoolConfig.model_validate(
            {**first.pool, "num_actors": len(handles), "shards_per_actor": pool.config.shards_per_actor}
        )
        return pool

    def start(self, *, fixed_cluster: bool = False, progress: Progress | None = None) -> list[EngineInfo]:
        """Create the actors and wait until every engine has started.

        Args:
            fixed_cluster: The cluster never grows (a local one this run started):
                actors that do not fit its resources fail at once instead of
                waiting `start_timeout_s` for nodes that never come.
            progress: Told every `PROGRESS_EVERY_S` how many engines are ready and for
                how long the start has run, so a long start is never silent.

        Returns:
            Each actor's `info()`: pid, engine start seconds, context length.

        Raises:
            EngineStartError: An engine failed to start, or not within the timeout.
            ConfigurationError: With `fixed_cluster`, the actors cannot all fit.
        """
        self.launch(fixed_cluster=fixed_cluster)
        return self.finish_start(progress)

    def launch(self, *, fixed_cluster: bool = False) -> None:
        """Create the actors and return at once; their engines start in the background
        (`finish_start` waits for them).

        Raises:
            ConfigurationError: With `fixed_cluster`, the actors cannot all fit.
        """
        import ray

        from prefect_vllm._engine.actor import VllmEngineActor

        cfg = self.config
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]
        num_gpus = cfg.num_gpus
        if num_gpus is None:
            has_gpus = any(node.get("GPU", 0) > 0 for node in nodes)
            num_gpus = float(self.engine.tensor_parallel_size) if has_gpus else 0.0
        if 0 < num_gpus < self.engine.tensor_parallel_size:
            raise ConfigurationError(
                f"--gpus-per-actor {num_gpus:g} is fewer than --tensor-parallel-size "
                f"{self.engine.tensor_parallel_size}: each of an engine's workers needs a GPU of its actor"
            )
        if fixed_cluster or not cluster_grows():
            check_fits(cfg, num_gpus, nodes)
        options: dict[str, Any] = dict(
            num_cpus=cfg.num_cpus,
            num_gpus=num_gpus,
            resources=cfg.resources or None,
            # One engine per node where possible: losing a node then costs one engine.
            scheduling_strategy="SPREAD",
            max_restarts=cfg.max_restarts,
            # Our shard logic retries lost calls itself: it must see each death to
            # tell a poison row from bad luck, which Ray's transparent retries hide.
            max_task_retries=0,
            max_concurrency=max(64, cfg.shards_per_actor * 8),
        )
        engine_config = self.engine.model_dump()
        actor_cls = ray.remote(VllmEngineActor)
        self.handles = []
        for index in range(cfg.num_actors):
            if self.name is not None:  # warm: named, and outliving the process that starts it
                options.update(name=f"{self.name}/{index}", namespace=WARM_NAMESPACE, lifetime="detached")
            self.handles.append(
                actor_cls.options(**options).remote(
                    self.model, engine_config, cfg.max_in_flight, self.hf_token, cfg.model_dump()
                )
            )

    def finish_start(self, progress: Progress | None = None) -> list[EngineInfo]:
        """Wait for the engines of `launch`: each actor's `info()`.

        Args:
            progress: As in `start`.

        Raises:
            EngineStartError: An engine failed to start, or not within
                `start_timeout_s`; the actors are shut down.
        """
        try:
            return self._wait_started(self.config.start_timeout_s, progress)
        except EngineStartError:
            self.shutdown()
            raise

    def wait_ready(self) -> list[EngineInfo]:
        """Every actor's `info()` once all engines answer (a warm pool's, before a run).

        Raises:
            EngineStartError: An engine failed to start, or not within `start_timeout_s`.
        """
        return self._wait_started(self.config.start_timeout_s)

    def _wait_started(self, timeout_s: float, progress: Progress | None = None) -> list[EngineInfo]:
        """Every actor's `info()` once all engines run; EngineStartError otherwise.

        An exception in the constructor is final (Ray never retries it). A process
        that crashes while starting would be restarted by Ray over and over: two
        crashes of one actor before it ever answered end the start instead.
        """
        import ray

        refs = [h.info.remote() for h in self.handles]
        began = time.monotonic()
        deadline = began + timeout_s
        told = began
        while True:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
            if (
                progress is not None
                and len(ready) < len(refs)
                and time.monotonic() - told >= PROGRESS_EVERY_S
            ):
                told = time.monotonic()
                progress(len(ready), len(refs), told - began)
            try:
                infos = [EngineInfo.of(ray.get(ref)) for ref in ready]  # a failed start raises here
            except ray.exceptions.RayActorError as exc:
                raise EngineStartError(
                    f"the vLLM engine for {self.model!r} failed to start: {root_cause(exc)}"
                ) from exc
            if len(infos) == len(refs):  # ray.wait keeps the order of `refs`
                return infos
            crashed = self.engine_restarts()
            if crashed >= _START_CRASHES:
                raise EngineStartError(
                    f"the vLLM engines for {self.model!r} crashed {crashed} times while starting; "
                    "see the actor logs above for the cause (often too little memory)"
                )
            if time.monotonic() > deadline:
                raise EngineStartError(
                    f"vLLM engines for {self.model!r} did not start within {timeout_s:.0f} s"
                )

    def client(self, probe_timeout_s: float = 60.0) -> EngineClient:
        """What shard tasks get: the actor handles and failover, no settings, no secrets.

        Args:
            probe_timeout_s: Past a call's deadline (twice over), how long a caller waits
                more before it kills an actor whose process itself is stuck.
        """
        return EngineClient(tuple(self.handles), probe_timeout_s)

    def engine_restarts(self) -> int:
        """How often Ray restarted this pool's actors since this run took the pool
        (each restart is a new engine)."""
        return sum(self.restarts_by_actor())

    def restarts_by_actor(self) -> list[int]:
        """`engine_restarts`, actor by actor (in the order of `handles`)."""
        now = self._actor_restarts()
        before = self._restarts_before or [0] * len(now)
        return [n - b for n, b in zip(now, before, strict=True)]

    def deaths_by_cause(self, timeout_s: float = 30.0) -> dict[str, int]:
        """Why this pool's engines died since this run took the pool: cause -> count.

        Each actor records the cause of its engine's death before it crash-exits
        (`killed by SIGKILL`, `crashed: RuntimeError: ...`, a hang) and reports it once
        restarted, so an actor that Ray is restarting now is waited for (up to
        `timeout_s` in all). Restarts that no actor reported are counted as
        `UNREPORTED_CAUSE` when an actor did not answer in time, else as
        `LOST_ACTOR_CAUSE` (the actor process itself was lost: killed from outside
        while stuck, or its node lost).
        """
        deadline = time.monotonic() + timeout_s
        reports = [self._info_when_up(index, deadline) for index in range(len(self.handles))]
        return count_causes(
            [None if info is None else list(info.deaths) for info in reports],
            self._deaths_before,
            self.engine_restarts(),
        )

    def _info_when_up(self, index: int, deadline: float) -> EngineInfo | None:
        """Actor `index`'s `info()`, waiting while Ray restarts it; None if it is dead for
        good or not back by `deadline`."""
        import ray

        while time.monotonic() < deadline:
            try:
                info = ray.get(
                    self.handles[index].info.remote(), timeout=max(0.1, deadline - time.monotonic())
                )
                return EngineInfo.of(info)
            except ray.exceptions.ActorUnavailableError:  # restarting: calls fail until it is back
                time.sleep(0.5)
            except ray.exceptions.GetTimeoutError:
                return None
            except ray.exceptions.RayActorError:
                if actor_state(self.handles[index]) == "DEAD":
                    return None
                time.sleep(0.5)
        return None

    def _actor_restarts(self) -> list[int]:
        return [int(actor_record(handle).get("NumRestarts", 0)) for handle in self.handles]

    def shutdown(self) -> None:
        """Kill every actor for good; Ray's child-process cleanup reaps the engines."""
        import ray

        for handle in self.handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception as exc:  # a dead actor or a lost cluster: nothing left to kill
                logger.debug("could not kill actor: %r", exc)


def warm_pool_handles(name: str) -> list[Any]:
    """The actor handles of the warm pool `name` on the connected cluster, in order."""
    import ray

    handles: list[Any] = []
    while True:
        try:
            handles.append(ray.get_actor(f"{name}/{len(handles)}", namespace=WARM_NAMESPACE))
        except ValueError:
            return handles


def warm_pool_names() -> list[str]:
    """The names of the warm pools on the connected cluster."""
    import ray

    actors = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        {a["name"].rsplit("/", 1)[0] for a in actors if a["namespace"] == WARM_NAMESPACE and "/" in a["name"]}
    )
