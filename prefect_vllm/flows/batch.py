"""The `batch_inference` flow: plan, skip what is committed, run the rest on Ray."""

# No `from __future__ import annotations` here: a served flow is shipped to its run's
# process by value, with only the globals its body uses, so the parameters' types must
# be objects in the signature, not names to look up (pydantic builds the form from them).

import json
import os
import time
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from pydantic import Field

from prefect_vllm._checkpoint import EXPORTS, CheckpointStore, JobManifest, check_safe_id, fingerprint_id
from prefect_vllm._engine.pool import VllmActorPool
from prefect_vllm._export import export_openai
from prefect_vllm._lock import JobLock
from prefect_vllm._lora import find_adapters, lora_engine_args
from prefect_vllm._planning import InputColumns, JobPlan, plan_job
from prefect_vllm.blocks import CheckpointStorage, RayCluster, VllmModel
from prefect_vllm.blocks.storage import open_store
from prefect_vllm.config import ActorPoolConfig, EngineConfig, RecoveryConfig, RequestConfig, SamplingConfig
from prefect_vllm.exceptions import ConfigurationError, IncompleteJobError, InputError
from prefect_vllm.flows._params import cluster_settings, load_block, model_block, render_dated, scheduled_time
from prefect_vllm.flows._ray import run_on_ray
from prefect_vllm.flows._report import Progress, publish_results
from prefect_vllm.results import BatchResult, ShardResult
from prefect_vllm.tasks import ShardJob

__all__ = ["batch_inference", "check_model"]


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
    plan: JobPlan,
    columns: InputColumns,
    shard_size: int,
    sampling: SamplingConfig,
    engine: EngineConfig,
    requests: RequestConfig,
) -> dict[str, Any]:
    """Everything that changes the job's results, flat; its hash is the default job id.

    Flat keys (`sampling.max_tokens`) let a refused resume name the exact change.
    """
    fingerprint: dict[str, Any] = {
        "model": model,
        "prompt_column": columns.prompt,
        "messages_column": columns.messages,
        "id_column": columns.id,
        "shard_size": shard_size,
        "inputs": [[f.path, f.size, f.mtime_ns] for f in plan.files],
    }
    fingerprint.update({f"engine.{k}": v for k, v in engine.model_dump(mode="json").items()})
    fingerprint.update({f"sampling.{k}": v for k, v in sampling.model_dump(mode="json").items()})
    fingerprint.update({f"requests.{k}": v for k, v in requests.model_dump(mode="json").items()})
    return fingerprint


