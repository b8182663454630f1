"""Running a job's pending shards on Ray: the engine pool, the shard window, the budget."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger

from prefect_vllm._engine.pool import VllmActorPool
from prefect_vllm._engine.protocol import EngineInfo
from prefect_vllm._input.planning import ShardSpec
from prefect_vllm._job_tasks import JOB_TASKS, job_task
from prefect_vllm._launch.ray_start import local_cluster, ray_init_kwargs, warm_shard_workers
from prefect_vllm._logs import counted
from prefect_vllm.exceptions import ConfigurationError, EngineUnavailableError, StorageError
from prefect_vllm.results import ShardResult
from prefect_vllm.tasks import ShardJob, run_shard

#: How long the end of a run waits for actors that Ray is restarting to say why their
#: engines died; one that has not answered by then counts its deaths as not reported.
CAUSES_WAIT_S = 30.0

#: How long the flow waits for a shard before it looks at the engine restarts again.
_BUDGET_CHECK_S = 2.0

#: The least time between two looks at the engine restarts.
_RESTARTS_LOOK_S = 0.5

#: The least time between two lines that tell plain commits together.
_COMMIT_LINES_EVERY_S = 5.0


OnCommit = Callable[[ShardResult], None]

#: Told of each engine restart: the actor's index, its restarts and the run's, and
#: the shards in flight on it.
OnEngineDeath = Callable[[int, int, int, list[str]], None]


def ray_connection(address: str | None, runtime_env: dict[str, Any] | None = None) -> Any:
    """A connection to the long-lived cluster of a warm pool, for one run: its shard
    tasks get the run's runtime environment, as with a cluster the run starts."""
    from prefect_vllm.pools import connected

    return connected(address, **ray_init_kwargs(address, runtime_env))


@dataclass(frozen=True)
class RayRun:
    """What running a job's pending shards on Ray gave back.

    Attributes:
        results: The shards this run committed, by id.
        engine_restarts: Engine restarts during the run.
        engine_deaths_by_cause: Why engines died during the run: cause -> count.
        generation_s: Seconds from the first shard submitted to the last one done.
        timings: `ray_start_s`, `engine_start_s` and `shutdown_s` (the pool's and Ray's).
        stopped_by: Why the run stopped before running every shard, or None.
    """

    results: dict[str, ShardResult]
    engine_restarts: int
    engine_deaths_by_cause: dict[str, int]
    generation_s: float
    timings: dict[str, float]
    stopped_by: str | None = None


