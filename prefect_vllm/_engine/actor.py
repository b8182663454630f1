"""The Ray actor that owns one vLLM `AsyncLLM` engine.

vLLM is imported inside the actor's methods, not at module level: Ray workers that
only hold a handle to the actor (shard tasks) unpickle this module too, and must
not pay for importing vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import psutil

from prefect_vllm._columns import CHOICES, COMPLETION_TOKENS, ERROR, FINISH_REASON, PROMPT_TOKENS, TEXT
from prefect_vllm._engine.cpu import one_process_engine
from prefect_vllm._engine.requests import (
    engine_prompt,
    failed_row,
    lora_request,
    output_row,
    sampling_params,
    tokenize_prompts,
)

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
    logger.error("vLLM engine died (%s); crash-exiting pid %d so Ray restarts it", reason, os.getpid())
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(ENGINE_DEAD_EXIT_CODE)


class VllmEngineActor:
    """A Ray actor hosting one `AsyncLLM`; wrapped with `ray.remote` by the pool.

    Args:
        model: Hugging Face id or local folder.
        engine_kwargs: Keyword arguments for `AsyncEngineArgs`, minus `model`;
            CPU defaults are filled in by `EngineConfig.engine_kwargs`.
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
            kwargs = one_process_engine(kwargs)
        started = time.monotonic()
        try:
            # Offline batch defaults (vLLM's `LLM` class): on CPU twice the running
            # sequences and tokens per step of the server defaults AsyncLLM gets otherwise.
            self._engine = AsyncLLM.from_engine_args(
                AsyncEngineArgs(**kwargs), usage_context=UsageContext.LLM_CLASS
            )
        except Exception as exc:
            # Ray never retries a constructor that raises: one clear line is all the user gets.
            raise EngineStartFailure(_engine_log_cause() or _start_failure(exc)) from None
        self._start_s = time.monotonic() - started
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._pid = os.getpid()
        self._identity = {"model": model, "engine": engine_config, "pool": pool_config or {}}
        self._max_model_len = self._engine.model_config.max_model_len
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
                crash_exit("watchdog: the engine process is gone")

    def _engine_processes_alive(self) -> bool:
        """Whether every `VLLM::` process this actor's engine started still runs.

        vLLM notices a dead engine process from a monitor thread, a moment later; a
        call arriving in that moment would run on a dead engine and be blamed for it.
        """
        for proc in self._engine_processes:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                return False
        return True

    async def info(self) -> dict[str, Any]:
        """Who this actor is: pid, engine start time, context length, and the model,
        engine and pool settings it was made with."""
        self._ensure_watchdog()
        return {
            "pid": self._pid,
            "start_s": self._start_s,
            "max_model_len": self._max_model_len,
            "hf_token_set": bool(os.environ.get("HF_TOKEN")),
            **self._identity,
        }

    async def check_health(self) -> None:
        """Crash-exit if the engine is dead; an idle dead engine is noticed only here."""
        from vllm.v1.engine.exceptions import EngineDeadError

        self._ensure_watchdog()
        if not self._engine_processes_alive():
            crash_exit("health check: an engine process is gone")
        try:
            await self._engine.check_health()
        except EngineDeadError as exc:
            crash_exit(f"health check: {exc!r}")

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Generate every row of one request batch, concurrently, bounded in flight.

        A streaming method: it first yields `{"started": pid}` once the call has
        its turn on the engine, then the columns. A caller that loses the actor
        before the first item knows its rows never ran, so they are not blamed.
        An `exclusive` call waits until the engine is idle and keeps other calls
        out until it is done, so an engine death during it is its rows' doing. A
        call that runs past `deadline_s` means the engine hangs: the actor
        crash-exits, as on an engine death.

        Args:
            request: `GenerateRequest.to_payload()`: rows, seeds, sampling,
                response_format, template, exclusive, deadline_s.

        Yields:
            `{"started": pid}`, then the columns `text`, `finish_reason`,
            `prompt_tokens`, `completion_tokens`, `error`, `choices` (one entry
            per row, in order), plus `pid` and `seconds`.
        """
        await self.check_health()
        rows: list[dict[str, Any]] = request["rows"]
        seeds: list[int | None] = request["seeds"]
        deadline_s: float | None = request.get("deadline_s")
        batch = uuid.uuid4().hex[:12]
        async with self._gate.enter(exclusive=bool(request.get("exclusive"))):
            yield {"started": self._pid}
            started = time.monotonic()
            token_ids = tokenize_prompts(rows, self._engine.get_tokenizer(), self._max_model_len)
            shared: dict[str, Any] = {}  # one SamplingParams for the rows that only use the job's
            work = asyncio.gather(
                *(
                    self._generate_one(f"{batch}-{i}", row, seed, request, ids, shared)
                    for i, (row, seed, ids) in enumerate(zip(rows, seeds, token_ids, strict=False))
                )
            )
            try:
                outputs = await asyncio.wait_for(work, timeout=deadline_s)
            except TimeoutError:
                crash_exit(f"hang: {len(rows)} rows not done within the {deadline_s:.0f} s deadline")
        columns: dict[str, Any] = {
            name: [out[name] for out in outputs]
            for name in (TEXT, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS, ERROR, CHOICES)
        }
        columns["pid"] = self._pid
        columns["seconds"] = time.monotonic() - started
        yield columns

    async def _generate_one(
        self,
        request_id: str,
        row: dict[str, Any],
        seed: int | None,
        request: dict[str, Any],
        token_ids: list[int] | None,
        shared: dict[str, Any],
    ) -> dict[str, Any]:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        if "error" in row:
            return failed_row(row["error"])
        try:
            prompt = engine_prompt(
                row, self._engine.get_tokenizer(), request.get("template") or {}, token_ids
            )
            if seed is None and not row.get("sampling") and not row.get("response_format"):
                if "params" not in shared:
                    shared["params"] = sampling_params(
                        row, None, request["sampling"], request.get("response_format")
                    )
                params = shared["params"]
            else:
                params = sampling_params(row, seed, request["sampling"], request.get("response_format"))
            lora = lora_request(row, request.get("adapters") or {})
        except (ValueError, TypeError) as exc:
            return failed_row(_row_error(exc))
        final = None
        async with self._in_flight:
            try:
                async for out in self._engine.generate(prompt, params, request_id, lora_request=lora):
                    final = out
            except EngineDeadError as exc:
                crash_exit(repr(exc))
            except (VLLMValidationError, ValueError) as exc:
                return failed_row(_row_error(exc))
            except EngineGenerateError as exc:
                if self._engine.errored:
                    crash_exit(repr(exc.__cause__ or exc))
                return failed_row(_row_error(exc.__cause__ or exc))
        if final is None or not final.outputs:
            return failed_row("the engine returned no output")
        return output_row(final, params)

    def __ray_shutdown__(self) -> None:
        """Shut the engine down when Ray kills the actor on purpose."""
        self._engine.shutdown()


def _is_engine_process(proc: psutil.Process) -> bool:
    try:
        return " ".join(proc.cmdline()).startswith("VLLM::")
    except psutil.Error:
        return False


class EngineStartFailure(RuntimeError):
    """The engine did not start; the message is one line the pool passes on as is."""


#: An error line vLLM logged: `... ERROR 11-25 03:43:24 [core.py:1510] RuntimeError: ...`.
_LOGGED_ERROR = re.compile(r"\bERROR \S+ \S+ \[[^\]]+\] ([A-Za-z_][\w.]*(?:Error|Exception): .+)$")


def _engine_log_cause() -> str | None:
    """The last exception line that the engine's processes logged into this actor's log.

    When the engine process fails to start, vLLM raises "Engine core initialization
    failed. See root cause above": the cause is only in the log that the engine
    processes share with this actor (Ray sends a worker's stdout and stderr to files).
    """
    causes: list[str] = []
    for fd in (1, 2):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - (256 << 10)))
                tail = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        for line in tail.splitlines():
            match = _LOGGED_ERROR.search(line)
            if match and "Engine core initialization failed" not in match.group(1):
                causes.append(match.group(1).strip())
    return causes[-1][:600] if causes else None


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
