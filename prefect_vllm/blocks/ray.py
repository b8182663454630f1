"""The `RayCluster` block: where engines run and how many, saved once, reused by name."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field

from prefect_vllm.blocks._logo import _LOGO_URL
from prefect_vllm.config import ActorPoolConfig


class RayCluster(Block):
    """A Ray cluster for prefect-vllm jobs: its address, runtime environment and engine actors.

    Examples:
        Save a cluster once, then name it in any batch job:

        ```python
        from prefect_vllm.blocks import RayCluster

        RayCluster(address="ray://head:10001", num_actors=4, gpus_per_actor=1).save(
            "gpu-cluster", overwrite=True
        )
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
    num_actors: int = Field(default=1, ge=1, description="vLLM engine actors, one engine each.")
    cpus_per_actor: float = Field(default=1.0, ge=0, description="CPUs reserved per engine actor.")
    gpus_per_actor: float | None = Field(
        default=None, ge=0, description="GPUs reserved per engine actor; empty means tensor_parallel_size."
    )
    max_restarts: int = Field(default=32, ge=0, description="Engine restarts allowed per actor.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each actor reserves, e.g. a node label."
    )
    warm_pool: str | None = Field(
        default=None,
        description="A warm engine pool on this cluster (`prefect-vllm pool start NAME`) that jobs "
        "generate on instead of starting engines; empty starts engines per run.",
    )

    def pool_config(self) -> ActorPoolConfig:
        """The actor pool settings this block describes."""
        return ActorPoolConfig(
            num_actors=self.num_actors,
            num_cpus=self.cpus_per_actor,
            num_gpus=self.gpus_per_actor,
            max_restarts=self.max_restarts,
            resources=self.resources,
        )
