"""Per-run knobs: the engine, sampling and the actor pool, as validated pydantic models.

Every field states its default and the trade-off it controls. Validation happens
here, before any engine starts, so a bad value fails with the field's name.

Examples:
    ```python
    from prefect_vllm.config import ActorPoolConfig, EngineConfig, SamplingConfig

    engine = EngineConfig(engine_args={"max_num_seqs": 128})
    sampling = SamplingConfig(max_tokens=64, temperature=0.0)
    pool = ActorPoolConfig(num_actors=2)
    assert engine.engine_kwargs("/models/tiny", on_cpu=True)["enforce_eager"] is True
    ```
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ActorPoolConfig",
    "EmbedConfig",
    "EngineConfig",
    "RecoveryConfig",
    "RequestConfig",
    "SamplingConfig",
]

#: KV cache size used on CPU when the user sets none: vLLM refuses to start without one.
CPU_KV_CACHE_BYTES = 256 << 20


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineConfig(_Config):
    """How each vLLM engine is built (the model itself is a separate parameter)."""

    revision: str | None = Field(
        default=None,
        description="Model revision (branch, tag or commit) on the Hugging Face hub. "
        "Default: the latest revision.",
    )
    dtype: str | None = Field(
        default=None,
        description="Weights and activation dtype. Default: float32 on CPU (bf16 can crash "
        "CPU engines that did not enable AMX), vLLM's 'auto' on GPUs.",
    )
    max_model_len: int | None = Field(
        default=None,
        gt=0,
        description="Longest prompt plus completion, in tokens. Default: the model's own. "
        "Longer rows get a row error instead of failing the shard.",
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        description="GPUs per engine for tensor parallelism. Default 1; raise it for "
        "models that do not fit on one GPU (each actor then reserves that many GPUs).",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for vLLM's AsyncEngineArgs, applied last "
        "(e.g. max_num_seqs, kv_cache_memory_bytes, enforce_eager). Default: none. On CPU, "
        "keep enable_chunked_prefill off (our default there) whenever temperature > 0: "
        "vLLM-CPU kills the engine when it rewinds a seeded row after a partial prefill.",
    )

    def engine_kwargs(self, model: str, *, on_cpu: bool) -> dict[str, Any]:
        """The keyword arguments for `AsyncEngineArgs`, with CPU defaults filled in.

        On CPU, CUDA graphs and torch.compile only cost start-up time, and vLLM
        cannot size the KV cache by itself, so both get a default unless given.
        CPU engines also schedule every prompt whole (no chunked prefill): vLLM
        discards the token sampled after a partial prefill and rewinds the row's
        seeded generator with `set_offset`, which CPU generators do not have
        ("CPU Generator does not use offset" kills the engine). Whole prefills
        never discard a token, so a seeded row also draws the same random numbers
        whatever else shares its batch.
        """
        kwargs: dict[str, Any] = {
            "model": model,
            "tensor_parallel_size": self.tensor_parallel_size,
            "disable_log_stats": True,
        }
        if self.revision is not None:
            kwargs["revision"] = self.revision
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        kwargs["dtype"] = self.dtype or ("float32" if on_cpu else "auto")
        if on_cpu:
            kwargs["enforce_eager"] = True
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
            kwargs["enable_chunked_prefill"] = False
        kwargs.update(self.engine_args)
        return kwargs


class SamplingConfig(_Config):
    """Job-wide sampling parameters (vLLM `SamplingParams`)."""

    max_tokens: int = Field(default=256, ge=1, description="Most tokens generated per row. Default 256.")
    temperature: float = Field(
        default=1.0,
        ge=0.0,
        description="Sampling temperature; 0 is greedy. Default 1.0, as in the OpenAI API.",
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass. Default 1.0 (off).")
    seed: int = Field(
        default=0,
        description="Job seed. Each row's seed derives from it and the row's custom_id, "
        "so a retried shard samples exactly as the first attempt. Default 0.",
    )
    stop: list[str] | None = Field(default=None, description="Strings that end a completion. Default: none.")
    ignore_eos: bool = Field(
        default=False,
        description="Keep generating past the end-of-sequence token, up to max_tokens. "
        "Default false; benchmarks set it to fix the output length.",
    )


class RequestConfig(_Config):
    """How rows become engine requests: the chat template and job-wide structured output.

    Examples:
        ```python
        from prefect_vllm.config import RequestConfig

        requests = RequestConfig(
            chat_template_kwargs={"enable_thinking": False},
            json_schema={"type": "object", "properties": {"ok": {"type": "boolean"}}},
        )
        assert requests.response_format()["type"] == "json_schema"
        ```
    """

    chat_template: str | None = Field(
        default=None,
        description="A Jinja chat template that renders chat rows (the messages column or "
        "chat requests), replacing the model's own. Default: the model's template.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description='Extra variables for the chat template, e.g. {"enable_thinking": false}. Default: none.',
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="A JSON schema that every row's output must follow (vLLM structured "
        "output), unless the row asks for its own response_format. Default: free text.",
    )

    lora_dir: str | None = Field(
        default=None,
        description="A folder of LoRA adapters, one subfolder each in the PEFT layout "
        "(adapter_config.json + weights). A row whose model (a `model` column, or an OpenAI "
        "Batch body's model) names a subfolder is generated with that adapter. Default: none.",
    )

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(value).check_schema(value)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"not a valid JSON schema: {exc.message}") from None
        return value

    def response_format(self) -> dict[str, Any] | None:
        """The job-wide OpenAI-style `response_format`, or None for free text."""
        if self.json_schema is None:
            return None
        return {"type": "json_schema", "json_schema": {"name": "job", "schema": self.json_schema}}

    def template(self) -> dict[str, Any]:
        """What the engine needs to render chat rows."""
        return {"chat_template": self.chat_template, "chat_template_kwargs": self.chat_template_kwargs}


class EmbedConfig(_Config):
    """How an embedding job (`task="embed"`) pools each row into one vector.

    Examples:
        ```python
        from prefect_vllm.config import EmbedConfig

        assert EmbedConfig(dimensions=64).pooling_params() == {"dimensions": 64}
        ```
    """

    dimensions: int | None = Field(
        default=None,
        gt=0,
        description="Keep the first N dimensions of each embedding (Matryoshka models; vLLM "
        "refuses it for others, each row then gets the error). Default: the model's size.",
    )
    normalize: bool | None = Field(
        default=None,
        description="L2-normalize each embedding (vLLM's use_activation). Default: the "
        "model's pooler settings (normalized for most embedding models).",
    )

    def pooling_params(self) -> dict[str, Any]:
        """Keyword arguments for vLLM's `PoolingParams`, without the task."""
        params: dict[str, Any] = {}
        if self.dimensions is not None:
            params["dimensions"] = self.dimensions
        if self.normalize is not None:
            params["use_activation"] = self.normalize
        return params


