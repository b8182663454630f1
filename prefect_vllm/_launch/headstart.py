"""Engines that start while the command's Prefect server starts and its flow plans.

`prefect-vllm run` knows what its engines need before its Prefect server answers
(7-16 s on 2 cores) and before its flow has created a run and planned the input: the
model, the engine and actor settings, the Ray address, and the server's address (its
port is chosen first). So it starts Ray and creates the engine actors at once, and the
flow's `run_on_ray` claims them instead of starting its own, one after the other.

A run on a warm pool has no engines to start, but its shard tasks need Ray workers on
the long-lived cluster, which a new driver gets only as new processes (each imports
Prefect): the command connects and starts them at once too (`connect_early`).

Only an exact match is claimed: the same model, engine and actor settings, cluster
and `ray.init` arguments. Anything else, and a head start no run claims (a refusal,
nothing left to run, a failure before the shards), is stopped. A head start that
fails is dropped quietly: the flow then starts Ray and the engines itself and reports
any error as it always has.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from prefect_vllm._engine.pool import VllmActorPool
from prefect_vllm._launch.signals import keeping_sigterm

logger = logging.getLogger("prefect_vllm.headstart")


@dataclass(frozen=True)
class HeadStart:
    """Ray started and engine actors created before the run's flow needed them.

    Attributes:
        pool: The pool whose actors were created (its engines may still be starting);
            None when only Ray was connected, for a warm pool's run.
        address: The Ray address given (None: a local cluster of this process's own).
        init_kwargs: The keyword arguments `ray.init` was given.
        ray_start_s: Seconds `ray.init` took.
        launched_at: `time.monotonic()` when the actors were created.
    """

    pool: VllmActorPool | None
    address: str | None
    init_kwargs: dict[str, Any]
    ray_start_s: float
    launched_at: float


_started: HeadStart | None = None


def start_early(pool: VllmActorPool, address: str | None, api_url: str) -> None:
    """Start Ray and create `pool`'s engine actors now; the run's flow claims them.

    Args:
        pool: The run's own pool, as the flow will build it.
        address: The run's Ray address (None: a local cluster).
        api_url: The Prefect API every Ray worker must reach.
    """
    global _started
    import ray

    from prefect_vllm._launch.ray_start import local_cluster, ray_init_kwargs, warm_shard_workers

    init_kwargs = ray_init_kwargs(address, api_url=api_url)
    try:
        ray_start_s = _init_ray(address, init_kwargs)
        warm_shard_workers(pool.config.num_actors * pool.config.shards_per_actor)
        pool.launch(fixed_cluster=local_cluster(address))
    except Exception as exc:  # the flow starts them itself, and reports what goes wrong
        logger.debug("no head start for the engines: %r", exc)
        ray.shutdown()
        return
    _started = HeadStart(pool, address, init_kwargs, ray_start_s, time.monotonic())


def connect_early(warm_pool: str, address: str | None, api_url: str, shards_per_actor: int) -> None:
    """Connect to the warm pool's cluster now and start its shard-task workers.

    The flow's own connection then finds Ray connected; `abandon` disconnects.
    """
    global _started
    import ray

    from prefect_vllm._engine.pool import warm_pool_handles
    from prefect_vllm._launch.ray_start import ray_init_kwargs, warm_shard_workers

    if not (address or os.environ.get("RAY_ADDRESS")):
        return  # the flow says what is missing
    init_kwargs = ray_init_kwargs(address, api_url=api_url)
    try:
        ray_start_s = _init_ray(address, init_kwargs)
        warm_shard_workers(max(1, len(warm_pool_handles(warm_pool))) * shards_per_actor)
    except Exception as exc:  # the flow connects itself, and reports what goes wrong
        logger.debug("no head start on the warm pool's cluster: %r", exc)
        ray.shutdown()
        return
    _started = HeadStart(None, address, init_kwargs, ray_start_s, time.monotonic())


def _init_ray(address: str | None, init_kwargs: dict[str, Any]) -> float:
    """Connect to (or start) Ray, keeping the SIGTERM handler; the seconds it took."""
    import ray

    began = time.monotonic()
    with keeping_sigterm():
        ray.init(address, **init_kwargs)
    return time.monotonic() - began


def claim(pool: VllmActorPool, address: str | None, init_kwargs: dict[str, Any]) -> HeadStart | None:
    """The head start made for exactly this pool and cluster, or None.

    A head start made for anything else is stopped, so the caller starts afresh.
    """
    global _started
    head, _started = _started, None
    if head is None:
        return None
    if head.pool is None:  # connected for a warm pool's run, not this one
        _stop(head)
        return None
    theirs = (head.pool.model, head.pool.engine, head.pool.config, head.pool.hf_token, head.address)
    if theirs == (pool.model, pool.engine, pool.config, pool.hf_token, address) and (
        head.init_kwargs == init_kwargs
    ):
        return head
    logger.debug("the head start was made for other settings: stopping it")
    _stop(head)
    return None


def abandon() -> None:
    """Stop a head start that no run claimed."""
    global _started
    head, _started = _started, None
    if head is not None:
        _stop(head)


def _stop(head: HeadStart) -> None:
    import ray

    if head.pool is not None:
        head.pool.shutdown()
    ray.shutdown()