@flow(name="batch-inference", validate_parameters=True)
def batch_inference(
    input: str,
    output: str,
    model: VllmModel | str,
    prompt_column: str = "prompt",
    messages_column: str = "messages",
    id_column: str = "custom_id",
    shard_size: Annotated[int, Field(ge=1)] = 512,
    sampling: SamplingConfig | None = None,
    requests: RequestConfig = RequestConfig(),  # noqa: B008 - frozen pydantic model
    engine: EngineConfig = EngineConfig(),  # noqa: B008
    pool: ActorPoolConfig = ActorPoolConfig(),  # noqa: B008
    recovery: RecoveryConfig = RecoveryConfig(),  # noqa: B008
    cluster: RayCluster | str | None = None,
    storage: CheckpointStorage | str | None = None,
    ray_address: str | None = None,
    job_id: str | None = None,
    restart: bool = False,
    export: Literal["openai"] | None = None,
) -> BatchResult:
    """Generate a completion for every row of a prompt dataset, resumably.

    The input is planned into shards; shards with a commit marker in `output` are
    skipped; the rest run as `run-shard` tasks on Ray, generated by a pool of vLLM
    engine actors. Running the same call again resumes the same job.

    Args:
        input: A JSONL, Parquet or CSV file, a folder of them, or a glob. A JSONL
            file of OpenAI Batch requests (`{custom_id, method, url, body}`) is
            recognised by its first line. `{date}` and `{yesterday}` are filled in
            with the run's scheduled day (`YYYY-MM-DD`).
        output: Output folder or `pyarrow.fs` URI; also holds the checkpoints.
            `{date}` and `{yesterday}` are filled in as in `input`.
        model: Hugging Face id or local model folder; or a `VllmModel` block, given
            or named as `vllm-model/NAME`, which then also gives the engine settings,
            the default sampling and the Hugging Face token.
        prompt_column: Column holding the prompt text.
        messages_column: Column holding chat messages (a list of `{role, content}`,
            or its JSON text); a row with messages is rendered with the chat template.
        id_column: Column holding each row's id (`custom_id`); positions when absent.
        shard_size: Rows per shard: the unit of commit and of retry (at least 1).
        sampling: Job-wide sampling parameters (default: the model block's, else
            `SamplingConfig()`); a `sampling_params` column (struct or JSON text)
            overrides them per row.
        requests: Chat template and its kwargs, a job-wide JSON schema, and a folder of
            LoRA adapters that rows name by `model`.
        engine: How each vLLM engine is built.
        pool: Engine actors, their resources and per-actor restart budget.
        cluster: A `RayCluster` block, or its name: gives the Ray address, runtime
            environment and the engine actors (instead of `pool` and `ray_address`).
        storage: A `CheckpointStorage` block, or its name: `output` is then a path
            under its `base_uri`, written with its credentials.
        recovery: Job restart budget, hang deadlines and poison-row isolation.
        ray_address: An existing Ray cluster (`auto`, `ray://...`); a local one if None.
        job_id: Explicit job id; default: a hash of everything that changes results.
        restart: Discard the job's checkpoints in `output` and start over.
        export: `openai` also writes `_openai/output.jsonl` and `_openai/errors.jsonl`
            in the OpenAI Batch output shapes once every shard is committed.

    Returns:
        The run's summary.

    Raises:
        ConfigurationError: Bad input or settings, before any engine starts.
        IncompleteJobError: Some shards were not committed; re-run to resume.

    Examples:
        ```python
        from prefect_vllm.config import SamplingConfig
        from prefect_vllm.flows import batch_inference
        from prefect_vllm.testing import make_tiny_model, write_sample_prompts

        if __name__ == "__main__":
            make_tiny_model("/tmp/tiny-llama")
            write_sample_prompts("/tmp/prompts.jsonl", n=32)
            result = batch_inference(
                input="/tmp/prompts.jsonl",
                output="/tmp/out",
                model="/tmp/tiny-llama",
                sampling=SamplingConfig(max_tokens=16),
            )
            print(result.rows_ok, result.output)
        ```
    """
    logger = get_run_logger()
    started = time.monotonic()
    when = scheduled_time()
    input, output = render_dated(input, when), render_dated(output, when)
    block = model_block(model)
    hf_token = None
    if block is not None:
        if engine != EngineConfig():
            raise ConfigurationError(
                "engine: give engine settings in the VllmModel block or in `engine`, not both"
            )
        engine, hf_token, model = block.engine_config(), block.hf_token, block.model
        sampling = sampling or block.sampling
    assert isinstance(model, str)
    sampling = sampling or SamplingConfig()
    ray_cluster = load_block(RayCluster, cluster, "cluster")
    if ray_cluster is not None:
        if pool != ActorPoolConfig():
            raise ConfigurationError(
                "pool: give actor settings in the RayCluster block or in `pool`, not both"
            )
        pool = ray_cluster.pool_config()
    address, runtime_env = cluster_settings(ray_cluster, ray_address)
    storage_block = load_block(CheckpointStorage, storage, "storage")
    check_model(model)
    columns = InputColumns(prompt=prompt_column, messages=messages_column, id=id_column)
    plan = plan_job(input, columns, shard_size)
    store = open_store(output, storage_block)
    fingerprint = job_fingerprint(model, plan, columns, shard_size, sampling, engine, requests)
    adapters = None
    if requests.lora_dir is not None:
        found = find_adapters(requests.lora_dir)
        adapters = {name: path for name, (path, _rank) in found.items()}
        fingerprint["lora_adapters"] = sorted(adapters)
        engine = engine.model_copy(update={"engine_args": lora_engine_args(found, engine.engine_args)})
    resolved_id = check_safe_id(job_id or fingerprint_id(fingerprint), "job id")
    store.fs.create_dir(store.root, recursive=True)
    with JobLock(store, resolved_id, owner=_run_name()):
        manifest = store.prepare(
            JobManifest(job_id=resolved_id, fingerprint=fingerprint, plan=plan, created_at=time.time()),
            restart=restart,
        )
        job = ShardJob(
            job_id=resolved_id, output=output, columns=columns, has_id_column=manifest.plan.has_id_column,
            sampling=sampling, requests=requests, recovery=recovery, pool=None, adapters=adapters,
            storage=storage_block,
        )  # fmt: skip
        timings = {"plan_s": round(time.monotonic() - started, 3)}
        summary, results = _run_job(
            manifest, store, job, VllmActorPool(model, engine, pool, hf_token), address, runtime_env, started,
            timings,
        )  # fmt: skip
        finalising = time.monotonic()
        if export == "openai" and not summary.shards_incomplete:
            shards = [results[s.shard_id] for s in manifest.plan.shards]
            counts = export_openai(store, shards, job_id=resolved_id, model=model)
            summary = summary.model_copy(update={"request_counts": counts})
            logger.info("exported %d requests (%d completed, %d failed) to %s/%s", counts["total"],
                        counts["completed"], counts["failed"], store.uri, EXPORTS)  # fmt: skip
        finalise_s = timings.pop("shutdown_s", 0.0) + time.monotonic() - finalising
        summary = summary.model_copy(update={"timings": {**timings, "finalise_s": round(finalise_s, 3)}})
        store.write_summary(summary)
    publish_results(summary, results, _RERUN)
    if summary.shards_incomplete:
        incomplete = summary.shards_incomplete
        shown = ", ".join(incomplete[:10]) + (" ..." if len(incomplete) > 10 else "")
        why = _RERUN
        if summary.engine_restarts > recovery.max_job_restarts:
            why = (
                f"the run stopped after {summary.engine_restarts} engine restarts (budget max_job_restarts="
                f"{recovery.max_job_restarts}); fix what kills the engines, or raise the budget, and {_RERUN}"
            )
        raise IncompleteJobError(
            f"{len(incomplete)} of {summary.shards_total} shards were not committed ({shown}); {why}",
            incomplete=incomplete,
            result=summary,
        )
    logger.info(
        "job %s complete: %d rows ok, %d row errors, %d engine restarts, %.1f s",
        resolved_id, summary.rows_ok, summary.rows_failed, summary.engine_restarts, summary.wall_s,
    )  # fmt: skip
    return summary


