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
from prefect_vllm._engine.protocol import CallParams, GenerateCall, GenerateResult, GenerateStarted
from prefect_vllm._engine.vllm_io import (
    can_score,
    class_names,
    classification_row,
    embedding_row,
    engine_prompt,
    failed_row,
    lora_request,
    output_row,
    pooling_params,
    rendered_prompt,
    rerank_row,
    sampling_params,
    score_inputs,
    score_row,
    scorer,
    tokenize_prompts,
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


class VllmEngineActor:
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
        self._identity = {"model": model, "engine": engine_config, "pool": pool_config or {}}
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

    async def info(self) -> dict[str, Any]:
        """Who this actor is: pid, engine start time, context length, the tasks its
        engine serves (vLLM's names: `generate`, `embed`, `classify`, ...), why its
        engines died before (`deaths`, oldest first), the Ray node it runs on and the
        GPU ids Ray gave it (`node`, `gpus`), and the model, engine and pool settings it
        was made with."""
        self._ensure_watchdog()
        return {
            "pid": self._pid,
            "tasks": list(await self._tasks()),
            "start_s": self._start_s,
            "max_model_len": self._max_model_len,
            "hf_token_set": bool(os.environ.get("HF_TOKEN")),
            "deaths": list(self._deaths),
            "node": self._node,
            "gpus": list(self._gpus),
            **self._identity,
        }

    async def _tasks(self) -> tuple[str, ...]:
        """What the engine serves, as vLLM names it, and `score` when vLLM can score with it."""
        if self._served is None:
            self._supported = tuple(await self._engine.get_supported_tasks())
            scores = can_score(self._engine, self._supported)
            self._served = self._supported + (("score",) if scores else ())
        return self._served

    async def _scoring(self) -> None:
        """Make vLLM's scoring processor, once, or keep why it could not be made."""
        if self._scorer is not None or self._scorer_error is not None:
            return
        scores = "score" in await self._tasks()  # an engine that fails to answer fails the call
        try:
            self._scorer = scorer(self._engine, self._supported) if scores else None
        except Exception as exc:
            self._scorer_error = f"{_CANNOT_SCORE}: {_row_error(exc)}"
            return
        if self._scorer is None:
            self._scorer_error = _CANNOT_SCORE

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

    async def _call_plan(self, call: GenerateCall) -> tuple[Any, Any, list[list[int] | None]]:
        """How a call's rows are served: the per-row method, what its rows share, and their
        prompts' token ids (tokenized here in one batch where that is what vLLM would do).

        The rows that only use the job's sampling (or pooling) share one `SamplingParams`
        (`PoolingParams`), built here, or the error vLLM raised building it: each such row's error.
        """
        task = job_task(call.params.task)
        if task.scores:  # vLLM's scoring processor tokenizes each pair itself
            await self._scoring()
            one = {"score": self._score_one, "rerank": self._rerank_one}[task.call]
            return one, None, [None] * len(call.rows)
        if call.params.tokenization:  # vLLM tokenizes, and cuts, each prompt itself
            token_ids: list[list[int] | None] = [None] * len(call.rows)
        else:
            token_ids = tokenize_prompts(call.rows, self._engine.get_tokenizer(), self._max_model_len)
        job_params: Any
        try:
            if task.samples:
                job_params = sampling_params({}, None, call.params.sampling, call.params.response_format)
            else:
                job_params = pooling_params(task.serves, call.params.pooling)
        except (ValueError, TypeError) as exc:
            job_params = exc
        return (self._generate_one if task.samples else self._pool_one), job_params, token_ids

    async def _generate_one(
        self,
        request_id: str,
        row: dict[str, Any],
        seed: int | None,
        params: CallParams,
        token_ids: list[int] | None,
        job_params: Any,
    ) -> dict[str, Any]:
        if "error" in row:
            return failed_row(row["error"])
        try:
            prompt = engine_prompt(
                row, self._engine.get_tokenizer(), params.template, token_ids, self._max_model_len
            )
            if seed is None and not row.get("sampling") and not row.get("response_format"):
                if isinstance(job_params, Exception):
                    raise job_params
                row_params = job_params
            else:
                row_params = sampling_params(row, seed, params.sampling, params.response_format)
            lora = lora_request(row, params.adapters)
        except (ValueError, TypeError) as exc:
            return failed_row(_row_error(exc))
        try:
            final = await self._final_output(
                self._engine.generate(prompt, row_params, request_id, lora_request=lora)
            )
        except _RowFailed as exc:
            return failed_row(str(exc))
        if not final.outputs:
            return failed_row("the engine returned no output")
        return output_row(final, row_params)

    async def _pool_one(
        self,
        request_id: str,
        row: dict[str, Any],
        _seed: int | None,
        params: CallParams,
        token_ids: list[int] | None,
        job_params: Any,
    ) -> dict[str, Any]:
        """One row's embedding (one per input, for a request of several) or class
        probabilities, through vLLM's pooling runner (`AsyncLLM.encode`)."""
        task = params.task
        if "error" in row:
            return failed_row(row["error"], task)
        if row.get("messages") is not None:
            return failed_row(f"a {task} job reads text (the prompt column), not chat messages", task)
        from vllm.exceptions import VLLMValidationError

        try:
            if isinstance(job_params, Exception):
                raise job_params
            # Shared by the call's rows: vLLM copies it for each request (`InputProcessor`).
            row_params = (
                pooling_params(task, {**params.pooling, **row["pooling"]})
                if row.get("pooling")
                else job_params
            )
            if "inputs" in row or params.tokenization:
                # Several inputs (an OpenAI embeddings request), or prompts to cut: vLLM's
                # renderer tokenizes, cuts and checks each one, as `LLM.embed` has it do.
                texts = row["inputs"] if "inputs" in row else [row["prompt"]]
                prompts = [rendered_prompt(self._engine, text, params.tokenization) for text in texts]
            else:
                tokenizer = self._engine.get_tokenizer()
                prompts = [engine_prompt(row, tokenizer, params.template, token_ids, self._max_model_len)]
        except (ValueError, TypeError, VLLMValidationError) as exc:
            return failed_row(_row_error(exc), task)
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{j}" for j in range(len(prompts))]
        try:
            finals = await self._final_outputs(
                [
                    self._engine.encode(prompt, row_params, one_id)
                    for prompt, one_id in zip(prompts, ids, strict=True)
                ]
            )
        except _RowFailed as exc:
            return failed_row(str(exc), task)
        if job_task(task).classifies:
            return classification_row(finals[0], self._class_names)
        return embedding_row(finals, several="inputs" in row)

    async def _score_one(
        self,
        request_id: str,
        row: dict[str, Any],
        _seed: int | None,
        params: CallParams,
        _token_ids: list[int] | None,
        _job_params: Any,
    ) -> dict[str, Any]:
        """One text pair's score, as vLLM's `LLM.score` makes it (`vllm_io.score_inputs`)."""
        return await self._scored_row(
            "score", request_id, row, params, lambda finals: score_row(self._scorer, finals)
        )

    async def _rerank_one(
        self,
        request_id: str,
        row: dict[str, Any],
        _seed: int | None,
        params: CallParams,
        _token_ids: list[int] | None,
        _job_params: Any,
    ) -> dict[str, Any]:
        """A query's documents ranked by their scores against it, as vLLM's `/v1/rerank` ranks them."""
        return await self._scored_row(
            "rerank", request_id, row, params,
            lambda finals: rerank_row(self._scorer, finals, row["documents"], row.get("top_n")),
        )  # fmt: skip

    async def _scored_row(
        self, task: str, request_id: str, row: dict[str, Any], params: CallParams, answer: Any
    ) -> dict[str, Any]:
        """A row scored through vLLM's scoring processor: a text against its pair
        (`pair`), or against each of its `documents`; `answer` makes its output row."""
        if "error" in row:
            return failed_row(row["error"], task)
        from vllm.exceptions import VLLMValidationError

        if self._scorer is None:
            return failed_row(self._scorer_error or _CANNOT_SCORE, task)
        against = row["documents"] if "documents" in row else row["pair"]
        try:
            inputs = score_inputs(self._scorer, row["prompt"], against, params.tokenization)
        except (ValueError, TypeError, VLLMValidationError) as exc:
            return failed_row(_row_error(exc), task)
        try:
            finals = await self._final_outputs(
                [
                    self._engine.encode(one["prompts"], one["params"], f"{request_id}-{j}")
                    for j, one in enumerate(inputs)
                ]
            )
            result: dict[str, Any] = answer(finals)
            return result
        except _RowFailed as exc:
            return failed_row(str(exc), task)
        except (ValueError, TypeError) as exc:  # vLLM's scoring of the outputs
            return failed_row(_row_error(exc), task)

    async def _final_outputs(self, requests: list[AsyncIterator[Any]]) -> list[Any]:
        """The final outputs of one row's engine requests (several for some rows), every one
        of them finished before the row is answered.

        Raises:
            _RowFailed: One of them failed for its own sake (the first such failure).
        """
        if len(requests) == 1:  # the common row: no task of its own
            return [await self._final_output(requests[0])]
        results = await asyncio.gather(*(self._final_output(r) for r in requests), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def _final_output(self, outputs: AsyncIterator[Any]) -> Any:
        """The final output of one engine request, holding one of the in-flight slots.

        Raises:
            _RowFailed: The request failed for its own sake (its row's error). An engine
                that died instead crash-exits the actor.
        """
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        final = None
        async with self._in_flight:
            try:
                async for out in outputs:
                    final = out
            except EngineDeadError:
                # Its message points at a stack trace that is not there: the cause is ours to say.
                self._die("a request saw EngineDeadError")
            except (VLLMClientError, ValueError) as exc:  # the request's own fault (vLLM's 4xx)
                raise _RowFailed(_row_error(exc)) from None
            except EngineGenerateError as exc:
                if self._engine.errored:
                    self._die(repr(exc.__cause__ or exc))
                raise _RowFailed(_row_error(exc.__cause__ or exc)) from None
        if final is None:
            raise _RowFailed("the engine returned no output")
        return final

    def __ray_shutdown__(self) -> None:
        """Shut the engine down when Ray kills the actor on purpose."""
        self._engine.shutdown()


def _is_engine_process(proc: psutil.Process) -> bool:
    try:
        return " ".join(proc.cmdline()).startswith("VLLM::")
    except psutil.Error:
        return False


#: Each row's error in a score job whose model vLLM does not score with.
_CANNOT_SCORE = "vLLM cannot score with this model"


class _RowFailed(Exception):
    """One request failed for its own sake: the message is its row's error."""


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


def _row_error(exc: BaseException) -> str:
    """A row error message: the exception's type and a truncated message, no prompt text."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message[:300]}"
