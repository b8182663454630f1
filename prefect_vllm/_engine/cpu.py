"""One process per CPU engine instead of two.

vLLM's CPU platform replaces a single-process executor ("uni": the model runs inside
the `VLLM::EngineCore` process, as it does on one GPU) with the multiprocess one, so
every CPU engine is two spawned processes (`VLLM::EngineCore`, then `VLLM::Worker`),
each importing vLLM and torch from scratch. On a 2-core machine that second import is
about 15 s of every engine start and of every restart after an engine death (measured:
raw `LLM(...)` of the tiny model starts in 33 s instead of 48 s, and generates the same
text). Its reason, setting the worker's OpenMP environment before torch loads, does not
apply to an engine inside a Ray actor: Ray gives the actor's processes
`OMP_NUM_THREADS` (the actor's CPUs) before anything imports torch.

Killing the engine still means killing `VLLM::EngineCore`: the model runs in it.
"""

from __future__ import annotations

from typing import Any

#: The engine argument that picks the executor; a value given by the user is kept.
EXECUTOR_ARG = "distributed_executor_backend"

_PATCHED = "_prefect_vllm_keeps_uni"


def one_process_engine(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Ask for the single-process executor, unless the user chose one, and make the CPU
    platform keep it for single-worker engines.

    Args:
        kwargs: `AsyncEngineArgs` keyword arguments of a CPU engine.

    Returns:
        The same arguments, with the executor filled in.
    """
    if kwargs.get("tensor_parallel_size", 1) != 1 or kwargs.get("pipeline_parallel_size", 1) != 1:
        return kwargs
    _keep_uni_executor()
    return {EXECUTOR_ARG: "uni", **kwargs}


def _keep_uni_executor() -> None:
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config
    if getattr(original, _PATCHED, False):
        return

    def check_and_update_config(vllm_config: Any) -> None:
        parallel = vllm_config.parallel_config
        asked = parallel.distributed_executor_backend
        original(vllm_config)
        if asked == "uni" and parallel.world_size == 1:
            parallel.distributed_executor_backend = "uni"

    setattr(check_and_update_config, _PATCHED, True)
    CpuPlatform.check_and_update_config = staticmethod(check_and_update_config)  # type: ignore[method-assign]
