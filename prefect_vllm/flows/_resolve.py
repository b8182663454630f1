"""From a flow run's parameters and blocks to the one set of settings the job runs with.

Pure: the blocks are loaded before (`flows/_params.py`), so every rule about which
source wins, and which combinations are refused, is here and unit-tested.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from prefect_vllm._input.planning import InputColumns
from prefect_vllm._job_tasks import job_task
from prefect_vllm.config import ActorPoolConfig, EngineConfig, RequestConfig, SamplingConfig
from prefect_vllm.exceptions import ConfigurationError

if TYPE_CHECKING:  # Prefect's blocks: a second of imports the command's checks do without
    from prefect_vllm.blocks import RayCluster, VllmModel

__all__ = ["JobSettings", "check_task", "resolve_settings", "resolve_task"]


@dataclass(frozen=True)
class JobSettings:
    """What one run of a job is given, every source (parameters, blocks) resolved."""

    input: str
    output: str
    model: str
    #: None: the warm pool's engine settings when a pool is named, else `EngineConfig()`.
    engine: EngineConfig | None
    sampling: SamplingConfig
    requests: RequestConfig
    columns: InputColumns
    pool: ActorPoolConfig
    warm_pool: str | None
    ray_address: str | None
    runtime_env: dict[str, Any] = field(default_factory=dict)
    hf_token: SecretStr | None = field(default=None, repr=False)


def resolve_settings(
    *,
    input: str,
    output: str,
    model: str,
    model_block: VllmModel | None = None,
    engine: EngineConfig | None = None,
    sampling: SamplingConfig | None = None,
    requests: RequestConfig | None = None,
    columns: InputColumns | None = None,
    pool: ActorPoolConfig | None = None,
    cluster: RayCluster | None = None,
    ray_address: str | None = None,
    warm_pool: str | None = None,
    when: dt.datetime,
) -> JobSettings:
    """The settings a run uses: parameters given win over a block's defaults.

    - A `VllmModel` block gives the model, the engine settings and the Hugging Face
      token; its sampling is the default, and the fields that `sampling` sets (its
      `model_fields_set`: defaults typed out included) are set over it.
    - A `RayCluster` block gives the address, the runtime environment and the engine
      actors; its warm pool is the default when `warm_pool` is not given.
    - `{date}` and `{yesterday}` in `input` and `output` are the day of `when`.

    Raises:
        ConfigurationError: One setting is given twice (`engine` beside a model block,
            `pool` or another `ray_address` beside a cluster block), LoRA adapters are
            asked of a warm pool, or a path has another `{...}` field.
    """
    from prefect_vllm.flows._params import render_dated  # imports Prefect

    hf_token = None
    if model_block is not None:
        if engine is not None:
            raise ConfigurationError(
                "engine: give engine settings in the VllmModel block or in `engine`, not both"
            )
        model, engine, hf_token = model_block.model, model_block.engine_config(), model_block.hf_token
        sampling = _over(model_block.sampling, sampling)
    runtime_env: dict[str, Any] = {}
    if cluster is not None:
        if pool is not None:
            raise ConfigurationError(
                "pool: give actor settings in the RayCluster block or in `pool`, not both"
            )
        if ray_address is not None and ray_address != cluster.address:
            raise ConfigurationError(
                "ray_address: give the address in the RayCluster block or here, not both"
            )
        pool, ray_address, runtime_env = cluster.pool_config(), cluster.address, dict(cluster.runtime_env)
        warm_pool = warm_pool or cluster.warm_pool
    requests = requests or RequestConfig()
    if warm_pool is not None and requests.lora_dir is not None:
        raise ConfigurationError(
            "pool: LoRA adapters (lora_dir) need engines started for them; run without a warm pool"
        )
    return JobSettings(
        input=render_dated(input, when),
        output=render_dated(output, when),
        model=model,
        engine=engine if engine is not None or warm_pool is not None else EngineConfig(),
        sampling=sampling or SamplingConfig(),
        requests=requests,
        columns=columns or InputColumns(),
        pool=pool or ActorPoolConfig(),
        warm_pool=warm_pool,
        ray_address=ray_address,
        runtime_env=runtime_env,
        hf_token=hf_token,
    )


def resolve_task(task: str | None, needed: str | None) -> str:
    """The job's task: the one asked for, else the one its OpenAI Batch requests need
    (`needed`, from `input_task`: `/v1/embeddings` needs `embed`), else `generate`.

    Raises:
        ConfigurationError: The task asked for is not the one the requests need.
    """
    if task is None:
        return needed or "generate"
    if needed is not None and needed != task:
        raise ConfigurationError(
            f"task: {task!r}, but the input's OpenAI Batch requests are for task {needed!r} "
            f"(their url); leave the task out, or use {needed!r}"
        )
    return job_task(task).name


def check_task(
    task: str,
    *,
    export: str | None,
    requests: RequestConfig,
    truncate_prompt_tokens: int | None = None,
) -> None:
    """Refuse what a job of `task` cannot do, before anything starts: each option its
    entry in the task table does not have (`JobTask.refusal`).

    Raises:
        ConfigurationError: Naming the parameter.
    """
    entry = job_task(task)
    given = {
        "export": export is not None,
        "requests": requests.lora_dir is not None or requests.json_schema is not None,
        "truncate_prompt_tokens": truncate_prompt_tokens is not None,
    }
    for option, is_given in given.items():
        refusal = entry.refusal(option) if is_given else None
        if refusal is not None:
            raise ConfigurationError(refusal)
    if truncate_prompt_tokens is not None and (truncate_prompt_tokens == 0 or truncate_prompt_tokens < -1):
        raise ConfigurationError(
            f"truncate_prompt_tokens: keep N >= 1 tokens, or -1 for the model's context; "
            f"got {truncate_prompt_tokens}"
        )


def _over(default: SamplingConfig, given: SamplingConfig | None) -> SamplingConfig:
    """`default` with the fields that `given` was built with set over it."""
    if given is None:
        return default
    return SamplingConfig.model_validate(
        {**default.model_dump(), **given.model_dump(include=given.model_fields_set)}
    )
