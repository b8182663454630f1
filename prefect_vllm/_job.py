"""Who a job is and what a run of it did: prefect-free, so the command can answer
a refusal or a no-op resume from the checkpoints before it starts anything."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from prefect_vllm._input.lora import find_adapters, lora_engine_args
from prefect_vllm._input.planning import InputColumns, InputFile, JobPlan
from prefect_vllm._job_tasks import job_task
from prefect_vllm._store.checkpoint import check_safe_id, fingerprint_id
from prefect_vllm.config import EmbedConfig, EngineConfig, RequestConfig, SamplingConfig
from prefect_vllm.exceptions import ConfigurationError, InputError
from prefect_vllm.results import BatchResult, ShardResult

__all__ = [
    "JobIdentity",
    "adopt_pool_settings",
    "check_model",
    "job_fingerprint",
    "job_identity",
    "job_summary",
]


def check_model(model: str) -> None:
    """Refuse a model that names a local folder which does not exist.

    Hugging Face ids (`org/name`) are left to the engine; anything that reads as a
    path (absolute, `./`, `~`) or exists on disk must be a folder with a readable
    `config.json` holding a JSON object. Deeper problems (an unknown architecture,
    sizes that do not fit) are the engine's to find: they end the run with an
    `EngineStartError` after one attempt.
    """
    path = os.path.expanduser(model)
    looks_local = model.startswith(("/", ".", "~")) or os.path.exists(path)
    if not looks_local:
        return
    if os.path.isfile(path):
        raise ConfigurationError(f"model {model!r} is a file: give the model's folder (with config.json)")
    if not os.path.isdir(path):
        raise ConfigurationError(f"model folder {model!r} does not exist")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ConfigurationError(f"model folder {model!r} has no config.json")
    try:
        with open(config, encoding="utf-8") as f:
            parsed = json.load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{config}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg})", path=config, line=exc.lineno) from None
    if not isinstance(parsed, dict):
        raise InputError(f"must hold a JSON object, not {type(parsed).__name__}", path=config)


def job_fingerprint(
    model: str,
    files: list[InputFile],
    columns: InputColumns,
    shard_size: int,
    sampling: SamplingConfig,
    engine: EngineConfig,
    requests: RequestConfig,
    *,
    task: str = "generate",
    embed: EmbedConfig | None = None,
    truncate_prompt_tokens: int | None = None,
) -> dict[str, Any]:
    """Everything that changes the job's results, flat; its hash is the default job id.

    Flat keys (`sampling.max_tokens`) let a refused resume name the exact change.
    The inputs count by identity (path, size, mtime), so the fingerprint needs no
    read of their rows.
    """
    fingerprint: dict[str, Any] = {
        "model": model,
        "prompt_column": columns.prompt,
        "messages_column": columns.messages,
        "id_column": columns.id,
        **({"pair_column": columns.pair} if columns.pair is not None else {}),
        "shard_size": shard_size,
        "inputs": [[f.path, f.size, f.mtime_ns] for f in files],
    }
    entry = job_task(task)
    engine_settings = engine.model_dump(mode="json")
    if entry.pools and engine_settings["engine_args"].get("runner") == "pooling":
        # Implied by the task: the same job on its own engines and on a pooling warm pool.
        engine_settings["engine_args"] = {
            k: v for k, v in engine_settings["engine_args"].items() if k != "runner"
        }
    fingerprint.update({f"engine.{k}": v for k, v in engine_settings.items()})
    if entry.samples:  # an embedding or a classification samples nothing
        fingerprint.update({f"sampling.{k}": v for k, v in sampling.model_dump(mode="json").items()})
    fingerprint.update({f"requests.{k}": v for k, v in requests.model_dump(mode="json").items()})
    if entry.pools:  # a generation job's fingerprint (and id) is what it always was
        fingerprint["task"] = task
    if "embed" in entry.options:
        fingerprint.update(
            {f"embed.{k}": v for k, v in (embed or EmbedConfig()).model_dump(mode="json").items()}
        )
    if truncate_prompt_tokens is not None:
        fingerprint["truncate_prompt_tokens"] = truncate_prompt_tokens
    return fingerprint


@dataclass(frozen=True)
class JobIdentity:
    """Who a job is, known before its input is read: what the resume check compares.

    Attributes:
        job_id: The explicit job id, else the fingerprint's hash.
        fingerprint: Everything that changes the job's results.
        engine: The engine settings in force (LoRA slots added when the job has adapters;
            vLLM's pooling runner for an embedding or classification job).
        adapters: LoRA adapters by name -> path, when the job has a LoRA folder.
    """

    job_id: str
    fingerprint: dict[str, Any]
    engine: EngineConfig
    adapters: dict[str, str] | None


def job_identity(
    model: str,
    files: list[InputFile],
    columns: InputColumns,
    shard_size: int,
    sampling: SamplingConfig,
    engine: EngineConfig,
    requests: RequestConfig,
    job_id: str | None,
    *,
    task: str = "generate",
    embed: EmbedConfig | None = None,
    truncate_prompt_tokens: int | None = None,
) -> JobIdentity:
    """The job's id and fingerprint from its settings and its input files' identity.

    Raises:
        ConfigurationError: A bad job id or LoRA folder.
    """
    fingerprint = job_fingerprint(
        model, files, columns, shard_size, sampling, engine, requests, task=task, embed=embed,
        truncate_prompt_tokens=truncate_prompt_tokens,
    )  # fmt: skip
    if job_task(task).pools:  # vLLM's pooling runner; a generative checkpoint gets vLLM's embed conversion
        engine = engine.model_copy(update={"engine_args": {"runner": "pooling", **engine.engine_args}})
    adapters = None
    if requests.lora_dir is not None:
        found = find_adapters(requests.lora_dir)
        adapters = {name: path for name, (path, _rank) in found.items()}
        fingerprint["lora_adapters"] = sorted(adapters)
        engine = engine.model_copy(update={"engine_args": lora_engine_args(found, engine.engine_args)})
    resolved_id = check_safe_id(job_id or fingerprint_id(fingerprint), "job id")
    return JobIdentity(job_id=resolved_id, fingerprint=fingerprint, engine=engine, adapters=adapters)


def job_summary(
    job_id: str,
    plan: JobPlan,
    committed: dict[str, ShardResult],
    new: dict[str, ShardResult],
    output: str,
    *,
    wall_s: float,
    generation_s: float = 0.0,
    engine_restarts: int = 0,
    deaths_by_cause: dict[str, int] | None = None,
    repaired: int = 0,
    stopped_by: str | None = None,
    timings: dict[str, float] | None = None,
    request_counts: dict[str, int] | None = None,
) -> BatchResult:
    """A run's summary: the shards committed before it (`committed`) and by it (`new`),
    `repaired` of which replace damaged ones; the other fields as in `BatchResult`."""
    results = {**committed, **new}
    tokens = sum(r.output_tokens for r in new.values())
    return BatchResult(
        job_id=job_id,
        shards_total=len(plan.shards),
        shards_skipped=len(committed),
        shards_run=len(new),
        shards_incomplete=[s.shard_id for s in plan.shards if s.shard_id not in results],
        shards_repaired=repaired,
        rows_total=plan.rows_total,
        rows_ok=sum(r.rows_ok for r in results.values()),
        rows_failed=sum(r.rows_failed for r in results.values()),
        engine_restarts=engine_restarts,
        engine_deaths_by_cause=dict(sorted((deaths_by_cause or {}).items())),
        engine_deaths_by_shard={k: r.engine_deaths for k, r in sorted(new.items()) if r.engine_deaths},
        poisoned_rows=[cid for k in sorted(results) for cid in results[k].poisoned_rows],
        wall_s=round(wall_s, 3),
        generation_s=round(generation_s, 3),
        output_tokens=tokens,
        tokens_per_s=round(tokens / wall_s, 1) if wall_s else 0.0,
        generation_tokens_per_s=round(tokens / generation_s, 1) if generation_s else 0.0,
        output=output,
        stopped_by=stopped_by,
        timings=timings or {},
        request_counts=request_counts,
    )


def adopt_pool_settings(
    name: str, pool_model: str, pool_engine: EngineConfig, model: str, engine: EngineConfig | None
) -> tuple[str, EngineConfig]:
    """The model and engine settings of a job that runs on the warm pool `name`.

    The pool's engines are what generate, so its settings are the job's (and join its
    fingerprint). A job that gives no engine settings (`engine` None) takes the pool's;
    the model, and engine settings given (defaults included), must be the pool's.

    Raises:
        ConfigurationError: Naming each setting that differs from the pool's.
    """
    differences = []
    if not _same_model(model, pool_model):
        differences.append(f"model (pool: {pool_model!r}, job: {model!r})")
    if engine is not None and engine != pool_engine:
        ours, theirs = engine.model_dump(mode="json"), pool_engine.model_dump(mode="json")
        differences += [
            f"engine.{key} (pool: {json.dumps(theirs[key])}, job: {json.dumps(ours[key])})"
            for key in sorted(ours)
            if ours[key] != theirs[key]
        ]
    if differences:
        raise ConfigurationError(
            f"pool: warm pool {name!r} runs other settings than this job: {'; '.join(differences)}. "
            "Leave the engine settings out to use the pool's, or start a pool with these."
        )
    return pool_model, pool_engine


def _same_model(a: str, b: str) -> bool:
    """Whether two model names are one model: equal ids, or one local folder."""
    if a == b:
        return True
    paths = [os.path.realpath(os.path.expanduser(m)) for m in (a, b)]
    return os.path.isdir(paths[0]) and paths[0] == paths[1]