def run_on_ray(
    pending: list[ShardSpec],
    job: ShardJob,
    pool: VllmActorPool,
    ray_address: str | None,
    runtime_env: dict[str, Any] | None = None,
    on_commit: OnCommit | None = None,
    on_engine_death: OnEngineDeath | None = None,
) -> RayRun:
    """Start the engine pool, stream the pending shards through it, stop it.

    A warm pool is neither started nor stopped: its engines are up already and
    stay up for the next run. A pool the command started early (`prefect_vllm._launch.headstart`) is
    claimed instead of started.
    """
    import ray

    from prefect_vllm._launch import headstart as _headstart
    from prefect_vllm._launch.signals import keeping_sigterm
    from prefect_vllm.flows._runner import ShardTaskRunner  # imports Ray

    init_kwargs = ray_init_kwargs(ray_address, runtime_env)
    head = None if pool.warm else _headstart.claim(pool, ray_address, init_kwargs)
    if head is not None and head.pool is not None:  # started beside the Prefect server
        pool = head.pool
    t0 = time.monotonic()
    try:
        with contextlib.ExitStack() as runner_context:
            with keeping_sigterm():  # a Prefect cancellation, or the command's SIGTERM, stays theirs
                runner = runner_context.enter_context(
                    ShardTaskRunner(address=ray_address, init_kwargs=init_kwargs)
                )
            t1 = time.monotonic()
            if not pool.warm:  # from here on, whatever happens, the run's engines end with it
                runner_context.callback(pool.shutdown)
            if head is not None and head.pool is not None:
                infos = pool.finish_start(_starting(head.launched_at))
                ray_start_s, engine_start_s = head.ray_start_s, time.monotonic() - head.launched_at
            else:
                warm_shard_workers(pool.config.num_actors * pool.config.shards_per_actor)
                # A cluster this run started never grows: actors that cannot fit fail at once.
                infos = (
                    pool.wait_ready()
                    if pool.warm
                    else pool.start(fixed_cluster=local_cluster(ray_address), progress=_starting(t1))
                )
                ray_start_s, engine_start_s = t1 - t0, time.monotonic() - t1
            engine_start_s = round(engine_start_s, 3)  # the log says what the summary says
            _log_engines(pool, infos, engine_start_s)
            _check_serves(pool.model, job.task, infos, warm=pool.warm, cut=job.truncate_prompt_tokens)
            job = dataclasses.replace(job, engines=pool.client(job.recovery.probe_timeout_s))
            started = time.monotonic()
            try:
                results, stopped_by = _stream_shards(
                    runner, pending, job, pool, on_commit or (lambda _result: None),
                    on_engine_death or (lambda *_death: None),
                )  # fmt: skip
            except SystemError as exc:
                raise signal_raised_in_ray(exc) from None
            finally:
                generation_s = time.monotonic() - started
            # Only a run that ended by itself asks why engines died: an interrupted or
            # cancelled one stops at once (its restarts are lost with it).
            restarts = pool.engine_restarts()
            causes = pool.deaths_by_cause(timeout_s=CAUSES_WAIT_S) if restarts else {}
    finally:
        if head is not None:  # Ray was started by the head start, not by the task runner
            ray.shutdown()
    timings = {
        "ray_start_s": round(ray_start_s, 3),
        "engine_start_s": engine_start_s,
        "shutdown_s": round(time.monotonic() - started - generation_s, 3),
    }
    return RayRun(results, restarts, causes, generation_s, timings, stopped_by)


def _starting(since: float) -> Any:
    """A start's progress, as a log line: how many engines are ready, for how long it has run."""
    logger = get_run_logger()

    def say(ready: int, total: int, _waited_s: float) -> None:
        logger.info(
            "starting the vLLM engine(s): %d of %d ready, %.0f s since their actors were created "
            "(imports, model load, KV cache)",
            ready, total, time.monotonic() - since,
        )  # fmt: skip

    return say


def signal_raised_in_ray(exc: SystemError) -> BaseException:
    """What a signal handler raised inside a Ray call, else `exc` itself.

    A handler that raises while Ray's driver waits (`ray.wait`, `ray.get`: Prefect's
    `TerminationSignal` on SIGTERM, `KeyboardInterrupt` on Ctrl-C) comes out of Ray's
    compiled code as "SystemError: ... returned a result with an exception set", the
    handler's exception its cause. Seen as it is, the flow run would count a Prefect
    cancellation or `prefect-vllm cancel` as a crash (exit 1, a traceback) instead of
    stopping as asked (exit 143, Cancelled).
    """
    cause = exc.__cause__ or exc.__context__
    if cause is not None and (
        isinstance(cause, KeyboardInterrupt) or type(cause).__name__ == "TerminationSignal"
    ):
        return cause
    return exc


def _check_serves(
    model: str, task: str, infos: list[EngineInfo], *, warm: bool = False, cut: int | None = None
) -> None:
    """Refuse a job whose engines cannot do its task, or cut its prompts longer than their
    context (`cut`), before any shard runs (every row would be a row error). Engines that
    do not say (a warm pool's older actors) pass.

    Raises:
        ConfigurationError: Naming the task, the model and what vLLM serves with it.
    """
    context = min((info.max_model_len for info in infos if info.max_model_len is not None), default=None)
    if cut is not None and context is not None and cut > context:
        raise ConfigurationError(
            f"truncate_prompt_tokens: {cut} is more than {model}'s context of {context} tokens; "
            "use at most that, or -1 for the whole context"
        )
    served = next((info.tasks for info in infos if info.tasks is not None), None)
    entry = job_task(task)
    if served is None or entry.serves in served:
        return
    if not entry.pools:
        pooled = {t.serves: t.name for t in reversed(JOB_TASKS.values()) if t.pools}  # the first task of each
        other = next(pooled[t] for t in (*served, "embed") if t in pooled)
        hint = entry.fits_hint if warm else f"; run it with --task {other}"
    elif "generate" in served:  # engines of vLLM's generation runner: a warm pool's, or asked for
        hint = (
            "; a warm pool's engines embed, classify or score when the pool is started with "
            """--engine-args '{"runner": "pooling"}'"""
            if warm
            else """; leave "runner" out of the engine arguments"""
        )
    else:
        hint = entry.fits_hint
    raise ConfigurationError(f"task: {model} cannot {task}: vLLM serves {', '.join(served)} with it{hint}")


