"""The steps of `batch_inference`, each a named function: decide, prepare, run the
pending shards, finish, tell."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger

from prefect_vllm._engine.pool import VllmActorPool
from prefect_vllm._input.planning import JobPlan, discover_inputs, plan_job
from prefect_vllm._job import adopt_pool_settings, check_model, job_summary
from prefect_vllm._launch.server import run_api_url
from prefect_vllm._logs import counted
from prefect_vllm._output.export import export_openai
from prefect_vllm._store.checkpoint import EXPORTS, CheckpointStore, JobManifest
from prefect_vllm._store.lock import JobLock
from prefect_vllm.config import EmbedConfig, EngineConfig, RecoveryConfig
from prefect_vllm.exceptions import (
    FingerprintMismatchError,
    IncompleteJobError,
    JobRunningError,
    StorageError,
)
from prefect_vllm.flows._events import JobEvents, materialize_output
from prefect_vllm.flows._ray import RayRun, ray_connection, run_on_ray
from prefect_vllm.flows._report import Progress, publish_results
from prefect_vllm.flows._resolve import (
    ColumnNames,
    JobDecision,
    JobSettings,
    decide_job,
    decide_task,
    task_columns,
)
from prefect_vllm.results import BatchResult, ShardResult
from prefect_vllm.tasks import ShardJob

#: How a user resumes an incomplete job, in messages and the summary artifact.
RERUN = "run the same command again (or retry the flow run) to resume; committed shards are skipped"


@dataclass(frozen=True)
class Given:
    """What a run was asked for, beside its settings: what the deciding step reads."""

    task: str | None
    columns: ColumnNames
    shard_size: int
    job_id: str | None
    export: str | None
    embed: EmbedConfig | None
    truncate_prompt_tokens: int | None

    def options(self) -> dict[str, Any]:
        """The task's options, as `decide_task` takes them."""
        return {
            "export": self.export, "truncate_prompt_tokens": self.truncate_prompt_tokens, "embed": self.embed,
        }  # fmt: skip


def on_warm_pool(settings: JobSettings, connection: contextlib.ExitStack) -> tuple[JobSettings, Any]:
    """The settings of a job on a warm pool (the pool's model and engine), and the pool;
    connected to its cluster until `connection` closes. Else the settings, and None."""
    if settings.warm_pool is None:
        return settings, None
    connection.enter_context(ray_connection(settings.ray_address, settings.runtime_env))
    warm = VllmActorPool.attach(settings.warm_pool, settings.pool)
    model, engine = adopt_pool_settings(
        settings.warm_pool, warm.model, warm.engine, settings.model, settings.engine
    )
    return dataclasses.replace(settings, model=model, engine=engine), warm


def decide(settings: JobSettings, given: Given) -> tuple[JobDecision, JobPlan]:
    """The job, decided as the command decides it (`decide_job`), and its plan."""
    check_model(settings.model)
    entry = decide_task(
        given.task, discover_inputs(settings.input), requests=settings.requests, **given.options()
    )
    plan = plan_job(settings.input, task_columns(entry, given.columns), given.shard_size)
    decision = decide_job(
        model=settings.model, engine=settings.engine or EngineConfig(), sampling=settings.sampling,
        requests=settings.requests, files=plan.files, task=given.task, columns=given.columns,
        shard_size=given.shard_size, job_id=given.job_id, **given.options(),
    )  # fmt: skip
    return decision, plan


@contextlib.contextmanager
def job_lock(store: CheckpointStore, job_id: str) -> Iterator[None]:
    """The output location made, and the job's lock held by this flow run."""
    with store.storage_errors():
        store.fs.create_dir(store.root, recursive=True)
    run_id, deployment_id = _run_ids()
    with JobLock(store, job_id, _run_name(), run_id, run_api_url(), deployment_id):
        yield


def prepare(store: CheckpointStore, decision: JobDecision, plan: JobPlan, *, restart: bool) -> JobManifest:
    """The job's manifest, written, or checked against the one its output holds."""
    identity = decision.identity
    manifest = JobManifest(
        job_id=identity.job_id, fingerprint=identity.fingerprint, plan=plan, created_at=time.time()
    )
    return store.prepare(manifest, restart=restart)


def shard_job(
    decision: JobDecision,
    settings: JobSettings,
    manifest: JobManifest,
    recovery: RecoveryConfig,
    storage: Any,
) -> ShardJob:
    """What the job's shard tasks share."""
    return ShardJob(
        job_id=decision.identity.job_id, output=settings.output, columns=decision.columns,
        has_id_column=manifest.plan.has_id_column, sampling=settings.sampling, requests=settings.requests,
        recovery=recovery, adapters=decision.identity.adapters, storage=storage, task=decision.task.name,
        embed=decision.embed, truncate_prompt_tokens=decision.truncate_prompt_tokens,
    )  # fmt: skip


