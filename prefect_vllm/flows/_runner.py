"""The task runner of shard tasks: prefect-ray's, with Prefect's per-task settings work done once.

For every task it submits, prefect-ray's `RayTaskRunner` serializes Prefect's whole
settings (`prefect.context.serialize_context`), and for every task run the Ray
worker validates them back into a settings object and opens a new Prefect API
client (a TLS context built from the CA bundle, a version check against the server).
With shards of a few rows on a small machine that was most of what a shard cost, on
both sides (`benchmarks/shard_overhead.py`, `docs/benchmarks.md` "Per-shard
overhead"). What is the same for every task of a flow run (its settings, the flow
run's context with the pickled flow, the task itself) is serialized and put in Ray's
object store once per runner and read once per worker process, where the settings
context and an API client are made once too. Each shard is still its own
Prefect task run, with its own states, logs and retries; only the task engine's
"Finished in state Completed()" line, which says what the task run's state already
says, is not sent to the API (a log insert per shard); every other line is.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prefect.context import EngineContext, SettingsContext, SyncClientContext, serialize_context
from prefect_ray import RayTaskRunner
from prefect_ray.context import RemoteOptionsContext
from prefect_ray.task_runners import PrefectRayFuture

from prefect_vllm._sent import SentOnce


class ShardTaskRunner(RayTaskRunner):  # type: ignore[misc]  # prefect-ray ships no type information
    """`RayTaskRunner`, sending what a flow run's tasks share once, not with each task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sent: dict[tuple[str, int], tuple[Any, SentOnce[Any]]] = {}
        self._remote_functions: dict[str, Any] = {}
        self._stand_ins: dict[type, tuple[Any, Any]] = {}

    def submit(
        self,
        task: Any,
        parameters: dict[str, Any],
        wait_for: Iterable[Any] | None = None,
        dependencies: dict[str, set[Any]] | None = None,
    ) -> PrefectRayFuture[Any]:
        """Submit one task run to Ray, as `RayTaskRunner.submit` does."""
        from prefect.utilities.engine import collect_task_run_inputs_sync

        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        settings, flow_run = SettingsContext.get(), EngineContext.get()
        shared = _Shared(
            settings=self._send("settings", settings, lambda: settings.serialize() if settings else {}),
            flow_run=self._send("flow_run", flow_run, lambda: flow_run.serialize() if flow_run else {}),
            task=self._send("task", task, lambda: task),
        )
        task_run_id = uuid.uuid4()
        task_inputs = {
            k: collect_task_run_inputs_sync(v, future_cls=PrefectRayFuture) for k, v in parameters.items()
        }
        # The settings and the flow run travel apart (above): the rest of the context as Prefect makes it.
        settings_token = SettingsContext.__var__.set(self._stand_in(settings)) if settings else None
        flow_run_token = EngineContext.__var__.set(self._stand_in(flow_run)) if flow_run else None
        try:
            context = serialize_context(
                asset_ctx_kwargs={
                    "task": task,
                    "task_run_id": task_run_id,
                    "task_inputs": task_inputs,
                    "copy_to_child_ctx": True,
                }
            )
        finally:
            if flow_run_token is not None:
                EngineContext.__var__.reset(flow_run_token)
            if settings_token is not None:
                SettingsContext.__var__.reset(settings_token)
        parameters, upstream_refs = self._exchange_prefect_for_ray_futures(parameters)
        object_ref = (
            self._remote_function()
            .options(name=task.name)
            .remote(
                *upstream_refs,
                shared=shared,
                task_run_id=task_run_id,
                parameters=parameters,
                wait_for=wait_for,
                dependencies=dependencies,
                context=context,
            )
        )
        return PrefectRayFuture(task_run_id=task_run_id, wrapped_future=object_ref)

    def _send(self, kind: str, value: Any, serialized: Callable[[], Any]) -> SentOnce[Any]:
        """`value`, put in the object store the first time it is sent (while it is the same object)."""

        known = self._sent.get((kind, id(value)))
        if known is None or known[0] is not value:
            known = (value, SentOnce.put(serialized()))
            self._sent[(kind, id(value))] = known
        return known[1]

    def _stand_in(self, context: Any) -> Any:
        """`context` as an object whose `serialize()` is empty, so `serialize_context`
        leaves it out; it stays what the rest of Prefect reads meanwhile."""
        known = self._stand_ins.get(type(context))
        if known is None or known[0] is not context:
            stand_in_type = _SettingsSentApart if isinstance(context, SettingsContext) else _FlowRunSentApart
            fields = {name: getattr(context, name) for name in type(context).model_fields}
            known = (context, stand_in_type.model_construct(**fields))
            self._stand_ins[type(context)] = known
        return known[1]

    def _remote_function(self) -> Any:
        """The Ray remote function for the current remote options, made once per options."""
        import ray

        options = RemoteOptionsContext.get().current_remote_options or {}
        key = repr(sorted(options.items()))
        if key not in self._remote_functions:
            function: Any = _run_task
            self._remote_functions[key] = ray.remote(**options)(function) if options else ray.remote(function)
        return self._remote_functions[key]


