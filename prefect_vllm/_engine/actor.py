"""The Ray actor that owns one vLLM `AsyncLLM` engine.

vLLM is imported inside the actor's methods, not at module level: Ray workers that
only hold a handle to the actor (shard tasks) unpickle this module too, and must
not pay for importing vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from typing import Any, NoReturn

from prefect_vllm._columns import COMPLETION_TOKENS, ERROR, FINISH_REASON, PROMPT_TOKENS, TEXT

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
    """

    def __init__(self, model: str, engine_config: dict[str, Any], max_in_flight: int) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        from prefect_vllm.config import EngineConfig

        on_cpu = current_platform.is_cpu()
        kwargs = EngineConfig.model_validate(engine_config).engine_kwargs(model, on_cpu=on_cpu)
        started = time.monotonic()
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self._start_s = time.monotonic() - started
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._pid = os.getpid()
        self._max_model_len = self._engine.model_config.max_model_len
        self._watchdog: asyncio.Task[None] | None = None

    def _ensure_watchdog(self) -> None:
        # Ray runs the constructor outside the actor's event loop: start on first call.
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_engine())

    async def _watch_engine(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            if self._engine.errored:
                crash_exit("watchdog: the engine process is gone")

    async def info(self) -> dict[str, Any]:
        """Who this actor is: pid, engine start time, context length."""
        self._ensure_watchdog()
        return {"pid": self._pid, "start_s": self._start_s, "max_model_len": self._max_model_len}

    async def check_health(self) -> None:
        """Crash-exit if the engine is dead; an idle dead engine is noticed only here."""
        from vllm.v1.engine.exceptions import EngineDeadError

        self._ensure_watchdog()
        try:
            await self._engine.check_health()
        except EngineDeadError as exc:
            crash_exit(f"health check: {exc!r}")

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Generate every row of one request batch, concurrently, bounded in flight.

        Args:
            request: `GenerateRequest.to_payload()`: prompts, seeds and sampling.

        Returns:
            Columns `text`, `finish_reason`, `prompt_tokens`, `completion_tokens`,
            `error` (one entry per prompt, in order), plus `pid` and `seconds`.
        """
        await self.check_health()
        started = time.monotonic()
        sampling: dict[str, Any] = request["sampling"]
        prompts: list[Any] = request["prompts"]
        seeds: list[int | None] = request["seeds"]
        batch = uuid.uuid4().hex[:12]
        rows = await asyncio.gather(
            *(
                self._generate_one(f"{batch}-{i}", p, s, sampling)
                for i, (p, s) in enumerate(zip(prompts, seeds, strict=False))
            )
        )
        columns: dict[str, Any] = {
            TEXT: [r[0] for r in rows],
            FINISH_REASON: [r[1] for r in rows],
            PROMPT_TOKENS: [r[2] for r in rows],
            COMPLETION_TOKENS: [r[3] for r in rows],
            ERROR: [r[4] for r in rows],
        }
        columns["pid"] = self._pid
        columns["seconds"] = time.monotonic() - started
        return columns

    async def _generate_one(
        self, request_id: str, prompt: Any, seed: int | None, sampling: dict[str, Any]
    ) -> tuple[str | None, str | None, int | None, int | None, str | None]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        if not isinstance(prompt, str):
            return None, None, None, None, f"prompt must be a string, got {type(prompt).__name__}"
        if not prompt:
            return None, None, None, None, "prompt is empty"
        params = SamplingParams(**sampling, seed=seed, output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async with self._in_flight:
            try:
                async for out in self._engine.generate({"prompt": prompt}, params, request_id):
                    final = out
            except EngineDeadError as exc:
                crash_exit(repr(exc))
            except (VLLMValidationError, ValueError) as exc:
                return None, None, None, None, _row_error(exc)
            except EngineGenerateError as exc:
                if self._engine.errored:
                    crash_exit(repr(exc.__cause__ or exc))
                return None, None, None, None, _row_error(exc.__cause__ or exc)
        if final is None or not final.outputs:
            return None, None, None, None, "the engine returned no output"
        choice = final.outputs[0]
        return (
            choice.text,
            choice.finish_reason,
            len(final.prompt_token_ids or ()),
            len(choice.token_ids),
            None,
        )

    def __ray_shutdown__(self) -> None:
        """Shut the engine down when Ray kills the actor on purpose."""
        self._engine.shutdown()


def _row_error(exc: BaseException) -> str:
    """A row error message: the exception's type and a truncated message, no prompt text."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message[:300]}"
