"""Warm engine pools: vLLM engines that outlive one run, on a Ray cluster that outlives one run.

A run that starts its own engines pays their start-up (about a minute on a CPU, far
more for a large model on GPUs) before its first token. A warm pool is started once
on a long-lived Ray cluster (`ray start --head`, or any cluster `ray.init` reaches)
and used by many runs (`batch_inference(..., warm_pool=NAME)`, `prefect-vllm run
--pool NAME`), which start generating at once and leave the engines up. Everything
true of a run's own engines holds: an engine that dies crash-exits its actor and Ray
restarts it; hung engines, poison rows and restart budgets are handled per run;
runs that share a pool never mix rows. `stop_pool` ends the engines and their
processes.

The pool's actors are named, detached Ray actors (`NAME/0`, `NAME/1`, ... in the
`prefect-vllm` namespace); the model, engine and actor settings they were started
with are read back from them, so a run needs the name alone.

Examples:
    ```python
    from prefect_vllm.config import EngineConfig
    from prefect_vllm.pools import list_pools, start_pool, stop_pool
    from prefect_vllm.testing import make_tiny_model

    if __name__ == "__main__":
        address = "auto"  # the cluster `ray start --head` started on this machine
        model = str(make_tiny_model("/tmp/tiny-llama"))
        start_pool("tiny", model, engine=EngineConfig(), ray_address=address)
        print(list_pools(ray_address=address))  # [{'name': 'tiny', 'model': ..., 'actors': [...]}]
        stop_pool("tiny", ray_address=address)
    ```
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect_vllm.config import ActorPoolConfig, EngineConfig
from prefect_vllm.exceptions import ConfigurationError

__all__ = ["list_pools", "pool_status", "start_pool", "stop_pool"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

#: How long `pool status` waits for a live actor to say who it is.
_INFO_TIMEOUT_S = 10.0


def start_pool(
    name: str,
    model: str,
    *,
    engine: EngineConfig | None = None,
    config: ActorPoolConfig | None = None,
    ray_address: str | None = None,
) -> list[dict[str, Any]]:
    """Start the warm pool `name` and wait until every engine runs.

    Args:
        name: The pool's name: 1-64 letters, digits, '.', '_' or '-'.
        model: Hugging Face id or local model folder (a path every node can read).
        engine: How each engine is built. Default: `EngineConfig()`.
        config: Actor count, resources and per-actor restart budget (the budget
            lasts the pool's lifetime). Default: `ActorPoolConfig()`.
        ray_address: The long-lived cluster; default: `RAY_ADDRESS`.

    Returns:
        What each engine actor says of itself (`pid`, `start_s`, `max_model_len`,
        `tasks`, `node`, `gpus`, ...), as plain dicts.

    Raises:
        ConfigurationError: A bad name, no cluster named, or a pool of that name
            already runs.
        EngineStartError: An engine did not start (the pool is then removed).
    """
    from prefect_vllm._engine.pool import VllmActorPool, warm_pool_handles
    from prefect_vllm._job import check_model

    _check_name(name)
    check_model(model)
    with _connected(ray_address):
        if warm_pool_handles(name):
            raise ConfigurationError(
                f"pool: a warm pool named {name!r} already runs on this cluster; use it, or stop it "
                f"first with `prefect-vllm pool stop {name}`"
            )
        pool = VllmActorPool(model, engine or EngineConfig(), config or ActorPoolConfig(), name=name)
        return [info.as_dict() for info in pool.start()]


def stop_pool(name: str, *, ray_address: str | None = None, timeout_s: float = 60.0) -> int:
    """Stop the warm pool `name`: its actors and their engine processes end.

    Runs using it lose their engines (their shards stay uncommitted; a re-run resumes).

    Returns:
        How many engine actors were stopped.

    Raises:
        ConfigurationError: No pool of that name runs on the cluster.
    """
    import ray

    from prefect_vllm._engine.pool import warm_pool_handles

    _check_name(name)
    with _connected(ray_address):
        handles = warm_pool_handles(name)
        if not handles:
            raise ConfigurationError(f"pool: no warm pool named {name!r} runs on this Ray cluster")
        for handle in handles:
            ray.kill(handle, no_restart=True)
        deadline = time.monotonic() + timeout_s
        while warm_pool_handles(name) and time.monotonic() < deadline:
            time.sleep(0.2)
        return len(handles)


def pool_status(name: str, *, ray_address: str | None = None) -> dict[str, Any]:
    """The warm pool `name`: its model and engine settings, and each actor's state.

    Returns:
        `{name, model, engine, actors: [{index, state, restarts, pid, node, gpus}]}`;
        `state` is Ray's (ALIVE, RESTARTING, DEAD); `node` is the Ray node id and `gpus`
        the GPU ids Ray gave the actor there; `pid` and `node` are None when the actor
        does not answer.

    Raises:
        ConfigurationError: No pool of that name runs on the cluster.
    """
    _check_name(name)
    with _connected(ray_address):
        return _describe(name)


def list_pools(*, ray_address: str | None = None) -> list[dict[str, Any]]:
    """Every warm pool on the cluster, as `pool_status` describes it."""
    from prefect_vllm._engine.pool import warm_pool_names

    with _connected(ray_address):
        return [_describe(name) for name in warm_pool_names()]


def _describe(name: str) -> dict[str, Any]:
    import ray

    from prefect_vllm._engine.client import actor_record
    from prefect_vllm._engine.pool import warm_pool_handles
    from prefect_vllm._engine.protocol import EngineInfo

    handles = warm_pool_handles(name)
    if not handles:
        raise ConfigurationError(f"pool: no warm pool named {name!r} runs on this Ray cluster")
    actors: list[dict[str, Any]] = []
    identity: dict[str, Any] = {}
    for index, handle in enumerate(handles):
        record = actor_record(handle)
        actor: dict[str, Any] = {
            "index": index,
            "state": str(record.get("State", "UNKNOWN")),
            "restarts": int(record.get("NumRestarts", 0)),
            "pid": None,
            "node": None,
            "gpus": [],
        }
        if actor["state"] == "ALIVE":
            try:
                info = EngineInfo.of(ray.get(handle.info.remote(), timeout=_INFO_TIMEOUT_S))
                actor.update(pid=info.pid, node=info.node, gpus=list(info.gpus))
                identity = identity or {"model": info.model, "engine": info.engine}
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                pass
        actors.append(actor)
    return {
        "name": name,
        "model": identity.get("model"),
        "engine": identity.get("engine"),
        "actors": actors,
    }


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ConfigurationError(
            f"pool: name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


@contextmanager
def connected(ray_address: str | None, **init_kwargs: Any) -> Iterator[None]:
    """Connect this process to the long-lived cluster at `ray_address` (or `RAY_ADDRESS`)
    unless it is connected already; disconnect afterwards.

    Raises:
        ConfigurationError: Neither names a cluster (a warm pool never lives on a
            local cluster that one process starts), or it cannot be reached.
    """
    import ray

    from prefect_vllm._launch.signals import keeping_sigterm
    from prefect_vllm._logs import quiet_ray_advice

    if ray.is_initialized():
        yield
        return
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigurationError(
            "pool: a warm pool lives on a long-lived Ray cluster; start one with `ray start --head` "
            "and name it with --ray-address (ray_address) or RAY_ADDRESS"
        )
    quiet_ray_advice()
    try:
        with keeping_sigterm():
            ray.init(address, **init_kwargs)
    except ConnectionError as exc:
        raise ConfigurationError(
            f"pool: cannot reach the Ray cluster at {address!r}: {exc}; on the head node itself use "
            "`auto`, elsewhere set RAY_AUTH_MODE=token if the cluster uses token authentication "
            "(the default of `ray start`)"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def _connected(ray_address: str | None) -> Any:
    """A quiet connection for one pool command: no actor logs on the terminal."""
    return connected(ray_address, log_to_driver=False, logging_level="WARNING")
