"""A CPU engine is one process, forked from its actor.

vLLM's CPU platform makes every engine two spawned processes: `VLLM::EngineCore`,
then a `VLLM::Worker` that runs the model, each importing vLLM and torch from scratch
(6-15 s apiece on a 2-core machine). Neither cost buys anything inside a Ray actor:

- **One process.** The single-process executor ("uni") runs the model inside
  `VLLM::EngineCore`, as on one GPU. The CPU platform swaps it for the multiprocess
  one so that the worker's OpenMP environment is set before torch loads; in a Ray
  actor, Ray has set `OMP_NUM_THREADS` (the actor's CPUs) before anything imports
  torch. Raw `LLM(...)` of the tiny model started in 33 s instead of 48 s this way.
- **Forked, not spawned.** vLLM spawns its engine process inside a Ray actor (a
  forked child that used Ray would hang) and on CPU (for the worker's OpenMP
  environment). A uni engine process uses neither Ray nor a worker: forked from the
  actor, it inherits the actor's imports and is serving about 2 s later instead of
  about 9 s (the tiny model, an idle 2-core machine, same text generated). The actor
  forks once, in its constructor, before it has run a thread pool of its own.

Killing the engine still means killing `VLLM::EngineCore`: the model runs in it. An
engine given `distributed_executor_backend="mp"` gets vLLM's own processes, spawned.

A tensor-parallel engine (`tensor_parallel_size` > 1) is the layout a GPU runs: a
spawned `VLLM::EngineCore` and one spawned worker per rank, on vLLM's multiprocess
executor (`multiprocess_engine`). vLLM's CPU build binds each worker's OpenMP threads
to one NUMA node of its own and refuses when a machine has fewer nodes than workers;
a one-node machine gets each worker its share of the actor's cores instead.

The changes touch vLLM internals (`INTERNALS`). When the installed vLLM has moved one
of them, the engine starts in vLLM's own layout with one warning line, never half
patched; `tests/unit/test_cpu_engine.py` fails loudly on such a vLLM.
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("prefect_vllm.engine")

#: The engine argument that picks the executor; a value given by the user is kept.
EXECUTOR_ARG = "distributed_executor_backend"

#: vLLM's CPU build: which cores each worker's OpenMP threads are bound to ("0-3|4-7").
THREADS_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"

#: vLLM's switch between forking and spawning its engine processes.
START_METHOD_ENV = "VLLM_WORKER_MULTIPROC_METHOD"

_PATCHED = "_prefect_vllm_patched"

#: The vLLM (and Ray) internals the one-process engine relies on: (module, attribute,
#: the parameters it must take). `get_mp_context` must find `_maybe_force_spawn` as a
#: module global, so that replacing the module's attribute takes effect.
INTERNALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("vllm.platforms.cpu", "CpuPlatform.check_and_update_config", ("vllm_config",)),
    ("vllm.utils.system_utils", "_maybe_force_spawn", ()),
    ("vllm.utils.system_utils", "get_mp_context", ()),
    ("vllm.v1.engine.core", "set_process_title", ("name", "suffix", "prefix")),
    ("vllm.envs", "VLLM_PROCESS_NAME_PREFIX", ()),
    ("ray._raylet", "setproctitle", ()),
)


def moved_internals() -> list[str]:
    """What the installed vLLM lacks or has changed of `INTERNALS`: one phrase each,
    empty when the one-process engine can be set up."""
    moved = []
    for module_name, path, parameters in INTERNALS:
        where = f"{module_name}.{path}"
        try:
            value: Any = importlib.import_module(module_name)
            for part in path.split("."):
                value = getattr(value, part)
        except (ImportError, AttributeError):
            moved.append(f"{where} is gone")
            continue
        if getattr(value, _PATCHED, False) or not parameters:
            continue
        try:
            found = tuple(inspect.signature(value).parameters)
        except (TypeError, ValueError):
            moved.append(f"{where} is no longer a function")
            continue
        if found[: len(parameters)] != parameters:
            moved.append(f"{where} takes ({', '.join(found)}), not ({', '.join(parameters)})")
    if not moved:
        from vllm.utils import system_utils

        code = getattr(system_utils.get_mp_context, "__code__", None)
        if code is None or "_maybe_force_spawn" not in code.co_names:
            moved.append("vllm.utils.system_utils.get_mp_context no longer calls _maybe_force_spawn")
    return moved


def cpu_engine(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The layout of a CPU engine: one forked process for one rank
    (`one_process_engine`), vLLM's multiprocess layout for more (`multiprocess_engine`)."""
    if kwargs.get("tensor_parallel_size", 1) != 1 or kwargs.get("pipeline_parallel_size", 1) != 1:
        return multiprocess_engine(kwargs)
    return one_process_engine(kwargs)