#: How a user resumes an incomplete job, in messages and the summary artifact.
_RERUN = "run the same command again (or retry the flow run) to resume; committed shards are skipped"


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"flow run {flow_run.name!r}" if flow_run.name else "a prefect-vllm run"


def _run_job(
    manifest: JobManifest,
    store: CheckpointStore,
    job: ShardJob,
    pool: VllmActorPool,
    ray_address: str | None,
    runtime_env: dict[str, Any],
    started: float,
    timings: dict[str, float],
) -> tuple[BatchResult, dict[str, ShardResult]]:
    """Run the job's uncommitted shards; the job's summary and every committed shard."""
    logger = get_run_logger()
    committed = store.committed()
    shards = manifest.plan.shards
    pending = [s for s in shards if s.shard_id not in committed]
    logger.info(
        "job %s: %d rows in %d shards; %d already committed, %d to run",
        job.job_id, manifest.plan.rows_total, len(shards), len(committed), len(pending),
    )  # fmt: skip
    new: dict[str, ShardResult] = {}
    restarts = 0
    generation_s = 0.0
    if pending:
        progress = Progress(job.job_id, len(shards), len(committed))
        try:
            new, restarts, generation_s = run_on_ray(
                pending, job, pool, ray_address, runtime_env, on_commit=progress.commit, timings=timings
            )
        finally:
            progress.close()
    results = {**committed, **new}
    wall = time.monotonic() - started
    tokens = sum(r.output_tokens for r in new.values())
    summary = BatchResult(
        job_id=job.job_id,
        shards_total=len(shards),
        shards_skipped=len(committed),
        shards_run=len(new),
        shards_incomplete=[s.shard_id for s in shards if s.shard_id not in results],
        rows_total=manifest.plan.rows_total,
        rows_ok=sum(r.rows_ok for r in results.values()),
        rows_failed=sum(r.rows_failed for r in results.values()),
        engine_restarts=restarts,
        engine_deaths_by_shard={k: r.engine_deaths for k, r in sorted(new.items()) if r.engine_deaths},
        poisoned_rows=[cid for k in sorted(results) for cid in results[k].poisoned_rows],
        wall_s=round(wall, 3),
        generation_s=round(generation_s, 3),
        output_tokens=tokens,
        tokens_per_s=round(tokens / wall, 1) if wall else 0.0,
        generation_tokens_per_s=round(tokens / generation_s, 1) if generation_s else 0.0,
        output=store.uri,
    )
    return summary, results
