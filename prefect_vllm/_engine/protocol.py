"""What a shard task and an engine actor send each other: typed, picklable and light.

No vLLM and no Ray here: shard tasks import this on Ray workers that host no engine,
and the actor receives these objects as they were built (Ray pickles them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from prefect_vllm._job_tasks import job_task

__all__ = ["CallParams", "EngineInfo", "EngineRow", "GenerateCall", "GenerateResult", "GenerateStarted"]


class EngineRow(msgspec.Struct, frozen=True, omit_defaults=True):
    """One row as the engine actor receives it (`RowRequest.payload()`'s fields, typed).

    Exactly one of `prompt`, `messages`, `inputs` is set, or `error` (a row that failed
    already, which the engine answers with that error). Rows cross the task-actor
    boundary msgpack-encoded (`GenerateCall.__reduce__`): as fast as plain dicts
    through Ray, and ten times faster than pickled dataclasses (docs/benchmarks.md).

    Attributes:
        prompt: A completion's text or token ids; a scoring row's first text; a
            rerank row's query.
        messages: A chat row's `{role, content}` messages.
        inputs: An embeddings request's several inputs (one vector each).
        pair: A scoring row's second text.
        documents: A rerank row's documents; `top_n` how many of the best it keeps.
        sampling: The row's own `SamplingParams` overrides.
        pooling: The row's own `PoolingParams` overrides (an embeddings request's `dimensions`).
        response_format: The row's own structured output (`json_schema`, `json_object`).
        adapter: The LoRA adapter that generates the row.
        error: Why the row cannot be served (its row error).
    """

    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    inputs: list[str | list[int]] | None = None
    pair: str | None = None
    documents: list[str] | None = None
    top_n: int | None = None
    sampling: dict[str, Any] = msgspec.field(default_factory=dict)
    pooling: dict[str, Any] = msgspec.field(default_factory=dict)
    response_format: dict[str, Any] | None = None
    adapter: str | None = None
    error: str | None = None


_ROWS_DECODER = msgspec.msgpack.Decoder(list[EngineRow])
_ROWS_ENCODER = msgspec.msgpack.Encoder()


def _call_of(rows: bytes, *fields: Any) -> GenerateCall:
    """A `GenerateCall` rebuilt on the other side of Ray, its rows decoded."""
    return GenerateCall(_ROWS_DECODER.decode(rows), *fields)


@dataclass(frozen=True)
class CallParams:
    """What every call of one job shares, built once per shard task.

    Attributes:
        sampling: Keyword arguments for vLLM's `SamplingParams`, minus `seed`.
        response_format: Job-wide structured output (`json_schema`), for rows without their own.
        template: `chat_template` and `chat_template_kwargs` for chat rows.
        adapters: LoRA adapters by name -> path, for rows that name one.
        task: The job's task (`prefect_vllm._job_tasks`): `generate`, or one served by
            vLLM's pooling runner (`embed`, `classify`, `score`, `rerank`).
        pooling: Keyword arguments for vLLM's `PoolingParams` of an `embed` call.
        tokenization: vLLM's `tokenization_kwargs` of a pooling call (`truncate_prompt_tokens`).
    """

    sampling: dict[str, Any] = field(default_factory=dict)
    response_format: dict[str, Any] | None = None
    template: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    task: str = "generate"
    pooling: dict[str, Any] = field(default_factory=dict)
    tokenization: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerateCall:
    """One batch of rows for one actor call (a shard, or part of one).

    Attributes:
        rows: One `EngineRow` per row: a prompt or messages, the row's own sampling
            overrides and response format, or an error found already.
        seeds: Per-row sampling seeds derived from the job seed, `None` for greedy rows.
        params: What the job's calls share.
        exclusive: Run alone on the engine, so a crash is these rows' doing.
        deadline_s: Past this, the engine is declared hung and its actor restarted.
    """

    rows: list[EngineRow]
    seeds: list[int | None]
    params: CallParams = field(default_factory=CallParams)
    exclusive: bool = False
    deadline_s: float | None = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled (by Ray) with its rows msgpack-encoded: one bytes object, not a tree."""
        encoded = _ROWS_ENCODER.encode(self.rows)
        return _call_of, (encoded, self.seeds, self.params, self.exclusive, self.deadline_s)

    @classmethod
    def of_prompts(cls, prompts: list[str], **kwargs: Any) -> GenerateCall:
        """A call for plain text prompts with the job's sampling, unseeded.

        Examples:
            ```python
            from prefect_vllm._engine.protocol import CallParams, GenerateCall

            call = GenerateCall.of_prompts(["Hi."], params=CallParams(sampling={"max_tokens": 4}))
            assert call.rows[0].prompt == "Hi." and call.seeds == [None]
            ```
        """
        return cls(rows=[EngineRow(prompt=p) for p in prompts], seeds=[None] * len(prompts), **kwargs)


@dataclass(frozen=True)
class EngineInfo:
    """What an engine actor says of itself (`VllmEngineActor.info`).

    Attributes:
        pid: The actor's process.
        tasks: What its engine serves, as vLLM names it (`generate`, `embed`, `classify`,
            ...; `score` when vLLM scores with the model). None: an older actor that
            does not say (a warm pool's).
        start_s: How long its engine took to start.
        max_model_len: Its engine's context length (None: not said).
        hf_token_set: Whether a Hugging Face token reached it.
        deaths: Why its engines died before, oldest first.
        node: The Ray node it runs on; `gpus` the GPU ids Ray gave it there.
        model: The model it was made with; `engine` and `pool` its engine and pool
            settings (`EngineConfig`, `ActorPoolConfig` dumps): a warm pool's runs read
            theirs from them.
    """

    pid: int
    tasks: tuple[str, ...] | None = None
    start_s: float = 0.0
    max_model_len: int | None = None
    hf_token_set: bool = False
    deaths: tuple[str, ...] = ()
    node: str | None = None
    gpus: tuple[str, ...] = ()
    model: str = ""
    engine: dict[str, Any] = field(default_factory=dict)
    pool: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, answer: EngineInfo | Mapping[str, Any]) -> EngineInfo:
        """An actor's answer as an `EngineInfo`: an older actor's answers with a dict."""
        if isinstance(answer, EngineInfo):
            return answer
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in answer.items() if k in known}
        for name in ("tasks", "deaths", "gpus"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Its fields as a plain dict (lists for tuples), for JSON and the public API."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class GenerateStarted:
    """The first item of a call's stream: the call has its turn on the engine.

    A caller that loses the actor before it knows that the call's rows never ran,
    so they are not to blame.
    """

    pid: int


@dataclass(frozen=True)
class GenerateResult:
    """The last item of a call's stream: the rows' columns, in row order.

    Attributes:
        columns: The task's `row_columns`, one entry per row of the call.
        pid: The actor process that generated them.
        seconds: Time on the engine.
        task: The call's task, which decides its columns.
    """

    columns: dict[str, list[Any]]
    pid: int
    seconds: float
    task: str = "generate"

    def __post_init__(self) -> None:
        missing = set(job_task(self.task).row_columns) - set(self.columns)
        if missing:
            raise ValueError(f"a generate result lacks the columns {sorted(missing)}")