def one_process_engine(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Ask for one forked engine process, unless the user chose another executor.

    Installs, in this (actor) process only, the three changes that make vLLM keep
    that choice: the CPU platform keeps the single-process executor, the engine
    process is forked, and it is still titled `VLLM::EngineCore`.

    Args:
        kwargs: `AsyncEngineArgs` keyword arguments of a CPU engine.

    Returns:
        The same arguments, with the executor filled in.
    """
    if kwargs.get("tensor_parallel_size", 1) != 1 or kwargs.get("pipeline_parallel_size", 1) != 1:
        return kwargs
    moved = moved_internals()
    if moved:
        import vllm

        logger.warning(
            "vLLM %s has moved what the one-process CPU engine relies on (%s): this engine starts "
            "in vLLM's own layout (a spawned EngineCore and worker), some seconds slower",
            vllm.__version__, "; ".join(moved),
        )  # fmt: skip
        return kwargs
    _keep_uni_executor()
    _fork_uni_engine()
    _title_forked_engine()
    _forked_engine_dies_with_its_actor()
    return {EXECUTOR_ARG: "uni", **kwargs}


def multiprocess_engine(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A tensor- or pipeline-parallel CPU engine in vLLM's multiprocess layout.

    The executor is vLLM's "mp" (a worker process per rank beside `VLLM::EngineCore`),
    unless the user chose one: inside an actor that a placement group holds, vLLM would
    otherwise pick its Ray executor. When `VLLM_CPU_OMP_THREADS_BIND` is not set (or
    "auto") and the machine has fewer NUMA nodes than workers, each worker's threads get
    a contiguous share of the cores this process may run on (`threads_binding`).

    Args:
        kwargs: `AsyncEngineArgs` keyword arguments of a CPU engine.

    Returns:
        The same arguments, with the executor filled in.
    """
    ranks = int(kwargs.get("tensor_parallel_size", 1)) * int(kwargs.get("pipeline_parallel_size", 1))
    if ranks > 1 and os.environ.get(THREADS_BIND_ENV, "auto") == "auto" and _numa_nodes() < ranks:
        os.environ[THREADS_BIND_ENV] = threads_binding(ranks, sorted(os.sched_getaffinity(0)))
    return {EXECUTOR_ARG: "mp", **kwargs}


def threads_binding(ranks: int, cpus: list[int]) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `ranks` workers sharing `cpus`: contiguous shares,
    the first ranks one core more when they do not divide evenly; with fewer cores than
    workers, workers share cores round the list.

    Examples:
        ```python
        from prefect_vllm._engine.cpu import threads_binding

        assert threads_binding(2, [0, 1]) == "0|1"
        assert threads_binding(2, [0, 1, 2, 3, 4]) == "0,1,2|3,4"
        assert threads_binding(3, [4, 5]) == "4|5|4"
        ```
    """
    if len(cpus) < ranks:
        return "|".join(str(cpus[rank % len(cpus)]) for rank in range(ranks))
    share, extra = divmod(len(cpus), ranks)
    shares, at = [], 0
    for rank in range(ranks):
        size = share + (1 if rank < extra else 0)
        shares.append(",".join(str(cpu) for cpu in cpus[at : at + size]))
        at += size
    return "|".join(shares)


def _numa_nodes() -> int:
    """How many NUMA nodes this machine has (1 when Linux does not say)."""
    try:
        return max(1, sum(1 for name in os.listdir("/sys/devices/system/node") if name[4:].isdigit()))
    except OSError:
        return 1


def _keep_uni_executor() -> None:
    """The CPU platform keeps a single-worker engine's "uni" executor, and forks it."""
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
            # The platform has just asked for spawn, for a worker process this engine lacks.
            os.environ[START_METHOD_ENV] = "fork"

    setattr(check_and_update_config, _PATCHED, True)
    CpuPlatform.check_and_update_config = staticmethod(check_and_update_config)  # type: ignore[method-assign]


def _fork_uni_engine() -> None:
    """vLLM forks the engine process when asked to, although this is a Ray actor.

    vLLM forces spawn in every Ray actor because a forked child that calls Ray hangs;
    a uni engine process on CPU never calls Ray. Its other reasons (CUDA or XPU in
    use, NUMA binding, WSL) do not arise on this path.
    """
    from vllm.utils import system_utils

    original: Callable[[], None] = system_utils._maybe_force_spawn
    if getattr(original, _PATCHED, False):
        return

    def maybe_force_spawn() -> None:
        if os.environ.get(START_METHOD_ENV) == "fork":
            return
        original()

    setattr(maybe_force_spawn, _PATCHED, True)
    system_utils._maybe_force_spawn = maybe_force_spawn


_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


#: Resolved in the actor: a child forked from a process with threads must not load libraries.
_PRCTL = _load_prctl()
_FORK_HOOKED: list[bool] = []


def _forked_engine_dies_with_its_actor() -> None:
    """The engine process is SIGKILLed by the kernel when its actor dies, however it dies.

    Ray reaps an actor's children when the actor exits while its node lives on; when the
    whole local cluster goes at once (the run's own process killed), nobody is left to
    do it, and a forked engine would outlive everything (a fork does not inherit the
    parent's own parent-death signal). Set in every child this actor forks: the engine
    is the only one.
    """
    if _PRCTL is None or _FORK_HOOKED:
        return
    _FORK_HOOKED.append(True)
    os.register_at_fork(after_in_child=lambda: _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL))


def _title_forked_engine() -> None:
    """A forked engine process is titled `VLLM::EngineCore`, as a spawned one is.

    vLLM titles its processes with the `setproctitle` package, which cannot retitle a
    process whose title a Ray worker has already set with its own copy of it; Ray's
    copy can. The title is how users and the fault tests find the engine to kill.
    """
    from vllm.v1.engine import core

    original: Callable[..., None] = getattr(core, "set_process_title")  # noqa: B009
    if getattr(original, _PATCHED, False):
        return

    def set_process_title(name: str, suffix: str = "", prefix: str | None = None) -> None:
        from ray import _raylet
        from vllm import envs

        prefix = prefix or envs.VLLM_PROCESS_NAME_PREFIX
        original(name, suffix, prefix)
        title = f"{name}_{suffix}" if suffix else name
        _raylet.setproctitle(f"{prefix}::{title}")  # type: ignore[attr-defined]

    setattr(set_process_title, _PATCHED, True)
    setattr(core, "set_process_title", set_process_title)  # noqa: B010
