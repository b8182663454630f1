"""How the engine actor serves each row of a call: generated, pooled, scored or ranked.

A mixin of `VllmEngineActor` (`prefect_vllm._engine.actor`): the per-row methods its
`generate` gathers, chosen by the call's task entry (`prefect_vllm._job_tasks`). A
row's own failure is its row's error; an engine that died crash-exits the actor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

from prefect_vllm._engine.protocol import CallParams, EngineRow, GenerateCall
from prefect_vllm._engine.vllm_io import (
    can_score,
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

__all__ = ["RowServing"]


class RowServing:
    """The per-row half of the engine actor; the actor sets these attributes up."""

    _engine: Any
    _in_flight: asyncio.Semaphore
    _max_model_len: int
    _class_names: list[str] | None
    _scorer: Any
    _scorer_error: str | None
    _supported: tuple[str, ...]
    _served: tuple[str, ...] | None
    #: The actor's: record why the engine died, and crash-exit.
    _die: Callable[..., NoReturn]

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
                job_params = sampling_params(
                    EngineRow(), None, call.params.sampling, call.params.response_format
                )
            else:
                job_params = pooling_params(task.serves, call.params.pooling)
        except (ValueError, TypeError) as exc:
            job_params = exc
        return (self._generate_one if task.samples else self._pool_one), job_params, token_ids

    async def _generate_one(
        self,
        request_id: str,
        row: EngineRow,
        seed: int | None,
        params: CallParams,
        token_ids: list[int] | None,
        job_params: Any,
    ) -> dict[str, Any]:
        if row.error is not None:
            return failed_row(row.error)
        try:
            prompt = engine_prompt(
                row, self._engine.get_tokenizer(), params.template, token_ids, self._max_model_len
            )
            if seed is None and not row.sampling and not row.response_format:
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
        row: EngineRow,
        _seed: int | None,
        params: CallParams,
        token_ids: list[int] | None,
        job_params: Any,
    ) -> dict[str, Any]:
        """One row's embedding (one per input, for a request of several) or class
        probabilities, through vLLM's pooling runner (`AsyncLLM.encode`)."""
        task = params.task
        if row.error is not None:
            return failed_row(row.error, task)
        if row.messages is not None:
            return failed_row(f"a {task} job reads text (the prompt column), not chat messages", task)
        from vllm.exceptions import VLLMValidationError

        try:
            if isinstance(job_params, Exception):
                raise job_params
            # Shared by the call's rows: vLLM copies it for each request (`InputProcessor`).
            row_params = (
                pooling_params(task, {**params.pooling, **row.pooling}) if row.pooling else job_params
            )
            if row.inputs is not None or params.tokenization:
                # Several inputs (an OpenAI embeddings request), or prompts to cut: vLLM's
                # renderer tokenizes, cuts and checks each one, as `LLM.embed` has it do.
                texts = (
                    row.inputs if row.inputs is not None else [row.prompt] if row.prompt is not None else []
                )
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
        return embedding_row(finals, several=row.inputs is not None)

    async def _score_one(
        self,
        request_id: str,
        row: EngineRow,
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
        row: EngineRow,
        _seed: int | None,
        params: CallParams,
        _token_ids: list[int] | None,
        _job_params: Any,
    ) -> dict[str, Any]:
        """A query's documents ranked by their scores against it, as vLLM's `/v1/rerank` ranks them."""
        return await self._scored_row(
            "rerank", request_id, row, params,
            lambda finals: rerank_row(self._scorer, finals, row.documents or [], row.top_n),
        )  # fmt: skip

    async def _scored_row(
        self, task: str, request_id: str, row: EngineRow, params: CallParams, answer: Any
    ) -> dict[str, Any]:
        """A row scored through vLLM's scoring processor: a text against its pair
        (`pair`), or against each of its `documents`; `answer` makes its output row."""
        if row.error is not None:
            return failed_row(row.error, task)
        from vllm.exceptions import VLLMValidationError

        if self._scorer is None:
            return failed_row(self._scorer_error or _CANNOT_SCORE, task)
        against = row.documents if row.documents is not None else row.pair
        if not isinstance(row.prompt, str) or against is None:  # the reader sets both, or an error
            return failed_row("a scored row needs a text and what to score it against", task)
        try:
            inputs = score_inputs(self._scorer, row.prompt, against, params.tokenization)
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


#: Each row's error in a score job whose model vLLM does not score with.
_CANNOT_SCORE = "vLLM cannot score with this model"


class _RowFailed(Exception):
    """One request failed for its own sake: the message is its row's error."""


def _row_error(exc: BaseException) -> str:
    """A row error message: the exception's type and a truncated message, no prompt text."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message[:300]}"
