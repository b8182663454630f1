"""How a run reaches Ray: `ray.init`'s arguments, and the shard workers warmed early.

Prefect-free, so that the command can connect to Ray (`_headstart`) before it imports
Prefect.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["local_cluster", "ray_init_kwargs", "warm_shard_workers"]


def ray_init_kwargs(
    ray_address: str | None, runtime_env: dict[str, Any] | None = None, api_url: str | None = None
) -> dict[str, Any]:
    """Every Ray worker reaches the same Prefect server (`api_url`, default: the one the
    flow run reports to): never its own ephemeral one."""
    from prefect_vllm._launch.server import run_api_url
    from prefect_vllm._logs import quiet_ray_advice, quiet_worker_env

    quiet_ray_advice()  # every `ray.init` of a run is given these arguments
    api_url = api_url or run_api_url()
    env = dict(runtime_env or {})
    env_vars = {
        **quiet_worker_env(),
        **env.get("env_vars", {}),
        **({"PREFECT_API_URL": api_url} if api_url else {}),
    }
    kwargs: dict[str, Any] = {"runtime_env": {**env, "env_vars": env_vars}}
    if not ray_address:
        kwargs["include_dashboard"] = False
    return kwargs


def local_cluster(ray_address: str | None) -> bool:
    """Whether the run starts a Ray cluster of its own, which never grows."""
    return ray_address is None and not os.environ.get("RAY_ADDRESS")


def _import_shard_task() -> int:
    import prefect.task_engine  # noqa: F401 - the imports are the point: what a shard task runs

    import prefect_vllm.tasks.shards  # noqa: F401

    return os.getpid()


#: The Ray job whose shard workers were started, so that a second call starts none.
_warmed_job: list[str] = []


def warm_shard_workers(count: int) -> None:
    """Start the Ray workers for shard tasks while the engines start, not after.

    A fresh Ray worker spends seconds importing Prefect; paid during engine start-up,
    that time no longer leaves a ready engine idle before its first shard. Once per
    Ray job (connection): warming again while the first ones still import would only
    start more processes that compete for the same cores.
    """
    import ray

    context = ray.get_runtime_context()
    job = f"{context.gcs_address}/{context.get_job_id()}"  # a new local cluster reuses job ids
    if job in _warmed_job:
        return
    _warmed_job[:] = [job]
    warm = ray.remote(num_cpus=0)(_import_shard_task)
    for _ in range(count):
        warm.remote()
