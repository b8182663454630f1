"""From a run's parameters and blocks to the one set of settings the job runs with,
and the one step that decides the job (`decide_job`).

Pure: the blocks are loaded before (`flows/_params.py`), so every rule about which
source wins, and which combinations are refused, is here and unit-tested. The
command (`prefect-vllm run`) and the flow call the same `decide_job` with the same
inputs: the command answers refusals and no-op resumes, and starts engines early,
without a second copy of the rules.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from prefect_vllm._input.planning import InputColumns, InputFile, input_task
from prefect_vllm._job_tasks import JobTask, job_task
from prefect_vllm.config import ActorPoolConfig, EmbedConfig, EngineConfig, RequestConfig, SamplingConfig
from prefect_vllm.exceptions import ConfigurationError

if TYPE_CHECKING:  # Prefect's blocks: a second of imports the command's checks do without
    from prefect_vllm._job import JobIdentity
    from prefect_vllm.blocks import RayCluster, VllmModel

__all__ = [
    "MODEL_BLOCK_PREFIX",
    "ColumnNames",
    "JobDecision",
    "JobSettings",
    "check_shard_size",
    "check_task",
    "decide_job",
    "decide_task",
    "resolve_settings",
    "resolve_task",
]

#: A `model` value of this form names a saved `VllmModel` block instead of a model.
MODEL_BLOCK_PREFIX = "vllm-model/"


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


@dataclass(frozen=True)
class ColumnNames:
    """The column names a run was given (None: its task's default)."""

    prompt: str | None = None
    messages: str = "messages"
    id: str = "custom_id"
    pair: str | None = None


@dataclass(frozen=True)
class JobDecision:
    """A job, decided: what it does, the columns it reads, who it is (id, fingerprint,
    the engine settings its engines start with, LoRA adapters) and its task's options.
    """

    task: JobTask
    columns: InputColumns
    identity: JobIdentity
    embed: EmbedConfig | None
    truncate_prompt_tokens: int | None


def decide_task(
    task: str | None,
    files: list[InputFile] | None,
    *,
    export: str | None,
    requests: RequestConfig,
    truncate_prompt_tokens: int | None,
    embed: EmbedConfig | None,
    names: Mapping[str, str] | None = None,
) -> JobTask:
    """The job's task (the one asked for, else the one an OpenAI Batch input's urls need),
    refusing each option given that its entry does not have.

    Args:
        files: The input files; None when they are not known yet (a dated input):
            the task asked for, else `generate`, is checked.
        names: How the caller names an option in messages (the command: its flags).

    Raises:
        ConfigurationError: Naming the parameter.
    """
    entry = job_task(resolve_task(task, input_task(files) if files is not None else None))
    check_task(entry.name, export=export, requests=requests, truncate_prompt_tokens=truncate_prompt_tokens)
    refusal = entry.refusal("embed", (names or {}).get("embed")) if embed is not None else None
    if refusal is not None:
        raise ConfigurationError(refusal)
    return entry


def task_columns(entry: JobTask, given: ColumnNames, names: Mapping[str, str] | None = None) -> InputColumns:
    """The columns a job of `entry`'s task reads, from the names given.

    Raises:
        ConfigurationError: A second column is named for a task that reads none.
    """
    if given.pair is not None and entry.pair_column is None:
        raise ConfigurationError(entry.refusal("pair_column", (names or {}).get("pair_column")) or "")
    return InputColumns.of_task(
        entry, prompt=given.prompt, messages=given.messages, id=given.id, pair=given.pair
    )


def check_shard_size(shard_size: int, where: str = "shard_size") -> None:
    """Refuse a shard size below one row, naming the parameter (`where`).

    Raises:
        ConfigurationError: The shard size is below 1.
    """
    if shard_size < 1:
        raise ConfigurationError(f"{where} must be at least 1, got {shard_size}")


def decide_job(
    *,
    model: str,
    engine: EngineConfig,
    sampling: SamplingConfig,
    requests: RequestConfig,
    files: list[InputFile],
    task: str | None,
    columns: ColumnNames,
    shard_size: int,
    job_id: str | None,
    export: str | None,
    embed: EmbedConfig | None,
    truncate_prompt_tokens: int | None,
    names: Mapping[str, str] | None = None,
) -> JobDecision:
    """Decide the job from its settings and its input files' identity (no row is read):
    the one step the command and the flow both take.

    Raises:
        ConfigurationError: Naming the parameter (the task's refusals, the shard size,
            the job id or LoRA folder).
    """
    from prefect_vllm._job import job_identity

    entry = decide_task(
        task, files, export=export, requests=requests, truncate_prompt_tokens=truncate_prompt_tokens,
        embed=embed, names=names,
    )  # fmt: skip
    check_shard_size(shard_size, (names or {}).get("shard_size", "shard_size"))
    input_columns = task_columns(entry, columns, names)
    identity = job_identity(
        model, files, input_columns, shard_size, sampling, engine, requests, job_id, task=entry.name,
        embed=embed, truncate_prompt_tokens=truncate_prompt_tokens,
    )  # fmt: skip
    return JobDecision(entry, input_columns, identity, embed, truncate_prompt_tokens)


def _over(default: SamplingConfig, given: SamplingConfig | None) -> SamplingConfig:
    """`default` with the fields that `given` was built with set over it."""
    if given is None:
        return default
    return SamplingConfig.model_validate(
        {**default.model_dump(), **given.model_dump(include=given.model_fields_set)}
    )
