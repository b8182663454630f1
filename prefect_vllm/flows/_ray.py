"""Running a job's pending shards on Ray: the engine pool, the shard window, the budget."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger

from prefect_vllm._engine.pool import VllmActorPool
from prefect_vllm._planning import ShardSpec
from prefect_vllm.results import ShardResult
from prefect_vllm.tasks import ShardJob, run_shard

#: How often the flow looks at the engine restart count while shards run.
_BUDGET_CHECK_S = 2.0


def ray_init_kwargs(
    ray_address: str | None, runtime_env: dict[str, Any] | None = None, api_url: str | None = None
) -> dict[str, Any]:
    """Every Ray worker reaches the same Prefect server (`api_url`, default: the one in
    force): never its own ephemeral one."""
    from prefect_vllm._server import configured_api_url

    api_url = api_url or configured_api_url()
    env = dict(runtime_env or {})
    env_vars = {**env.get("env_vars", {}), **({"PREFECT_API_URL": api_url} if api_url else {})}
    kwargs: dict[str, Any] = {"runtime_env": {**env, "env_vars": env_vars}}
    if not ray_address:
        kwargs["include_dashboard"] = False
    return kwargs


def local_cluster(ray_address: str | None) -> bool:
    """Whether the run starts a Ray cluster of its own, which never grows."""
    return ray_address is None and not os.environ.get("RAY_ADDRESS")


OnCommit = Callable[[ShardResult], None]


def ray_connection(address: str | None, runtime_env: dict[str, Any] | None = None) -> Any:
    """A connection to the long-lived cluster of a warm pool, for one run: its shard
    tasks get the run's runtime environment, as with a cluster the run starts."""
    from prefect_vllm.pools import connected

    return connected(address, **ray_init_kwargs(address, runtime_env))


def run_on_ray(
    pending: list[ShardSpec],
    job: ShardJob,
    pool: VllmActorPool,
    ray_address: str | None,
    runtime_env: dict[str, Any] | None = None,
    on_commit: OnCommit | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[dict[str, ShardResult], int, float]:
    """Start the engine pool, stream the pending shards through it, stop it.

    A warm pool is neither started nor stopped: its engines are up already and
    stay up for the next run.

    Args:
        timings: Filled with `ray_start_s` and `engine_start_s`, if given.

    Returns:
        The shards committed, the engine restarts, and the seconds spent generating.
    """
    import ray
    from prefect_ray import RayTaskRunner

    from prefect_vllm.flows import _headstart

    logger = get_run_logger()
    init_kwargs = ray_init_kwargs(ray_address, runtime_env)
    head = None if pool.warm else _headstart.claim(pool, ray_address, init_kwargs)
    timings = {} if timings is None else timings
    t0 = time.monotonic()
    try:
        with RayTaskRunner(address=ray_address, init_kwargs=init_kwargs) as runner:
            t1 = time.monotonic()
            if head is not None:  # Ray and the engines started beside the Prefect server
                pool = head.pool
                infos = pool.finish_start()
                ray_start_s, engine_start_s = head.ray_start_s, time.monotonic() - head.launched_at
            else:
                warm_shard_workers(pool.config.num_actors * pool.config.shards_per_actor)
                # A cluster this run started never grows: actors that cannot fit fail at once.
                infos = (
                    pool.wait_ready() if pool.warm else pool.start(fixed_cluster=local_cluster(ray_address))
                )
                ray_start_s, engine_start_s = t1 - t0, time.monotonic() - t1
            if pool.warm:
                logger.info("using warm pool %r: %d vLLM engine(s) of %s", pool.name, len(infos), pool.model)
            else:
                logger.info(
                    "%d vLLM engine(s) ready %.1f s after their actors were created (the engine "
                    "itself: %s s; Hugging Face token %s)",
                    len(infos), engine_start_s, ", ".join(f"{i['start_s']:.1f}" for i in infos),
                    "set" if all(i["hf_token_set"] for i in infos) else "not set",
                )  # fmt: skip
            timings.update(ray_start_s=round(ray_start_s, 3), engine_start_s=round(engine_start_s, 3))
            job = dataclasses.replace(job, pool=pool)
            started = time.monotonic()
            try:
                results = _stream_shards(runner, pending, job, pool, on_commit or (lambda _result: None))
            finally:
                generation_s = time.monotonic() - started
                restarts = pool.engine_restarts()
                if not pool.warm:
                    pool.shutdown()
    finally:
        if head is not None:  # Ray was started by the head start, not by the task runner
            ray.shutdown()
    timings["shutdown_s"] = round(time.monotonic() - started - generation_s, 3)
    return results, restarts, generation_s


def _import_shard_task() -> int:
    import prefect_vllm.tasks.shards  # noqa: F401 - the import is the point

    return os.getpid()


def warm_shard_workers(count: int) -> None:
    """Start the Ray workers for shard tasks while the engines start, not after.

    A fresh Ray worker spends seconds importing Prefect; paid during engine start-up,
    that time no longer leaves a ready engine idle before its first shard.
    """
    import ray

    warm = ray.remote(num_cpus=0)(_import_shard_task)
    for _ in range(count):
        warm.remote()


def _stream_shards(
    runner: Any, pending: list[ShardSpec], job: ShardJob, pool: VllmActorPool, on_commit: OnCommit
) -> dict[str, ShardResult]:
    """Keep `shards_per_actor` shards in flight per actor until every shard is done.

    The window keeps each engine fed across shard boundaries (the next shard's
    requests are queued while the previous one is written) without turning
    thousands of shards into thousands of Ray workers at once. Once the pool has
    restarted engines more than the job's budget, nothing new starts and the
    shards in flight are cancelled: they stay incomplete for a re-run.
    """
    import ray
    from prefect_ray.context import remote_options

    logger = get_run_logger()
    queue = deque(pending)
    load = [0] * pool.config.num_actors
    window = pool.config.num_actors * pool.config.shards_per_actor
    in_flight: dict[Any, tuple[ShardSpec, Any, int]] = {}
    results: dict[str, ShardResult] = {}
    budget = job.recovery.max_job_restarts
    while queue or in_flight:
        if pool.engine_restarts() > budget:
            for ref in in_flight:
                ray.cancel(ref, force=True)
            queue.clear()
            in_flight.clear()
            break
        while queue and len(in_flight) < window:
            spec = queue.popleft()
            actor = load.index(min(load))
            # Shard tasks reserve no CPU: on small machines the actors need every core.
            with remote_options(num_cpus=0):
                future = runner.submit(run_shard, {"spec": spec, "job": job, "actor_index": actor})
            in_flight[future.wrapped_future] = (spec, future, actor)
            load[actor] += 1
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=_BUDGET_CHECK_S)
        for ref in done:
            spec, future, actor = in_flight.pop(ref)
            load[actor] -= 1
            future.wait()
            state = future.state
            if state.is_completed():
                result: ShardResult = state.result()
                results[spec.shard_id] = result
                on_commit(result)
                logger.info(
                    "shard %s committed: %d rows (%d errors, %d poison rows), %d tokens, %.1f s, "
                    "attempt %d, %d engine deaths",
                    spec.shard_id, result.rows, result.rows_failed, len(result.poisoned_rows),
                    result.output_tokens, result.total_s, result.attempt, result.engine_deaths,
                )  # fmt: skip
            else:
                logger.error("shard %s not committed: %s", spec.shard_id, state.message)
    return results
