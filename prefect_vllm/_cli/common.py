"""What the `prefect-vllm` subcommands share: exit codes, error lines, engine and actor flags."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect_vllm._store.checkpoint import CheckpointStore

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2

#: How long the run's own clean-up (its engines, its Ray cluster, its Prefect server) may
#: take after Ctrl-C or SIGTERM before the command kills what is left and exits.
INTERRUPT_GRACE_S = 20.0


def add_output_arguments(parser: argparse.ArgumentParser, output_help: str) -> None:
    """`OUTPUT` and `--storage NAME`, as `status` and `cancel` read a job's location."""
    parser.add_argument("output", help=output_help)
    parser.add_argument(
        "--storage", default=None, metavar="NAME",
        help="a saved CheckpointStorage block: OUTPUT is a path under its base_uri, read with its credentials",
    )  # fmt: skip


def output_store(output: str, storage: str | None) -> CheckpointStore:
    """The location a command reads: `output`, or a path under a storage block."""
    from prefect_vllm._store.checkpoint import CheckpointStore

    if storage is None:
        return CheckpointStore(output)
    from prefect_vllm.blocks import CheckpointStorage
    from prefect_vllm.blocks.storage import open_store
    from prefect_vllm.flows._params import load_block

    return open_store(output, load_block(CheckpointStorage, storage, "--storage"))


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


def sampling_config(args: argparse.Namespace) -> Any:
    """The `SamplingConfig` of the sampling flags given, or None when none is (the
    defaults apply, or a model block's sampling, which the flags given are set over)."""
    from prefect_vllm.config import SamplingConfig

    given = _given(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        ignore_eos=args.ignore_eos,
    )  # fmt: skip
    return SamplingConfig(**given) if given else None


def recovery_config(args: argparse.Namespace) -> Any:
    """The `RecoveryConfig` of the recovery flags given; the model's defaults for the rest."""
    from prefect_vllm.config import RecoveryConfig

    return RecoveryConfig(
        **_given(
            max_job_restarts=args.max_job_restarts, poison_after=args.poison_after,
            hang_timeout_s=args.hang_timeout, hang_timeout_per_token_s=args.hang_timeout_per_token,
            probe_timeout_s=args.probe_timeout,
        )
    )  # fmt: skip


def _given(**flags: Any) -> dict[str, Any]:
    """The flags given on the command line: an unset flag is None, whatever its default."""
    return {name: value for name, value in flags.items() if value is not None}


def validation_message(exc: Any) -> str:
    """A pydantic `ValidationError` as one line: `field.path: message; ...`."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


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


@contextlib.contextmanager
def interrupts_end_the_run() -> Iterator[Callable[[], int | None]]:
    """Ctrl-C and SIGTERM stop the run within seconds; a second one stops it at once.

    The first interrupt raises `KeyboardInterrupt` in the main thread, so the run
    abandons its shards in flight (uncommitted) and shuts its engines, Ray and Prefect
    server down as it would on any failure. If that clean-up is not done within
    `INTERRUPT_GRACE_S`, or on a second interrupt, every process the command started
    (all its descendants: the local Ray cluster, engines, the Prefect server) is killed
    and the command exits. A warm pool's engines are not the command's: they stay up.
    SIGINT that was ignored when the command started (a `nohup` job) stays ignored.

    Yields:
        A function giving the exit status of the interrupt (130 for SIGINT, 143 for
        SIGTERM), or None while there has been none.
    """
    received: list[int] = []

    def leave_now() -> None:
        _kill_descendants()
        print(
            "prefect-vllm: stopped at once: every committed shard is kept; "
            "run the same command again to resume",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + received[0])

    def interrupted(signum: int, frame: FrameType | None) -> None:
        if received:
            leave_now()
        received.append(signum)
        print(
            "prefect-vllm: interrupted: stopping the run (press Ctrl-C again to quit at once); "
            "committed shards are kept",
            file=sys.stderr,
            flush=True,
        )
        timer = threading.Timer(INTERRUPT_GRACE_S, leave_now)
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    signals = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signals.append(signal.SIGINT)
    previous = {signum: signal.signal(signum, interrupted) for signum in signals}
    try:
        yield lambda: 128 + received[0] if received else None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _kill_descendants() -> None:
    import psutil

    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            proc.kill()