class ActorPoolConfig(_Config):
    """The Ray actors hosting one engine each, and how they recover."""

    num_actors: int = Field(
        default=1, ge=1, description="Engine actors (replicas). Default 1; one per GPU is typical."
    )
    num_cpus: float = Field(
        default=1.0,
        ge=0.0,
        description="CPUs Ray reserves per actor. Default 1. Shard tasks reserve none, "
        "so they never starve the actors.",
    )
    num_gpus: float | None = Field(
        default=None,
        ge=0.0,
        description="GPUs Ray reserves per actor. Default: tensor_parallel_size when the "
        "cluster has GPUs, else 0.",
    )
    max_restarts: int = Field(
        default=32,
        ge=0,
        description="Engine restarts per actor before Ray gives up on it and its work moves "
        "to the other actors. Default 32: room to isolate a few poison rows (each costs "
        "about log2(shard_size) + 3 restarts) while a broken node is still dropped.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each actor reserves (e.g. {'engine': 1} to keep "
        "engines on the nodes that advertise it). Default: none.",
    )
    max_in_flight: int = Field(
        default=1024,
        ge=1,
        description="Most requests one engine holds at once. Default 1024: enough to keep "
        "vLLM's scheduler full, small enough to bound memory.",
    )
    shards_per_actor: int = Field(
        default=2,
        ge=1,
        description="Shards in flight per actor. Default 2, so the next shard's requests "
        "are queued while the previous shard is written.",
    )
    start_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="Seconds to wait for every engine to start. Default 900.",
    )


class RecoveryConfig(_Config):
    """How a job survives engines that die or hang: budgets, deadlines, poison rows.

    A call whose engine dies is retried with its rows running alone on the engine;
    if it dies alone it is split in halves, then into single rows; a row that kills
    an engine `poison_after` times while alone is committed as a row error. With
    the defaults one poison row costs about log2(shard_size / 32) + 4 restarts.
    """

    max_job_restarts: int = Field(
        default=64,
        ge=0,
        description="Engine restarts per run, over all actors, before the run stops with "
        "the remaining shards incomplete (exit 1; a re-run resumes). Default 64.",
    )
    poison_after: int = Field(
        default=2,
        ge=1,
        description="Engine deaths a single row must cause while running alone before it "
        "is committed as a row error. Default 2, so one unrelated crash (an OOM kill, a "
        "lost node) never condemns an innocent row; 1 isolates faster.",
    )
    single_rows_at: int = Field(
        default=32,
        ge=1,
        description="Rows that killed an engine while alone are split in halves while more "
        "than this many, then retried one row per call, so each further death names its "
        "row. Default 32: fewer engine restarts per poison row, at the price of generating "
        "that many rows unbatched.",
    )
    hang_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Floor of the deadline for one call into an engine, in seconds. Default "
        "300. The deadline is this plus hang_timeout_per_token_s for every token the call "
        "may generate; past it the engine is declared hung, its actor killed and restarted.",
    )
    hang_timeout_per_token_s: float = Field(
        default=0.02,
        ge=0,
        description="Seconds added to a call's deadline per token it may generate (rows x "
        "max_tokens). Default 0.02, i.e. a hang is declared only below 50 tokens/s for the "
        "call; raise it for slow CPU engines running large models.",
    )

    probe_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="How often a call that has not started yet asks its actor whether it "
        "answers at all (an actor silent for this long too is frozen: it is killed for a "
        "restart and the call goes elsewhere, its rows not blamed), and the margin past twice "
        "a running call's deadline before the caller kills an actor whose process is stuck "
        "(its own deadline cannot fire then). Default 60; lower it to replace a frozen actor "
        "sooner.",
    )

    def deadline_s(self, rows: int, max_tokens: int) -> float:
        """The deadline for one call of `rows` rows of up to `max_tokens` tokens each."""
        return self.hang_timeout_s + self.hang_timeout_per_token_s * rows * max_tokens