def _log_engines(pool: VllmActorPool, infos: list[EngineInfo], ready_s: float) -> None:
    logger = get_run_logger()
    if pool.warm:
        logger.info("using warm pool %r: %d vLLM engine(s) of %s", pool.name, len(infos), pool.model)
        return
    logger.info(
        "%d vLLM engine(s) ready %.1f s after their actors were created (the engine itself: %s s; "
        "Hugging Face token %s)",
        len(infos), ready_s, ", ".join(f"{i.start_s:.1f}" for i in infos),
        "set" if all(i.hf_token_set for i in infos) else "not set",
    )  # fmt: skip


class _CommitLines:
    """The run's lines about commits. A shard with row errors, a retry or an engine
    death gets its own line at once; plain commits are told together, the first at
    once and then at most every `_COMMIT_LINES_EVERY_S`, so that a job of 100,000
    small shards does not write 100,000 lines to the terminal and to the flow run's
    logs (each shard's task run still has its state, and `shard.committed` its event).
    """

    def __init__(self, logger: Any, to_run: int) -> None:
        self._logger = logger
        self._to_run = to_run
        self._done = 0
        self._plain: list[ShardResult] = []
        self._told_at = -_COMMIT_LINES_EVERY_S

    def add(self, result: ShardResult) -> None:
        """Tell of one commit, now or with the next plain ones."""
        if result.rows_failed or result.attempt > 1 or result.engine_deaths:
            self.flush()
            self._done += 1
            tokens = f", {counted(result.output_tokens, 'token')}" if result.output_tokens else ""
            self._logger.info(
                "shard %s committed: %s (%s, %s)%s, %.1f s, attempt %d, %s; %d of %d",
                result.shard_id, counted(result.rows, "row"), counted(result.rows_failed, "error"),
                counted(len(result.poisoned_rows), "poison row"), tokens, result.total_s, result.attempt, counted(result.engine_deaths, "engine death"),
                self._done, self._to_run,
            )  # fmt: skip
            return
        self._done += 1
        self._plain.append(result)
        if time.monotonic() - self._told_at >= _COMMIT_LINES_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Tell of the plain commits not told yet."""
        plain, self._plain = self._plain, []
        if not plain:
            return
        self._told_at = time.monotonic()
        ids = sorted(r.shard_id for r in plain)
        shards = ids[0] if len(ids) == 1 else f"{ids[0]} ... {ids[-1]}"
        tokens = sum(r.output_tokens for r in plain)
        fastest, slowest = min(r.total_s for r in plain), max(r.total_s for r in plain)
        self._logger.info(
            "%s committed (%s): %s, %s; %d of %d",
            counted(len(plain), "shard"), shards,
            counted(sum(r.rows for r in plain), "row") + (f", {counted(tokens, 'token')}" if tokens else ""),
            f"{slowest:.1f} s" if len(plain) == 1 else f"{fastest:.1f}-{slowest:.1f} s each",
            self._done, self._to_run,
        )  # fmt: skip


def _stream_shards(
    runner: Any,
    pending: list[ShardSpec],
    job: ShardJob,
    pool: VllmActorPool,
    on_commit: OnCommit,
    on_engine_death: OnEngineDeath,
) -> tuple[dict[str, ShardResult], str | None]:
    """Keep `shards_per_actor` shards in flight per actor until every shard is done.

    The window keeps each engine fed across shard boundaries (the next shard's
    requests are queued while the previous one is written) without turning
    thousands of shards into thousands of Ray workers at once. Once the pool has
    restarted engines more than the job's budget, nothing new starts and the
    shards in flight are cancelled; once the output location refuses a write, or
    every actor is dead for good, nothing new starts and the shards in flight finish. Either way they stay
    incomplete for a re-run.

    Returns:
        The shards committed, and why the run stopped early (None if it did not).
    """
    import ray
    from prefect_ray.context import remote_options

    logger = get_run_logger()
    queue = deque(pending)
    load = [0] * pool.config.num_actors
    window = pool.config.num_actors * pool.config.shards_per_actor
    in_flight: dict[Any, tuple[ShardSpec, Any, int]] = {}
    results: dict[str, ShardResult] = {}
    budget = job.recovery.max_job_restarts
    stopped_by: str | None = None
    seen = [0] * pool.config.num_actors
    looked_at = [-_RESTARTS_LOOK_S]
    sent_job = job.sent_once()
    commit_lines = _CommitLines(logger, len(pending))

    def restarts_now(final: bool = False) -> int:
        """The run's engine restarts; each new one told to `on_engine_death`. Ray's
        control store is asked at most every `_RESTARTS_LOOK_S` (and at the end), not
        once per shard done: with small shards that was a tenth of the flow's time."""
        if not final and time.monotonic() - looked_at[0] < _RESTARTS_LOOK_S:
            return sum(seen)
        looked_at[0] = time.monotonic()
        by_actor = pool.restarts_by_actor()
        for actor, count in enumerate(by_actor):
            on_actor = [spec.shard_id for spec, _future, a in in_flight.values() if a == actor]
            for nth in range(seen[actor] + 1, count + 1):
                on_engine_death(actor, nth, sum(by_actor), on_actor)
        seen[:] = by_actor
        return sum(by_actor)

    while queue or in_flight:
        restarts = restarts_now()
        if restarts > budget:
            for ref in in_flight:
                ray.cancel(ref, force=True)
            queue.clear()
            in_flight.clear()
            stopped_by = (
                f"the run stopped after {restarts} engine restarts (budget max_job_restarts={budget}); "
                "fix what kills the engines, or raise the budget"
            )
            break
        while queue and len(in_flight) < window:
            spec = queue.popleft()
            actor = load.index(min(load))
            # Shard tasks reserve no CPU: on small machines the actors need every core.
            with remote_options(num_cpus=0):
                future = runner.submit(run_shard, {"spec": spec, "job": sent_job, "actor_index": actor})
            in_flight[future.wrapped_future] = (spec, future, actor)
            load[actor] += 1
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=_BUDGET_CHECK_S)
        for ref in done:
            spec, future, actor = in_flight.pop(ref)
            load[actor] -= 1
            future.wait()
            state = future.state
            if state.is_completed():
                result: ShardResult = state.result()
                results[spec.shard_id] = result
                on_commit(result)
                commit_lines.add(result)
            else:
                error = _failure(state)
                commit_lines.flush()
                logger.error("shard %s not committed: %s", spec.shard_id, error or state.message)
                if stopped_by is None and (why := _stops_the_run(error)):
                    queue.clear()  # every shard would fail the same way: nothing new starts
                    stopped_by = why
    commit_lines.flush()
    restarts_now(final=True)  # deaths since the last look
    return results, stopped_by


def _stops_the_run(error: BaseException | None) -> str | None:
    """Why no further shard of this run can succeed after `error`, if none can."""
    if isinstance(error, StorageError):
        return f"{error}; fix the output location"
    if isinstance(error, EngineUnavailableError) and error.for_good:
        return f"{error} (Ray restarts an actor at most --max-restarts times)"
    return None


def _failure(state: Any) -> BaseException | None:
    """The exception a failed shard task raised, if its state holds it."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the state holds no result to read
        return None
    return error if isinstance(error, BaseException) else None
