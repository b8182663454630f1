"""`prefect-vllm run`: the checks and answers that need no server, then the flow.

Exit status: 0 when every row has a committed result, 1 when shards remain incomplete
(a re-run resumes them) or the engines failed, 2 for bad usage or configuration,
reported before any engine starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, TextIO

from prefect_vllm._cli.common import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_USAGE,
    engine_config,
    pool_config,
    recovery_config,
    sampling_config,
    validation_message,
)
from prefect_vllm._cli.common import fail as _fail
from prefect_vllm._cli.common import json_object as _json_object
from prefect_vllm._cli.resume import answer_from_checkpoints
from prefect_vllm.flows._resolve import MODEL_BLOCK_PREFIX

__all__ = ["run"]


def _template(raw: str | None) -> str | None:
    """`--chat-template`: a file's content when it names a file, else the template itself."""
    from prefect_vllm.exceptions import ConfigurationError

    if raw is None or "{" in raw:
        return raw
    try:
        with open(raw, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigurationError(
            f"--chat-template: {raw!r} is not a template and cannot be read ({exc})"
        ) from None


def _json_file(path: str | None) -> dict[str, Any] | None:
    """`--json-schema FILE`: a JSON object read from a file, errors naming file and line."""
    from prefect_vllm.exceptions import ConfigurationError, InputError

    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as exc:
        raise ConfigurationError(f"--json-schema: cannot read {path!r} ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"not valid JSON ({exc.msg}, column {exc.colno})", path=path, line=exc.lineno
        ) from None
    if not isinstance(value, dict):
        raise InputError(f"a JSON schema must be an object, not {type(value).__name__}", path=path)
    return value


def run(args: argparse.Namespace) -> int:
    """`prefect-vllm run`: answer from the checkpoints, or run the flow; the exit status."""
    from pydantic import ValidationError

    from prefect_vllm.config import ActorPoolConfig, RequestConfig, SamplingConfig
    from prefect_vllm.exceptions import ConfigurationError, JobRunningError, StorageError

    started = time.monotonic()
    try:
        sampling: SamplingConfig | None = sampling_config(args)
        if sampling is None and not args.model.startswith(MODEL_BLOCK_PREFIX):
            sampling = SamplingConfig()  # with a model block, its sampling is the default
        engine = engine_config(args)
        pool = pool_config(args)
        requests = RequestConfig(
            chat_template=_template(args.chat_template),
            chat_template_kwargs=_json_object(args.chat_template_kwargs, "--chat-template-kwargs"),
            json_schema=_json_file(args.json_schema),
            lora_dir=args.lora_dir,
        )
        recovery = recovery_config(args)
        embed = _embed(args)
        # The flow's own deciding step, on what the command knows (all of it, unless the
        # job's settings live in blocks or its paths are dated: then the flow decides).
        task, columns, decision = _decide(args, sampling, engine, requests, embed)
        done, engines_needed = answer_from_checkpoints(args, decision, started)
        if done is None and "{" not in args.input:
            # Every row read before a server, Ray or an engine starts: bad input is refused
            # in the time the read takes, and the flow gets this plan, not a second read.
            from prefect_vllm._input.planning import plan_job

            plan_job(args.input, columns, args.shard_size)
        own_pool = None
        if decision is not None and engines_needed:  # the pool the flow will build: started early
            from prefect_vllm._engine.pool import VllmActorPool

            own_pool = VllmActorPool(args.model, decision.identity.engine, pool or ActorPoolConfig())
    except ValidationError as exc:
        return _fail(validation_message(exc), EXIT_USAGE)
    except (ConfigurationError, JobRunningError, StorageError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    if done is not None:
        _print_summary(done, args.json)
        return EXIT_OK

    from prefect_vllm._cli.common import interrupts_end_the_run
    from prefect_vllm._launch import headstart as _headstart
    from prefect_vllm._logs import QUIET_ENV, quiet_console, quiet_refusals, summary_stdout

    known_api_url = os.environ.get("PREFECT_API_URL")
    if args.verbose:
        os.environ[QUIET_ENV] = "0"  # the Ray workers are told too
    else:
        # Our lines at INFO, other libraries' at WARNING; the Ray workers are told too.
        os.environ.setdefault(QUIET_ENV, "1")
        if not sys.stderr.isatty():
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in log files
        quiet_console(keep_run_link=known_api_url is not None)

    head_started_for: list[str] = []
    heads: list[Any] = []  # the head start made, handed to the flow below
    offer: Any = None

    def start_engines(api_url: str) -> None:
        head_started_for.append(api_url)
        if own_pool is not None:
            heads.append(_headstart.start_early(own_pool, args.ray_address, api_url))
        elif args.pool and not args.cluster:
            shards_per_actor = (pool or ActorPoolConfig()).shards_per_actor
            heads.append(_headstart.connect_early(args.pool, args.ray_address, api_url, shards_per_actor))

    with interrupts_end_the_run() as interrupt_status, summary_stdout() as stdout:
        failure: tuple[str, int] | None = None
        try:
            if known_api_url:  # the server is known before Prefect loads: Ray starts at once
                from prefect_vllm._launch.server import check_answers

                check_answers(known_api_url)
                start_engines(known_api_url)
            from prefect_vllm._launch.server import configured_api_url, prefect_api
            from prefect_vllm.flows import batch_inference

            if not args.verbose:
                quiet_console(keep_run_link=configured_api_url() is not None)  # Prefect's handlers
            quiet_refusals()
            server_starting = time.monotonic()
            # Ray and the engines start while the server does (see prefect_vllm/_launch/headstart.py).
            with prefect_api(while_starting=None if known_api_url else start_engines) as api_url:
                server_start_s = round(time.monotonic() - server_starting, 3)
                head = heads[0] if heads else None
                if [u.rstrip("/") for u in head_started_for] != [api_url.rstrip("/")]:  # another server
                    _headstart.abandon(head)
                    heads.clear()
                    head = None
                with _headstart.offered(head) as offer:
                    result = batch_inference(
                    input=args.input, output=args.output, model=args.model,
                    prompt_column=args.prompt_column, messages_column=args.messages_column, id_column=args.id_column,
                    pair_column=args.pair_column,
                    shard_size=args.shard_size, sampling=sampling, requests=requests, engine=engine, pool=pool,
                    recovery=recovery, ray_address=args.ray_address, job_id=args.job_id, restart=args.restart,
                    verify=args.verify, export=args.export, cluster=args.cluster, storage=args.storage,
                    warm_pool=args.pool, task=task, embed=embed,
                    truncate_prompt_tokens=args.truncate_prompt_tokens,
                    )  # fmt: skip
        except BaseException as exc:
            failure = _failure(exc, interrupt_status(), args.json, stdout, lambda: _kept(args))
        finally:
            # A run that was refused, failed early or had nothing to run; and Ray disconnected
            # before the last line, which no worker's late log line then follows.
            if offer is None or not offer.claimed:
                _headstart.abandon(heads[0] if heads else None)
        if failure is not None:
            message, code = failure
            if code == interrupt_status():  # stopped on purpose: said plainly, not as an error
                print(f"prefect-vllm: {message}", file=sys.stderr, flush=True)
                return code
            return _fail(message, code)
        result = result.model_copy(
            update={"timings": {"prefect_server_start_s": server_start_s, **result.timings}}
        )
        _print_summary(result, args.json, stdout)
    return EXIT_OK


def _failure(
    exc: BaseException, interrupted: int | None, as_json: bool, stdout: TextIO, kept: Any = None
) -> tuple[str, int]:
    """The last line and exit status of a run that ended with `exc` (re-raised when it is
    not ours: a bug's traceback is worth seeing); `kept()` says what an interrupted run
    kept, when the command can tell."""
    from prefect_vllm.exceptions import (
        ConfigurationError,
        IncompleteJobError,
        JobRunningError,
        PrefectVllmError,
    )

    # An interrupt surfaces as whatever was running when it came (KeyboardInterrupt, or an
    # error wrapping it, such as pydantic's): the signal decides.
    if interrupted is not None:
        told = kept() if kept is not None else None
        return (
            f"stopped: {told}; run the same command again to resume"
            if told
            else "stopped: the shards in flight were abandoned, every committed shard is kept; "
            "run the same command again to resume",
            interrupted,
        )
    if isinstance(exc, (ConfigurationError, JobRunningError)):
        return str(exc), EXIT_USAGE
    if isinstance(exc, IncompleteJobError):
        if exc.result is not None:
            _print_summary(exc.result, as_json, stdout)
        return str(exc), EXIT_INCOMPLETE
    if isinstance(exc, PrefectVllmError):
        return str(exc), EXIT_INCOMPLETE
    raise exc


def _kept(args: argparse.Namespace) -> str | None:
    """`6 of 47 shards committed in OUTPUT`: what an interrupted run leaves for the next
    one, read from the checkpoints; None when the command cannot read them (a dated
    output, a storage block) or they cannot be read."""
    from prefect_vllm._store.checkpoint import CheckpointStore

    if args.storage or "{" in args.output:
        return None
    try:
        store = CheckpointStore(args.output)
        manifest = store.read_manifest()
        if manifest is None:
            return f"no shard committed in {store.uri}"
        committed = store.committed()
        done = sum(1 for s in manifest.plan.shards if s.shard_id in committed)
    except Exception:  # the run is over either way: the generic line says enough
        return None
    return f"{done} of {_count(len(manifest.plan.shards), 'shard')} committed in {store.uri}"


def _decide(
    args: argparse.Namespace, sampling: Any, engine: Any, requests: Any, embed: Any
) -> tuple[Any, Any, Any]:
    """What the command can decide before anything starts, by the flow's own deciding step
    (`flows/_resolve.py`): the task (None: the flow decides, from a dated input), the
    columns the input is checked against, and the whole `JobDecision` unless only the
    flow can tell (`_decided_by_the_flow`).

    Raises:
        ConfigurationError: A refusal, naming the flag; the input or the model missing.
    """
    from prefect_vllm._input.planning import check_columns, discover_inputs
    from prefect_vllm._job import check_model
    from prefect_vllm.config import EngineConfig, SamplingConfig
    from prefect_vllm.flows._resolve import (
        ColumnNames,
        check_shard_size,
        decide_job,
        decide_task,
        task_columns,
    )

    names = {
        "pair_column": "--text-pair-column", "shard_size": "--shard-size",
        "embed": "--dimensions" if args.dimensions is not None else "--normalize",
    }  # fmt: skip
    given = ColumnNames(args.prompt_column, args.messages_column, args.id_column, args.pair_column)
    files = None if "{" in args.input else discover_inputs(args.input)
    options = {
        "export": args.export, "requests": requests, "truncate_prompt_tokens": args.truncate_prompt_tokens,
        "embed": embed, "names": names,
    }  # fmt: skip
    entry = decide_task(args.task, files, **options)
    check_shard_size(args.shard_size, "--shard-size")
    columns = task_columns(entry, given, names)
    check_columns(args.input, columns)
    check_model(args.model)
    if files is None:
        return args.task, columns, None
    decision = None
    if not _decided_by_the_flow(args):
        decision = decide_job(
            model=args.model, engine=engine or EngineConfig(), sampling=sampling or SamplingConfig(),
            files=files, task=args.task, columns=given, shard_size=args.shard_size,
            job_id=args.job_id, **options,
        )  # fmt: skip
    return entry.name, columns, decision


def _decided_by_the_flow(args: argparse.Namespace) -> bool:
    """Whether the job's settings live in Prefect blocks or a warm pool, or its paths are
    dated: only the flow can tell what it is."""
    blocks = args.model.startswith(MODEL_BLOCK_PREFIX) or args.cluster or args.storage or args.pool
    return bool(blocks) or "{" in args.input or "{" in args.output


def _embed(args: argparse.Namespace) -> Any:
    """`--dimensions` and `--normalize` as an `EmbedConfig` when either is given, else None
    (a job of another task refuses it in the deciding step)."""
    from prefect_vllm.config import EmbedConfig

    if args.dimensions is None and args.normalize is None:
        return None
    return EmbedConfig(dimensions=args.dimensions, normalize=args.normalize)


def _rate(result: Any) -> str:
    """Tokens per second of a run that generated any; rows per second otherwise (embeddings)."""
    if result.output_tokens or not result.wall_s:
        return f"{result.tokens_per_s:.0f} tokens/s"
    return f"{(result.rows_ok + result.rows_failed) / result.wall_s:.1f} rows/s"


def _count(n: int, noun: str) -> str:
    """`1 shard`, `2 shards`, `0 row errors`."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _print_summary(result: Any, as_json: bool, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if as_json:
        print(json.dumps(result.model_dump(mode="json")), file=out, flush=True)
        return
    print(
        f"job {result.job_id}: {_count(result.rows_ok, 'row')} ok, {_count(result.rows_failed, 'row error')}, "
        f"{_count(result.shards_run, 'shard')} run, {result.shards_skipped} skipped, "
        f"{_count(result.engine_restarts, 'engine restart')}, {result.wall_s:.1f} s, {_rate(result)}\n"
        f"output: {result.output}",
        file=out,
        flush=True,
    )
    if result.request_counts is not None:
        counts = result.request_counts
        print(
            f"OpenAI export: {counts['completed']} completed, {counts['failed']} failed of "
            f"{counts['total']} in {result.output}/_openai/output.jsonl and errors.jsonl",
            file=out,
            flush=True,
        )