def finish(
    store: CheckpointStore,
    manifest: JobManifest,
    decision: JobDecision,
    model: str,
    committed: dict[str, ShardResult],
    run: RayRun,
    repaired: int,
    *,
    export: str | None,
    started: float,
    plan_s: float,
) -> BatchResult:
    """The export (when every shard is committed) and the run's summary, kept beside the output."""
    logger = get_run_logger()
    finalising = time.monotonic()
    results = {**committed, **run.results}
    counts = None
    if export == "openai" and all(s.shard_id in results for s in manifest.plan.shards):
        shards = [results[s.shard_id] for s in manifest.plan.shards]
        counts = export_openai(store, shards, job_id=manifest.job_id, model=model, task=decision.task.name)
        logger.info("exported %d requests (%d completed, %d failed) to %s/%s", counts["total"],
                    counts["completed"], counts["failed"], store.uri, EXPORTS)  # fmt: skip
    timings = {"plan_s": plan_s, **run.timings}
    timings["finalise_s"] = round(timings.pop("shutdown_s", 0.0) + time.monotonic() - finalising, 3)
    summary = job_summary(
        manifest.job_id, manifest.plan, committed, run.results, store.uri,
        wall_s=time.monotonic() - started, generation_s=run.generation_s,
        engine_restarts=run.engine_restarts, deaths_by_cause=run.engine_deaths_by_cause,
        repaired=repaired, stopped_by=run.stopped_by, timings=timings, request_counts=counts,
    )  # fmt: skip
    try:
        store.write_summary(summary)
    except StorageError as exc:  # the run's outcome matters more than its copy on disk
        logger.warning("the summary was not kept beside the output: %s", exc)
    return summary


def tell(
    summary: BatchResult,
    results: dict[str, ShardResult],
    run: RayRun,
    decision: JobDecision,
    settings: JobSettings,
    events: JobEvents,
) -> BatchResult:
    """The run's artifacts, events and asset; its summary, or IncompleteJobError."""
    rows_run = sum(r.rows for r in run.results.values())
    publish_results(summary, results, RERUN, task=decision.task.name, rows_run=rows_run)
    events.finished(summary)
    if summary.shards_incomplete:
        incomplete = summary.shards_incomplete
        shown = ", ".join(incomplete[:10]) + (" ..." if len(incomplete) > 10 else "")
        why = f"{summary.stopped_by}, and {RERUN}" if summary.stopped_by else RERUN
        raise IncompleteJobError(
            f"{len(incomplete)} of {summary.shards_total} shards were not committed ({shown}); {why}",
            incomplete=incomplete,
            result=summary,
        )
    materialize_output(settings.input, summary, settings.model)
    get_run_logger().info(
        "job %s complete: %d rows ok, %s, %s, %.1f s",
        summary.job_id, summary.rows_ok, counted(summary.rows_failed, "row error"),
        counted(summary.engine_restarts, "engine restart"), summary.wall_s,
    )  # fmt: skip
    return summary


def _run_ids() -> tuple[str | None, str | None]:
    """This flow run's id and its deployment's (None when the flow was called directly)."""
    from prefect.runtime import deployment, flow_run

    return (str(flow_run.id) if flow_run.id else None), (str(deployment.id) if deployment.id else None)


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"flow run {flow_run.name!r}" if flow_run.name else "a prefect-vllm run"


@contextlib.contextmanager
def refusals_told(events: JobEvents) -> Iterator[None]:
    """Emit `job.refused` for a refusal: another job's output, other settings, a live run."""
    try:
        yield
    except (FingerprintMismatchError, JobRunningError) as exc:
        events.refused(str(exc))
        raise


def run_pending(
    manifest: JobManifest,
    store: CheckpointStore,
    job: ShardJob,
    pool: VllmActorPool,
    ray_address: str | None,
    runtime_env: dict[str, Any],
    events: JobEvents,
    *,
    verify: bool,
) -> tuple[dict[str, ShardResult], RayRun, int]:
    """Run the job's uncommitted shards: the shards committed before, what the run did,
    and how many damaged commits it repaired.

    A committed shard whose part file is missing or does not match its marker is
    uncommitted and run again.
    """
    logger = get_run_logger()
    committed = store.committed()
    damaged = store.damaged(committed, checksums=verify)
    for shard_id, problem in damaged.items():
        logger.warning("shard %s was committed, but %s: generating it again", shard_id, problem)
        store.uncommit(shard_id)
        del committed[shard_id]
    shards = manifest.plan.shards
    pending = [s for s in shards if s.shard_id not in committed]
    logger.info(
        "job %s: %s in %s; %d already committed, %d to run; output: %s",
        job.job_id, counted(manifest.plan.rows_total, "row"), counted(len(shards), "shard"), len(committed),
        len(pending), store.uri,
    )  # fmt: skip
    events.started(len(shards), len(pending), manifest.plan.rows_total)
    run = RayRun(results={}, engine_restarts=0, engine_deaths_by_cause={}, generation_s=0.0, timings={})
    if pending:
        progress = Progress(job.job_id, len(shards), len(committed))

        def on_commit(result: ShardResult) -> None:
            progress.commit(result)
            events.shard_committed(result)

        try:
            run = run_on_ray(
                pending,
                job,
                pool,
                ray_address,
                runtime_env,
                on_commit=on_commit,
                on_engine_death=events.engine_died,
            )
        finally:
            progress.close()
    for cause, count in run.engine_deaths_by_cause.items():
        logger.warning("%d engine death(s): %s", count, cause)
    return committed, run, sum(1 for shard_id in damaged if shard_id in run.results)
