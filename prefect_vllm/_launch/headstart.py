"""Engines that start while the command's Prefect server starts and its flow plans.

`prefect-vllm run` knows what its engines need before its Prefect server answers
(7-16 s on 2 cores) and before its flow has created a run and planned the input: the
model, the engine and actor settings (from the same deciding step the flow runs,
`flows/_resolve.py::decide_job`), the Ray address, and the server's address (its port
is chosen first). So it starts Ray and creates the engine actors at once, and hands
them to the flow it calls (`offered`): the flow's `run_on_ray` claims them instead of
starting its own, one after the other.

A run on a warm pool has no engines to start, but its shard tasks need Ray workers on
the long-lived cluster, which a new driver gets only as new processes (each imports
Prefect): the command connects and starts them at once too (`connect_early`).

Only an exact match is claimed: the same model, engine and actor settings, cluster
and `ray.init` arguments. Anything else is a bug of ours, never a silent second start:
the run stops with one line naming the difference (`HeadStartMismatchError`). A head
start no run claims (a refusal, nothing left to run, a failure before the shards) is
stopped (`abandon`). A head start that fails is dropped quietly: the flow then starts
Ray and the engines itself and reports any error as it always has.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prefect_vllm._engine.pool import VllmActorPool
from prefect_vllm._launch.signals import keeping_sigterm
from prefect_vllm.exceptions import HeadStartMismatchError

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


class Offer:
    """A head start handed to the flow run the command calls (`offered`).

    Attributes:
        head: The head start, or None (nothing was started early).
        claimed: Whether the flow took it (its run then stops it).
    """

    def __init__(self, head: HeadStart | None) -> None:
        self.head = head
        self.claimed = False


#: The offer to the flow the command is running, inside `offered`.
_OFFERED: contextvars.ContextVar[Offer | None] = contextvars.ContextVar("head_start", default=None)


def start_early(pool: VllmActorPool, address: str | None, api_url: str) -> HeadStart | None:
    """Start Ray and create `pool`'s engine actors now, for the run's flow to claim.

    Args:
        pool: The run's own pool, as the flow will build it.
        address: The run's Ray address (None: a local cluster).
        api_url: The Prefect API every Ray worker must reach.

    Returns:
        The head start, or None when it failed (the flow then starts them itself).
    """
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
        return None
    return HeadStart(pool, address, init_kwargs, ray_start_s, time.monotonic())


def connect_early(
    warm_pool: str, address: str | None, api_url: str, shards_per_actor: int
) -> HeadStart | None:
    """Connect to the warm pool's cluster now and start its shard-task workers.

    The flow's own connection then finds Ray connected; `abandon` disconnects.
    """
    import ray

    from prefect_vllm._engine.pool import warm_pool_handles
    from prefect_vllm._launch.ray_start import ray_init_kwargs, warm_shard_workers

    if not (address or os.environ.get("RAY_ADDRESS")):
        return None  # the flow says what is missing
    init_kwargs = ray_init_kwargs(address, api_url=api_url)
    try:
        ray_start_s = _init_ray(address, init_kwargs)
        warm_shard_workers(max(1, len(warm_pool_handles(warm_pool))) * shards_per_actor)
    except Exception as exc:  # the flow connects itself, and reports what goes wrong
        logger.debug("no head start on the warm pool's cluster: %r", exc)
        ray.shutdown()
        return None
    return HeadStart(None, address, init_kwargs, ray_start_s, time.monotonic())


def _init_ray(address: str | None, init_kwargs: dict[str, Any]) -> float:
    """Connect to (or start) Ray, keeping the SIGTERM handler; the seconds it took."""
    import ray

    began = time.monotonic()
    with keeping_sigterm():
        ray.init(address, **init_kwargs)
    return time.monotonic() - began


@contextlib.contextmanager
def offered(head: HeadStart | None) -> Iterator[Offer]:
    """Offer `head` to the flow run inside the block (the command calls the flow in it)."""
    offer = Offer(head)
    token = _OFFERED.set(offer)
    try:
        yield offer
    finally:
        _OFFERED.reset(token)


def claim(pool: VllmActorPool, address: str | None, init_kwargs: dict[str, Any]) -> HeadStart | None:
    """The head start offered to this flow run, made for exactly this pool and cluster;
    None when none was offered (a flow run from a deployment, or Python).

    Raises:
        HeadStartMismatchError: The head start was made for anything else, naming the
            difference; it is stopped first, and no second engine set starts.
    """
    offer = _OFFERED.get()
    if offer is None or offer.head is None or offer.claimed:
        return None
    head, offer.claimed = offer.head, True  # claimed once; the flow's run stops it
    difference = _difference(head, pool, address, init_kwargs)
    if difference is None:
        return head
    _stop(head)
    raise HeadStartMismatchError(
        f"the engines the command started early do not match the flow's: {difference}; "
        "no second set was started (this is a bug of prefect-vllm: please report it)"
    )


def _difference(
    head: HeadStart, pool: VllmActorPool, address: str | None, init_kwargs: dict[str, Any]
) -> str | None:
    """The first setting the head start was made with that the flow's pool differs in."""
    if head.pool is None:
        return "Ray was connected for a warm pool's run, and the flow starts engines of its own"
    started: dict[str, Any] = {
        "model": head.pool.model, **_flat("engine", head.pool.engine.model_dump(mode="json")),
        **_flat("pool", head.pool.config.model_dump(mode="json")), "hf_token": head.pool.hf_token is not None,
        "ray_address": head.address, **_flat("ray_init", head.init_kwargs),
    }  # fmt: skip
    needed: dict[str, Any] = {
        "model": pool.model, **_flat("engine", pool.engine.model_dump(mode="json")),
        **_flat("pool", pool.config.model_dump(mode="json")), "hf_token": pool.hf_token is not None,
        "ray_address": address, **_flat("ray_init", init_kwargs),
    }  # fmt: skip
    theirs, ours = head.pool.hf_token, pool.hf_token
    if theirs is not None and ours is not None and theirs.get_secret_value() != ours.get_secret_value():
        return "hf_token: another Hugging Face token"
    for key in sorted(set(started) | set(needed)):
        if started.get(key) != needed.get(key):
            return f"{key}: {started.get(key)!r} started, {needed.get(key)!r} needed"
    return None


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """`value`'s leaves by dotted key (an empty mapping has none)."""
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _flat(f"{prefix}.{name}", item).items()}
    return {prefix: value}


def abandon(head: HeadStart | None) -> None:
    """Stop a head start that no run claimed (or that its run was done with)."""
    if head is not None:
        _stop(head)


def _stop(head: HeadStart) -> None:
    import ray

    if head.pool is not None:
        head.pool.shutdown()
    ray.shutdown()
