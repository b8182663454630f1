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


def _ray_init_kwargs(ray_address: str | None, runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every Ray worker reaches the same Prefect server: never its own ephemeral one."""
    from prefect_vllm._server import configured_api_url

    api_url = configured_api_url()
    env = dict(runtime_env or {})
    env_vars = {**env.get("env_vars", {}), **({"PREFECT_API_URL": api_url} if api_url else {})}
    kwargs: dict[str, Any] = {"runtime_env": {**env, "env_vars": env_vars}}
    if not ray_address:
        kwargs["include_dashboard"] = False
    return kwargs


OnCommit = Callable[[ShardResult], None]


def ray_connection(address: str | None, runtime_env: dict[str, Any] | None = None) -> Any:
    """A connection to the long-lived cluster of a warm pool, for one run: its shard
    tasks get the run's runtime environment, as with a cluster the run starts."""
    from prefect_vllm.pools import connected

    return connected(address, **_ray_init_kwargs(address, runtime_env))


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
    from prefect_ray import RayTaskRunner

    logger = get_run_logger()
    pool_config = pool.config
    init_kwargs = _ray_init_kwargs(ray_address, runtime_env)
    timings = {} if timings is None else timings
    t0 = time.monotonic()
    with RayTaskRunner(address=ray_address, init_kwargs=init_kwargs) as runner:
        t1 = time.monotonic()
        _warm_shard_workers(pool_config.num_actors * pool_config.shards_per_actor)
        if pool.warm:
            infos = pool.wait_ready()
            logger.info("using warm pool %r: %d vLLM engine(s) of %s", pool.name, len(infos), pool.model)
        else:
            # A cluster this run started never grows: actors that cannot fit fail at once.
            infos = pool.start(fixed_cluster=ray_address is None and not os.environ.get("RAY_ADDRESS"))
            logger.info(
                "%d vLLM engine(s) started in %s s (Hugging Face token %s)",
                len(infos), ", ".join(f"{i['start_s']:.1f}" for i in infos),
                "set" if all(i["hf_token_set"] for i in infos) else "not set",
            )  # fmt: skip
        timings.update(ray_start_s=round(t1 - t0, 3), engine_start_s=round(time.monotonic() - t1, 3))
        job = dataclasses.replace(job, pool=pool)
        started = time.monotonic()
        try:
            results = _stream_shards(runner, pending, job, pool, on_commit or (lambda _result: None))
        finally:
            generation_s = time.monotonic() - started
            restarts = pool.engine_restarts()
            if not pool.warm:
                pool.shutdown()
    timings["shutdown_s"] = round(time.monotonic() - started - generation_s, 3)
    return results, restarts, generation_s


def _import_shard_task() -> int:
    import prefect_vllm.tasks.shards  # noqa: F401 - the import is the point

    return os.getpid()


def _warm_shard_workers(count: int) -> None:
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
