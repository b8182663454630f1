"""The `RayCluster` block: where engines run and how many, saved once, reused by name."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, model_validator

from prefect_vllm.blocks._logo import _LOGO_URL
from prefect_vllm.config import ActorPoolConfig


class RayCluster(Block):
    """A Ray cluster for prefect-vllm jobs: its address, runtime environment and engine actors.

    Examples:
        Save a cluster once, then name it in any batch job:

        ```python
        from prefect_vllm.blocks import RayCluster
        from prefect_vllm.config import ActorPoolConfig

        RayCluster(
            address="ray://head:10001", actors=ActorPoolConfig(num_actors=4, num_gpus=1)
        ).save("gpu-cluster", overwrite=True)
        cluster = RayCluster.load("BLOCK_NAME")
        pool = cluster.pool_config()
        ```
    """

    _block_type_name = "vLLM Ray Cluster"
    _block_type_slug = "vllm-ray-cluster"
    _logo_url = _LOGO_URL  # type: ignore[assignment]
    _documentation_url = "https://docs.ray.io/en/latest/cluster/getting-started.html"  # type: ignore[assignment]
    _description = "A Ray cluster and the vLLM engine actors prefect-vllm runs on it."

    address: str | None = Field(
        default=None,
        description="Ray address (`auto`, `ray://head:10001`); empty starts a local Ray instance.",
    )
    runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray runtime environment for the job's workers (pip, env_vars, working_dir).",
    )
    actors: ActorPoolConfig = Field(
        default_factory=ActorPoolConfig,
        description="The vLLM engine actors: how many, the resources each reserves, its restart "
        "budget, requests and shards in flight, start timeout.",
    )
    warm_pool: str | None = Field(
        default=None,
        description="A warm engine pool on this cluster (`prefect-vllm pool start NAME`) that jobs "
        "generate on instead of starting engines; empty starts engines per run.",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_actor_fields(cls, data: Any) -> Any:
        """Accept the flat actor fields of blocks saved before `actors` nested them."""
        if not isinstance(data, dict) or not any(key in data for key in _FLAT_FIELDS):
            return data
        data = dict(data)
        actors = dict(data.get("actors") or {})
        for old, new in _FLAT_FIELDS.items():
            if old in data:
                actors.setdefault(new, data.pop(old))
        data["actors"] = actors
        return data

    def pool_config(self) -> ActorPoolConfig:
        """The actor pool settings this block describes, every one of them."""
        return self.actors


#: Fields of blocks saved before `actors` nested `ActorPoolConfig`, and where they went.
_FLAT_FIELDS = {
    "num_actors": "num_actors",
    "cpus_per_actor": "num_cpus",
    "gpus_per_actor": "num_gpus",
    "max_restarts": "max_restarts",
    "resources": "resources",
}
