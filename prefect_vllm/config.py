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

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ActorPoolConfig", "EngineConfig", "SamplingConfig"]

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
        "(e.g. max_num_seqs, kv_cache_memory_bytes, enforce_eager). Default: none.",
    )

    def engine_kwargs(self, model: str, *, on_cpu: bool) -> dict[str, Any]:
        """The keyword arguments for `AsyncEngineArgs`, with CPU defaults filled in.

        On CPU, CUDA graphs and torch.compile only cost start-up time, and vLLM
        cannot size the KV cache by itself, so both get a default unless given.
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
        default=4,
        ge=0,
        description="How often Ray restarts an actor whose engine died, before giving up on "
        "it. Default 4; bounded so a poison row cannot loop forever.",
    )
    max_task_retries: int = Field(
        default=4,
        ge=0,
        description="How often Ray retries a call that was in flight on an actor that crashed. Default 4.",
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
