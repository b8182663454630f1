"""What the `prefect-vllm` subcommands share: exit codes, error lines, engine and actor flags."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2


class _RefusalWithoutTraceback(logging.Filter):
    """Prefect logs the exception that ends a flow run with its traceback. A refusal
    (bad settings, a changed job, a job already running) is one line, which the command
    prints last; forty lines of traceback above it only bury it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect_vllm.exceptions import ConfigurationError, JobRunningError

        if record.exc_info and isinstance(record.exc_info[1], (ConfigurationError, JobRunningError)):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_refusals() -> None:
    """Keep refusals' tracebacks out of every log handler Prefect has set up (the console
    and the run's logs on the server): each refusal is still logged, as its message."""
    quiet = _RefusalWithoutTraceback()
    names = ["", *(name for name in logging.root.manager.loggerDict if name.startswith("prefect"))]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _RefusalWithoutTraceback) for f in handler.filters):
                handler.addFilter(quiet)


def add_actor_flags(parser: argparse.ArgumentParser) -> None:
    """The engine actors' flags, shared by `run` and `pool start`."""
    parser.add_argument("--actors", type=int, default=None, help="engine actors (default 1)")
    parser.add_argument("--cpus-per-actor", type=float, default=None, help="default 1")
    parser.add_argument(
        "--gpus-per-actor", type=float, default=None, help="default: tensor parallel size on GPUs"
    )
    parser.add_argument(
        "--max-restarts", type=int, default=None, help="engine restarts per actor (default 32)"
    )
    parser.add_argument(
        "--actor-resources", default=None, help="JSON object of custom Ray resources per actor"
    )


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The vLLM engine's flags, shared by `run` and `pool start`."""
    parser.add_argument("--tensor-parallel-size", type=int, default=None, help="default 1")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, auto on GPU")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--engine-args", default=None, help="JSON object of vLLM engine arguments")


def engine_config(args: argparse.Namespace) -> Any:
    """The `EngineConfig` of the engine flags given, or None when none is (the model's
    own defaults apply, or those of a block or warm pool that gives them)."""
    from prefect_vllm.config import EngineConfig

    given = _given(
        dtype=args.dtype, max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size,
        engine_args=None if args.engine_args is None else json_object(args.engine_args, "--engine-args"),
    )  # fmt: skip
    return EngineConfig(**given) if given else None


def pool_config(args: argparse.Namespace) -> Any:
    """The `ActorPoolConfig` of the actor flags given, or None when none is."""
    from prefect_vllm.config import ActorPoolConfig

    given = _given(
        num_actors=args.actors, num_cpus=args.cpus_per_actor, num_gpus=args.gpus_per_actor,
        max_restarts=args.max_restarts,
        resources=None if args.actor_resources is None else json_object(args.actor_resources, "--actor-resources"),
    )  # fmt: skip
    return ActorPoolConfig(**given) if given else None


def _given(**flags: Any) -> dict[str, Any]:
    """The flags given on the command line: an unset flag is None, whatever its default."""
    return {name: value for name, value in flags.items() if value is not None}


def fail(message: str, code: int) -> int:
    print(f"prefect-vllm: error: {message}", file=sys.stderr)
    return code


def json_object(raw: str | None, flag: str) -> dict[str, Any]:
    from prefect_vllm.exceptions import ConfigurationError

    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{flag} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise ConfigurationError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value