class _SettingsSentApart(SettingsContext):
    """The flow run's settings while a task's context is serialized: they are sent apart."""

    def serialize(self, include_secrets: bool = True) -> dict[str, Any]:
        return {}


class _FlowRunSentApart(EngineContext):
    """The flow run's context while a task's context is serialized: it is sent apart."""

    def serialize(self, include_secrets: bool = True) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class _Shared:
    """What every task of a flow run shares, as sent once."""

    settings: SentOnce[Any]
    flow_run: SentOnce[Any]
    task: SentOnce[Any]


#: In a Ray worker: the settings contexts made from what was sent once; the API client,
#: by settings key.
_WORKER_SETTINGS: dict[str, SettingsContext] = {}
_WORKER_CLIENT: list[tuple[str, SyncClientContext]] = []


def _run_task(*upstream_refs: Any, shared: _Shared, context: dict[str, Any], **run: Any) -> Any:
    """Run one Prefect task run in a Ray worker, under the flow run's settings."""
    settings_key = shared.settings.key
    if settings_key not in _WORKER_SETTINGS:
        settings = shared.settings.get()
        _WORKER_SETTINGS[settings_key] = SettingsContext(**settings) if settings else None  # type: ignore[assignment]
        _quiet_completions()
    context = {**context, "flow_run_context": shared.flow_run.get()}
    settings_context = _WORKER_SETTINGS[settings_key]
    with settings_context if settings_context is not None else contextlib.nullcontext():
        _keep_client(settings_key)
        return RayTaskRunner._run_prefect_task(*upstream_refs, task=shared.task.get(), context=context, **run)


class _NoCompletedLine(logging.Filter):
    """Drops the task engine's "Finished in state Completed()" record; failures pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.INFO and str(record.msg).startswith("Finished in state Completed")
        )


def _quiet_completions() -> None:
    """Install `_NoCompletedLine` on this worker's task run logger, once."""
    task_runs = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _NoCompletedLine) for f in task_runs.filters):
        task_runs.addFilter(_NoCompletedLine())


def _keep_client(settings_key: str) -> None:
    """Open this worker's Prefect API client once; Prefect's task engine finds it open.

    The client's context is entered once more than it is left, so it stays current in
    this worker's thread for the next task runs; a worker that runs another flow
    run's tasks (other settings) closes it and opens one for those.
    """
    if _WORKER_CLIENT and _WORKER_CLIENT[0][0] == settings_key:
        return
    if _WORKER_CLIENT:
        _WORKER_CLIENT.pop()[1].__exit__(None, None, None)
    _WORKER_CLIENT.append((settings_key, SyncClientContext().__enter__()))
