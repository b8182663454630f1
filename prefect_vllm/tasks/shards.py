"""The `run_shard` task: read a shard's rows, generate, write the part, commit."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from prefect_vllm._columns import COMPLETION_TOKENS, ERROR, PROMPT_TOKENS
from prefect_vllm._engine.client import EngineClient
from prefect_vllm._engine.isolation import EngineCall, generate_isolating
from prefect_vllm._engine.protocol import GenerateResult
from prefect_vllm._input.planning import InputColumns, ShardSpec
from prefect_vllm._input.requests import RowRequest
from prefect_vllm._input.shard_rows import read_shard, row_seeds
from prefect_vllm._job_tasks import job_task
from prefect_vllm._output.table import output_table
from prefect_vllm._sent import SentOnce
from prefect_vllm._store.checkpoint import CheckpointStore
from prefect_vllm.blocks.storage import open_store
from prefect_vllm.config import EmbedConfig, RecoveryConfig, RequestConfig, SamplingConfig
from prefect_vllm.exceptions import EngineUnavailableError, PrefectVllmError
from prefect_vllm.results import ShardResult


@dataclass(frozen=True)
class ShardJob:
    """What every shard of a job shares; sent to Ray workers with each shard.

    Attributes:
        job_id: The job's id.
        output: The output location (local folder or `pyarrow.fs` URI).
        columns: Which input columns hold the prompt and the id.
        has_id_column: Whether the input has the id column.
        sampling: Job-wide sampling parameters.
        requests: Chat template and job-wide structured output.
        adapters: LoRA adapters by name -> path, when the job has a LoRA folder.
        storage: The `CheckpointStorage` block `output` is a path under, if any.
        recovery: Deadlines and poison isolation.
        engines: The engine actors to call (handles and failover only: no settings, no
            secrets); set by the flow once its pool is up.
        task: The job's task (`prefect_vllm._job_tasks`): `generate`, or `embed`,
            `classify`, `score` or `rerank` (engines started with vLLM's pooling runner).
        embed: How an `embed` job pools each row.
        truncate_prompt_tokens: A pooling job's prompts are cut to this many tokens
            (vLLM's `truncate_prompt_tokens`; -1: the model's context) instead of being
            row errors when too long. None: no cut.
    """

    job_id: str
    output: str
    columns: InputColumns
    has_id_column: bool
    sampling: SamplingConfig
    requests: RequestConfig
    recovery: RecoveryConfig
    engines: EngineClient | None = None
    adapters: dict[str, str] | None = None
    storage: Any = None
    task: str = "generate"
    embed: EmbedConfig | None = None
    truncate_prompt_tokens: int | None = None

    def store(self) -> CheckpointStore:
        """The job's output location, with the storage block's credentials if any."""
        return open_store(self.output, self.storage)

    def sent_once(self) -> SentOnce[ShardJob]:
        """This job, to pass to many shard tasks: put in Ray's object store once (and
        read once per Ray worker), where Ray is connected (the flow)."""
        return SentOnce.put(self)


def _engine_call(job: ShardJob, rows: list[RowRequest], actor_index: int) -> EngineCall:
    """Generate rows [start, stop) of the shard on the job's engines, with the call's deadline."""
    from prefect_vllm._engine.protocol import CallParams, EngineRow, GenerateCall

    if job.engines is None:
        raise PrefectVllmError("the shard task was given no engines to call")
    engines = job.engines
    task = job_task(job.task)
    params = CallParams(  # what every call of the job shares, built once
        sampling=job.sampling.model_dump(exclude={"seed"}),
        response_format=job.requests.response_format(),
        template=job.requests.template(),
        adapters=job.adapters or {},
        task=job.task,
        pooling=(job.embed or EmbedConfig()).pooling_params() if "embed" in task.options else {},
        tokenization=(
            {"truncate_prompt_tokens": job.truncate_prompt_tokens}
            if job.truncate_prompt_tokens is not None
            else {}
        ),
    )
    greedy = job.sampling.temperature == 0.0
    seeds: list[int | None] = (
        [None] * len(rows) if greedy else list(row_seeds(job.sampling.seed, [r.custom_id for r in rows]))
    )
    payloads = [EngineRow(**r.payload()) for r in rows]
    budgets = [task.row_budget(r, job.sampling.max_tokens) for r in rows]

    def call(start: int, stop: int, exclusive: bool) -> GenerateResult:
        request = GenerateCall(
            rows=payloads[start:stop],
            seeds=seeds[start:stop],
            params=params,
            exclusive=exclusive,
            deadline_s=job.recovery.deadline_s(1, sum(budgets[start:stop])),
        )
        return engines.generate(request, actor_index)

    return call


def _retry_if_retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retries only the failures a new attempt can fix (Ray gave up on an actor):
    not a pool whose every actor is dead for good, which no attempt of this run can reach."""
    try:
        state.result()
    except EngineUnavailableError as exc:
        return not exc.for_good
    except PrefectVllmError as exc:
        return exc.retryable
    except Exception:
        return True
    return False


@task(
    name="run-shard",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_if_retryable,
    task_run_name="shard-{spec.shard_id}",
)
def run_shard(spec: ShardSpec, job: ShardJob | SentOnce[ShardJob], actor_index: int = 0) -> ShardResult:
    """Generate one shard and commit it; a re-run of a committed shard never happens.

    The part file has a deterministic name and the marker is written last, so a
    retried or duplicated attempt overwrites an uncommitted part and cannot
    duplicate rows.

    Args:
        spec: The shard to run.
        job: What the job's shards share (`ShardJob.sent_once()` for many shards).
        actor_index: The actor to try first (the flow spreads shards over actors).

    Returns:
        The commit marker's content.
    """
    started = time.monotonic()
    logger = get_run_logger()
    if isinstance(job, SentOnce):
        job = job.get()
    rows = read_shard(spec, job.columns, job.has_id_column, job.adapters, job.task)
    read_done = time.monotonic()
    generated, report = generate_isolating(
        _engine_call(job, rows, actor_index),
        len(rows),
        poison_after=job.recovery.poison_after,
        single_rows_at=job.recovery.single_rows_at,
        log=lambda line: logger.warning("shard %s: %s", spec.shard_id, line),
        row_columns=job_task(job.task).row_columns,
    )
    generate_done = time.monotonic()
    store = job.store()
    checksum, size = store.write_part(spec.shard_id, output_table(rows, generated, job.task))
    failed = sum(1 for e in generated[ERROR] if e is not None)
    context = TaskRunContext.get()
    finished = time.monotonic()
    result = ShardResult(
        shard_id=spec.shard_id,
        rows=len(rows),
        rows_ok=len(rows) - failed,
        rows_failed=failed,
        prompt_tokens=sum(t or 0 for t in generated[PROMPT_TOKENS]),
        output_tokens=sum(t or 0 for t in generated.get(COMPLETION_TOKENS, ())),
        checksum=checksum,
        part_bytes=size,
        attempt=context.task_run.run_count if context else 1,
        actor_pid=report.pid,
        engine_deaths=report.deaths,
        poisoned_rows=[rows[i].custom_id for i in report.poisoned],
        generate_s=generate_done - read_done,
        write_s=finished - generate_done,
        total_s=finished - started,
        committed_at=time.time(),
    )
    store.commit(result)
    return result
