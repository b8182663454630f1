"""The task runner of shard tasks: prefect-ray's, with Prefect's per-task settings work done once.

For every task it submits, prefect-ray's `RayTaskRunner` serializes Prefect's whole
settings (`prefect.context.serialize_context`), and for every task run the Ray
worker validates them back into a settings object and opens a new Prefect API
client (a TLS context built from the CA bundle, a version check against the server).
With shards of a few rows on a small machine that was most of what a shard cost, on
both sides (`benchmarks/shard_overhead.py`, `docs/benchmarks.md` "Per-shard
overhead"). A flow run's settings do not change while it runs, so here they are
serialized and put in Ray's object store once per runner, and made into a settings
context and an API client once per worker process. Each shard is still its own
Prefect task run, with its own states, logs and retries.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from typing import Any

from prefect.context import SettingsContext, SyncClientContext, serialize_context
from prefect_ray import RayTaskRunner
from prefect_ray.context import RemoteOptionsContext
from prefect_ray.task_runners import PrefectRayFuture


class ShardTaskRunner(RayTaskRunner):  # type: ignore[misc]  # prefect-ray ships no type information
    """`RayTaskRunner`, submitting with the flow run's settings sent once, not per task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._settings: tuple[SettingsContext | None, str, Any] | None = None
        self._remote_functions: dict[str, Any] = {}
        self._stand_in: tuple[SettingsContext | None, SettingsContext] | None = None

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
        settings_key, settings_ref = self._flow_settings()
        task_run_id = uuid.uuid4()
        task_inputs = {
            k: collect_task_run_inputs_sync(v, future_cls=PrefectRayFuture) for k, v in parameters.items()
        }
        # The settings travel once, by reference (below): the rest of the context as Prefect makes it.
        token = SettingsContext.__var__.set(self._sent_once())
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
            SettingsContext.__var__.reset(token)
        parameters, upstream_refs = self._exchange_prefect_for_ray_futures(parameters)
        object_ref = (
            self._remote_function()
            .options(name=task.name)
            .remote(
                *upstream_refs,
                settings_key=settings_key,
                settings=settings_ref,
                task=task,
                task_run_id=task_run_id,
                parameters=parameters,
                wait_for=wait_for,
                dependencies=dependencies,
                context=context,
            )
        )
        return PrefectRayFuture(task_run_id=task_run_id, wrapped_future=object_ref)

    def _flow_settings(self) -> tuple[str, Any]:
        """The flow run's settings, serialized and put in the object store once (while
        they stay the same): their key in the workers' cache, and their object ref."""
        import ray

        current = SettingsContext.get()
        if self._settings is None or self._settings[0] is not current:  # new settings: sent again
            self._settings = (current, uuid.uuid4().hex, ray.put(current.serialize() if current else {}))
        return self._settings[1], self._settings[2]

    def _sent_once(self) -> SettingsContext:
        """The current settings, as a context that `serialize_context` leaves out."""
        current = SettingsContext.get()
        if self._stand_in is None or self._stand_in[0] is not current:
            stand_in = _SentOnce.model_construct(
                profile=current.profile if current else None, settings=current.settings if current else None
            )
            self._stand_in = (current, stand_in)
        return self._stand_in[1]

    def _remote_function(self) -> Any:
        """The Ray remote function for the current remote options, made once per options."""
        import ray

        options = RemoteOptionsContext.get().current_remote_options or {}
        key = repr(sorted(options.items()))
        if key not in self._remote_functions:
            function: Any = _run_task
            self._remote_functions[key] = ray.remote(**options)(function) if options else ray.remote(function)
        return self._remote_functions[key]


class _SentOnce(SettingsContext):
    """The flow run's settings while a task's context is serialized: they are sent apart."""

    def serialize(self, include_secrets: bool = True) -> dict[str, Any]:
        return {}


#: In a Ray worker: the flow run's settings context, and the API client, by settings key.
_WORKER_SETTINGS: dict[str, SettingsContext] = {}
_WORKER_CLIENT: list[tuple[str, SyncClientContext]] = []


def _run_task(*upstream_refs: Any, settings_key: str, settings: dict[str, Any], **run: Any) -> Any:
    """Run one Prefect task run in a Ray worker, under the flow run's settings."""
    if settings and settings_key not in _WORKER_SETTINGS:
        _WORKER_SETTINGS[settings_key] = SettingsContext(**settings)
    context = _WORKER_SETTINGS.get(settings_key)
    with context if context is not None else contextlib.nullcontext():
        _keep_client(settings_key)
        return RayTaskRunner._run_prefect_task(*upstream_refs, **run)


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
