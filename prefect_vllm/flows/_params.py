"""Flow parameters: blocks named by the UI or the API, and dated paths for schedules."""

from __future__ import annotations

import datetime as dt
from typing import TypeVar, cast

from prefect.blocks.core import Block

from prefect_vllm.blocks import VllmModel
from prefect_vllm.exceptions import ConfigurationError
from prefect_vllm.flows._resolve import MODEL_BLOCK_PREFIX

B = TypeVar("B", bound=Block)


def load_block(kind: type[B], value: B | str | None, parameter: str) -> B | None:
    """The block a parameter gives, loading it when the parameter names a saved one.

    Raises:
        ConfigurationError: No block of that type has that name; names the parameter.
    """
    if value is None or isinstance(value, kind):
        return value
    try:
        return cast(B, kind.load(str(value)))
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"{parameter}: no {kind.get_block_type_name()} block named {value!r} ({str(exc)[:200]}); "
            f"create it in the Prefect UI (Blocks) or with {kind.__name__}(...).save({str(value)!r})"
        ) from None


def model_block(model: VllmModel | str) -> VllmModel | None:
    """The `VllmModel` block that `model` gives or names (`vllm-model/NAME`), if any."""
    if isinstance(model, VllmModel):
        return model
    if model.startswith(MODEL_BLOCK_PREFIX):
        return load_block(VllmModel, model[len(MODEL_BLOCK_PREFIX) :], "model")
    return None


def render_dated(path: str, when: dt.datetime) -> str:
    """A path with `{date}` and `{yesterday}` filled in (`YYYY-MM-DD`), for scheduled jobs.

    A nightly deployment takes `input="/data/prompts/{yesterday}/"`: each run reads the
    folder of the day before its scheduled start, and a late or retried run still
    reads the day it was scheduled for.

    Raises:
        ConfigurationError: Another `{...}` field is in the path.
    """
    if "{" not in path:
        return path
    day = when.date()
    try:
        return path.format(date=day.isoformat(), yesterday=(day - dt.timedelta(days=1)).isoformat())
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigurationError(
            f"{path!r}: only {{date}} and {{yesterday}} can be filled in a path ({exc!r})"
        ) from None


def scheduled_time() -> dt.datetime:
    """When this flow run was scheduled to start (now, outside a scheduled run)."""
    from prefect.runtime import flow_run

    when = flow_run.scheduled_start_time
    return when if isinstance(when, dt.datetime) else dt.datetime.now(dt.timezone.utc)
