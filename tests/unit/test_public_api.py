"""The public surface, pinned: a name added to or dropped from an `__all__` is a decision."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

PUBLIC = {
    "prefect_vllm": [
        "CheckpointStorage", "ConfigurationError", "EngineCrashedError", "EngineError", "EngineStartError",
        "EngineUnavailableError", "FingerprintMismatchError", "IncompleteJobError", "InputError",
        "JobRunningError", "PrefectVllmError", "RayCluster", "StorageError", "VllmModel", "__version__",
    ],
    "prefect_vllm.blocks": ["CheckpointStorage", "RayCluster", "VllmModel"],
    "prefect_vllm.config": [
        "ActorPoolConfig", "EmbedConfig", "EngineConfig", "RecoveryConfig", "RequestConfig", "SamplingConfig",
    ],
    "prefect_vllm.exceptions": [
        "ConfigurationError", "EngineCrashedError", "EngineError", "EngineStartError", "EngineUnavailableError",
        "FingerprintMismatchError", "HeadStartMismatchError", "IncompleteJobError", "InputError", "JobRunningError", "PrefectVllmError",
        "StorageError",
    ],
    "prefect_vllm.flows": ["batch_inference"],
    "prefect_vllm.pools": ["list_pools", "pool_status", "start_pool", "stop_pool"],
    "prefect_vllm.results": ["BatchResult", "ShardResult"],
    "prefect_vllm.tasks": ["ShardJob", "run_shard"],
    "prefect_vllm.testing": [
        "CHAT_TEMPLATE", "POISON_ENGINE_ARGS", "POISON_MARKER", "POISON_RAISE_MARKER", "PoisonLogitsProcessor",
        "engine_processes", "make_tiny_lora", "make_tiny_model", "write_sample_batch", "write_sample_prompts",
    ],
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_the_public_names_are_exactly_these(module: str) -> None:
    imported = importlib.import_module(module)
    assert sorted(imported.__all__) == sorted(PUBLIC[module])


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_public_name_resolves(module: str) -> None:
    imported = importlib.import_module(module)
    for name in PUBLIC[module]:
        if name != "PoisonLogitsProcessor":  # imports vLLM: resolved by the poison tests
            assert getattr(imported, name) is not None, f"{module}.{name}"


def test_the_package_says_it_is_typed() -> None:
    import prefect_vllm

    assert (Path(prefect_vllm.__file__).parent / "py.typed").is_file()
