from __future__ import annotations

import pytest
from pydantic import ValidationError

from prefect_vllm.config import CPU_KV_CACHE_BYTES, ActorPoolConfig, EngineConfig, SamplingConfig


def test_cpu_engines_get_eager_mode_a_sized_kv_cache_and_float32() -> None:
    kwargs = EngineConfig().engine_kwargs("m", on_cpu=True)
    assert kwargs["enforce_eager"] is True
    assert kwargs["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
    assert kwargs["dtype"] == "float32"


def test_cpu_engines_prefill_prompts_whole_so_seeded_rows_are_never_rewound() -> None:
    """vLLM-CPU rewinds a seeded row's generator after a partial prefill, which kills the engine."""
    assert EngineConfig().engine_kwargs("m", on_cpu=True)["enable_chunked_prefill"] is False
    assert "enable_chunked_prefill" not in EngineConfig().engine_kwargs("m", on_cpu=False)


def test_gpu_engines_keep_vllm_defaults_and_user_engine_args_win() -> None:
    kwargs = EngineConfig(engine_args={"max_num_seqs": 8}).engine_kwargs("m", on_cpu=False)
    assert "enforce_eager" not in kwargs and kwargs["dtype"] == "auto"
    assert kwargs["max_num_seqs"] == 8
    cpu = EngineConfig(engine_args={"enforce_eager": False}).engine_kwargs("m", on_cpu=True)
    assert cpu["enforce_eager"] is False


@pytest.mark.parametrize(
    ("model", "field"),
    [
        (lambda: SamplingConfig(max_tokens=0), "max_tokens"),
        (lambda: SamplingConfig(top_p=1.5), "top_p"),
        (lambda: ActorPoolConfig(num_actors=0), "num_actors"),
        (lambda: EngineConfig(unknown=1), "unknown"),
    ],
)
def test_bad_values_are_refused_naming_the_field(model: object, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        model()  # type: ignore[operator]
