"""An idle actor whose engine died does not take work as if healthy."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_vllm._engine.pool import VllmActorPool
from prefect_vllm._engine.protocol import CallParams, GenerateCall
from prefect_vllm.config import ActorPoolConfig, EngineConfig
from tests.helpers import engine_processes, no_engine_left, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture
def local_ray() -> Iterator[None]:
    import ray

    ray.init(include_dashboard=False, num_cpus=2)
    try:
        yield
    finally:
        ray.shutdown()


def test_dead_idle_engine_is_replaced_before_the_next_call(tiny_model: Path, local_ray: None) -> None:
    pool = VllmActorPool(str(tiny_model), EngineConfig(), ActorPoolConfig(num_actors=1, max_restarts=2))
    (info,) = pool.start()
    try:
        (core,) = engine_processes(("VLLM::EngineCore",))
        os.kill(core, signal.SIGKILL)
        wait_for(lambda: core not in engine_processes(("VLLM::EngineCore",)), 30, "the engine to die")
        call = GenerateCall.of_prompts(
            ["Tell me about cats."] * 4, params=CallParams(sampling={"max_tokens": 4})
        )
        out = pool.client().generate(call)
        assert out.columns["error"] == [None] * 4 and all(out.columns["text"])
        assert out.pid != info.pid, "the call was served by the actor whose engine had died"
        assert pool.engine_restarts() == 1
    finally:
        pool.shutdown()
    no_engine_left()
