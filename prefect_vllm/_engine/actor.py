"""The Ray actor that owns one vLLM `AsyncLLM` engine.

vLLM is imported inside the actor's methods, not at module level: Ray workers that
only hold a handle to the actor (shard tasks) unpickle this module too, and must
not pay for importing vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import psutil

from prefect_vllm._engine.cpu import cpu_engine
from prefect_vllm._engine.deaths import (
    HANG_CAUSE,
    actor_id,
    deaths_dir,
    engine_log_cause,
    exit_status,
    log_offsets,
    record_death,
    recorded_deaths,
    signal_name,
    worker_death,
)
from prefect_vllm._engine.protocol import EngineInfo, GenerateCall, GenerateResult, GenerateStarted
from prefect_vllm._engine.rows import RowServing
from prefect_vllm._engine.vllm_io import (
    class_names,
)
from prefect_vllm._job_tasks import job_task
from prefect_vllm.exceptions import EngineStartError

logger = logging.getLogger("prefect_vllm.engine")

#: Exit status of an actor whose engine died: any non-zero exit is a Ray SYSTEM_ERROR,
#: which Ray answers with a restart and a retry of the calls in flight.
ENGINE_DEAD_EXIT_CODE = 1

#: How often the watchdog looks at the engine. vLLM marks an engine dead when its
#: process exits, but a request added in the same instant can wait forever, and an
#: idle dead engine is noticed by nobody: the watchdog crash-exits in both cases.
WATCHDOG_INTERVAL_S = 0.5


def crash_exit(reason: str) -> NoReturn:
    """Leave the actor process at once, so Ray restarts it and retries its calls.

    `ray.actor.exit_actor()` would be an intended exit, which Ray neither restarts
    nor retries. Ray's child-process cleanup reaps the engine's own processes.
    """
    logger.error("vLLM engine died: %s; crash-exiting pid %d so Ray restarts it", reason, os.getpid())
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(ENGINE_DEAD_EXIT_CODE)


def _restarted() -> bool:
    """Whether Ray restarted this actor (its engine started, then died, before)."""
    import ray

    return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def _placement() -> tuple[str, tuple[str, ...]]:
    """The Ray node this actor runs on, and the GPU ids Ray reserved for it there."""
    import ray

    context = ray.get_runtime_context()
    return context.get_node_id(), tuple(str(gpu) for gpu in context.get_accelerator_ids().get("GPU", ()))


class VllmEngineActor(RowServing):
    """A Ray actor hosting one `AsyncLLM`; wrapped with `ray.remote` by the pool.

    Args:
        model: Hugging Face id or local folder.
        engine_config: `EngineConfig.model_dump()`; CPU defaults are filled in by
            `EngineConfig.engine_kwargs` in the actor, where the platform is known.
        max_in_flight: Most requests handed to the engine at once.
        hf_token: A `SecretStr` Hugging Face token, or None.
        pool_config: The `ActorPoolConfig` it was created with, reported by `info`
            (a warm pool's runs read their settings from it).
    """

    def __init__(
        self,
        model: str,
        engine_config: dict[str, Any],
        max_in_flight: int,
        hf_token: Any = None,
        pool_config: dict[str, Any] | None = None,
    ) -> None:
        from prefect_vllm._logs import quiet, quiet_vllm_notices

        quiet_vllm_notices()  # before vLLM's import, which warns already

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from prefect_vllm.config import EngineConfig

        if hf_token is not None:
            # Read by huggingface_hub here and in the engine processes this one spawns.
            os.environ["HF_TOKEN"] = hf_token.get_secret_value()
        on_cpu = current_platform.is_cpu()
        kwargs = EngineConfig.model_validate(engine_config).engine_kwargs(model, on_cpu=on_cpu)
        if on_cpu:
            kwargs = cpu_engine(kwargs)
        if quiet():
            kwargs.setdefault("use_tqdm_on_load", False)  # a progress bar in every actor's log
        started = time.monotonic()
        try:
            # Offline batch defaults (vLLM's `LLM` class): on CPU twice the running
            # sequences and tokens per step of the server defaults AsyncLLM gets otherwise.
            self._engine = AsyncLLM.from_engine_args(
                AsyncEngineArgs(**kwargs), usage_context=UsageContext.LLM_CLASS
            )
        except Exception as exc:
            cause = engine_log_cause() or _start_failure(exc)
            if _restarted():
                # This actor's engine has started before: a restart that fails (a worker
                # lost while it starts, a device busy for a moment) is a death like any
                # other, retried by Ray within --max-restarts (and the run's budget).
                record_death(deaths_dir(), actor_id(), f"restart failed: {cause}")
                crash_exit(f"the restarted engine failed to start: {cause}")
            # Ray never retries a constructor that raises: one clear line is all the user gets.
            raise EngineStartError(cause) from None
        self._start_s = time.monotonic() - started
        # With a forked or spawned engine alike, the engine process is this process's child.
        self._engine_children = [
            child for child in multiprocessing.active_children() if child.name.startswith("EngineCore")
        ]
        self._actor_id = actor_id()
        self._node, self._gpus = _placement()
        self._deaths_dir = deaths_dir()
        self._deaths = recorded_deaths(self._deaths_dir, self._actor_id)
        self._log_offsets = log_offsets()
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._pid = os.getpid()
        self._model, self._engine_config, self._pool_config = model, engine_config, pool_config or {}
        self._max_model_len = self._engine.model_config.max_model_len
        self._class_names = class_names(self._engine.model_config.hf_config)
        self._scorer: Any = None  # vLLM's scoring processor, made for the first score call
        self._scorer_error: str | None = None
        self._supported: tuple[str, ...] = ()
        self._served: tuple[str, ...] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._gate = _ExclusiveGate()
        self._engine_processes = [
            p for p in psutil.Process().children(recursive=True) if _is_engine_process(p)
        ]

    def _ensure_watchdog(self) -> None:
        # Ray runs the constructor outside the actor's event loop: start on first call.
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_engine())

    async def _watch_engine(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            if self._engine.errored or not self._engine_processes_alive():
                self._die("watchdog: the engine process is gone")

    def _die(self, reason: str, *, hang: bool = False) -> NoReturn:
        """Record why the engine died, for the restarted actor to report, and crash-exit."""
        cause = HANG_CAUSE if hang else self._death_cause()
        record_death(self._deaths_dir, self._actor_id, cause)
        crash_exit(f"{cause}; {reason}")

    def _death_cause(self) -> str:
        """What ended the engine: the signal that killed its process, or the error it
        raised (the last exception line the engine logged), or its exit status."""
        codes = [exit_status(child) for child in self._engine_children]
        # A dead worker takes its EngineCore down with it, however that then ends.
        worker = worker_death(self._log_offsets)
        if worker is not None:
            return worker
        for code in codes:
            if code is not None and code < 0:
                return f"killed by {signal_name(-code)}"
        logged = engine_log_cause(self._log_offsets, engine_only=True)
        if logged:
            return f"crashed: {logged}"
        status = ", ".join("still running" if c is None else str(c) for c in codes) or "unknown"
        return f"crashed: no error logged (engine exit status {status})"

    def _engine_processes_alive(self) -> bool:
        """Whether every `VLLM::` process this actor's engine started still runs.

        vLLM notices a dead engine process from a monitor thread, a moment later; a
        call arriving in that moment would run on a dead engine and be blamed for it.
        The engine process is this actor's child (its exit is seen whatever its title);
        a multiprocess engine's workers are found by their `VLLM::` titles. A killed
        process with many threads is reaped only once every thread has stopped, which
        takes a while on a busy machine; its memory, and the title with it, is released
        first, so a process that no longer reads as `VLLM::` is counted as gone.
        """
        if not all(child.is_alive() for child in self._engine_children):
            return False
        return all(_is_engine_process(proc) for proc in self._engine_processes)

    async def info(self) -> EngineInfo:
        """Who this actor is: pid, engine start time, context length, the tasks its
        engine serves (vLLM's names: `generate`, `embed`, `classify`, ...), why its
        engines died before (`deaths`, oldest first), the Ray node it runs on and the
        GPU ids Ray gave it (`node`, `gpus`), and the model, engine and pool settings it
        was made with."""
        self._ensure_watchdog()
        return EngineInfo(
            pid=self._pid,
            tasks=await self._tasks(),
            start_s=self._start_s,
            max_model_len=self._max_model_len,
            hf_token_set=bool(os.environ.get("HF_TOKEN")),
            deaths=tuple(self._deaths),
            node=self._node,
            gpus=self._gpus,
            model=self._model,
            engine=self._engine_config,
            pool=self._pool_config,
        )

    async def check_health(self) -> None:
        """Crash-exit if the engine is dead; an idle dead engine is noticed only here."""
        from vllm.v1.engine.exceptions import EngineDeadError

        self._ensure_watchdog()
        if not self._engine_processes_alive():
            self._die("health check: an engine process is gone")
        try:
            await self._engine.check_health()
        except EngineDeadError as exc:
            self._die(f"health check: {exc!r}")

    async def generate(self, call: GenerateCall) -> AsyncIterator[GenerateStarted | GenerateResult]:
        """Generate every row of one call, concurrently, bounded in flight.

        A streaming method: it first yields `GenerateStarted` once the call has its
        turn on the engine, then the `GenerateResult`. A caller that loses the actor
        before the first item knows its rows never ran, so they are not blamed. An
        `exclusive` call waits until the engine is idle and keeps other calls out
        until it is done, so an engine death during it is its rows' doing. A call
        that runs past `deadline_s` means the engine hangs: the actor crash-exits, as
        on an engine death.

        Args:
            call: The rows, their seeds, and what the job's calls share.

        Yields:
            `GenerateStarted`, then the rows' columns (the task's `row_columns`, in row
            order): generated text, or embeddings, class probabilities, scores or ranked
            documents for the pooling tasks.
        """
        await self.check_health()
        batch = uuid.uuid4().hex[:12]
        async with self._gate.enter(exclusive=call.exclusive):
            yield GenerateStarted(self._pid)
            started = time.monotonic()
            one, job_params, token_ids = await self._call_plan(call)
            work = asyncio.gather(
                *(
                    one(f"{batch}-{i}", row, seed, call.params, ids, job_params)
                    for i, (row, seed, ids) in enumerate(zip(call.rows, call.seeds, token_ids, strict=False))
                )
            )
            try:
                outputs = await asyncio.wait_for(work, timeout=call.deadline_s)
            except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on
                self._die(
                    f"hang: {len(call.rows)} rows not done within the {call.deadline_s:.0f} s deadline",
                    hang=True,
                )
        columns = {name: [out[name] for out in outputs] for name in job_task(call.params.task).row_columns}
        yield GenerateResult(
            columns=columns, pid=self._pid, seconds=time.monotonic() - started, task=call.params.task
        )

    def __ray_shutdown__(self) -> None:
        """Shut the engine down when Ray kills the actor on purpose."""
        self._engine.shutdown()


def _is_engine_process(proc: psutil.Process) -> bool:
    try:
        return " ".join(proc.cmdline()).startswith("VLLM::")
    except psutil.Error:
        return False


def _start_failure(exc: BaseException) -> str:
    """One line that says why an engine did not start, from vLLM's validation or error."""
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic's ValidationError: vLLM validates its configs with it
        try:
            message = "; ".join(str(e.get("msg", "")) for e in errors())
        except Exception:
            message = str(exc)
    else:
        message = str(exc)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:600]


class _ExclusiveGate:
    """Shared calls run together; an exclusive call runs alone, and waiting ones go first."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def enter(self, *, exclusive: bool) -> AsyncIterator[None]:
        async with self._cond:
            if exclusive:
                self._waiting += 1
                try:
                    await self._cond.wait_for(lambda: self._shared == 0 and not self._exclusive)
                finally:
                    self._waiting -= 1
                self._exclusive = True
            else:
                await self._cond.wait_for(lambda: not self._exclusive and self._waiting == 0)
                self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()
