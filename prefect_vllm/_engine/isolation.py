"""Poison isolation: retry rows whose engine died, alone, then split, down to single rows.

Ray's own answer to a crashing engine is to restart it and retry the call, forever:
a row that kills every engine it meets turns that into a crash loop. Here a call
whose engine died is retried with its rows alone on the engine (a death while
sharing the engine may be another call's doing); rows that kill the engine while
alone are split in halves, and small groups into single rows; a single row that kills it
`poison_after` times is committed as a row error and the rest of the shard goes on.
Each step halves a segment or counts toward a row's limit, so it always ends.

Pure logic: the engine is behind `call`, so this is tested with fakes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from prefect_vllm._columns import ERROR
from prefect_vllm._engine.protocol import GenerateResult
from prefect_vllm._job_tasks import job_task
from prefect_vllm.exceptions import EngineCrashedError

#: A generation call's columns: the default of `generate_isolating`.
ROW_COLUMNS = job_task("generate").row_columns

__all__ = ["ROW_COLUMNS", "EngineCall", "IsolationReport", "generate_isolating", "poison_message"]

#: `call(start, stop, exclusive)` generates rows [start, stop).
EngineCall = Callable[[int, int, bool], GenerateResult]


@dataclass(frozen=True)
class _Segment:
    start: int
    stop: int
    exclusive: bool
    alone_deaths: int = 0


@dataclass
class IsolationReport:
    """What it took to generate one shard.

    Attributes:
        deaths: Engine deaths (hangs included) while the shard's rows were in flight.
        calls: Engine calls made.
        poisoned: Row positions committed as "engine died" row errors.
        pid: The process id of the actor that generated the last rows.
    """

    deaths: int = 0
    calls: int = 0
    poisoned: list[int] = field(default_factory=list)
    pid: int = 0


def poison_message(deaths: int) -> str:
    """The row error of a row that killed the engine whenever it ran alone."""
    return (
        f"engine died while generating this row: it killed the engine {deaths} times "
        "while running alone, so it was set aside as a poison row"
    )


def generate_isolating(
    call: EngineCall,
    rows: int,
    *,
    poison_after: int,
    single_rows_at: int = 1,
    log: Callable[[str], None] = lambda _message: None,
    row_columns: tuple[str, ...] = ROW_COLUMNS,
) -> tuple[dict[str, list[Any]], IsolationReport]:
    """Generate rows [0, rows) through `call`, isolating rows that kill the engine.

    Args:
        call: Generates a range of rows; raises `EngineCrashedError` when the engine
            died or hung during the call.
        rows: How many rows.
        poison_after: Deaths a single row must cause while alone to be set aside.
        single_rows_at: Rows that killed an engine alone are split in halves while
            more than this many, then retried one row per call (each death then
            names its row, at the cost of unbatched generation).
        log: Receives one line per death and what is done about it.
        row_columns: The columns each call returns (its task's `row_columns`).

    Returns:
        The rows' columns (`row_columns`, in row order) and the report.
    """
    columns: dict[str, list[Any]] = {name: [None] * rows for name in row_columns}
    report = IsolationReport()
    stack = [_Segment(0, rows, exclusive=False)] if rows else []
    while stack:
        segment = stack.pop()
        report.calls += 1
        try:
            out = call(segment.start, segment.stop, segment.exclusive)
        except EngineCrashedError as exc:
            report.deaths += 1
            stack.extend(
                reversed(_after_death(segment, exc, poison_after, single_rows_at, columns, report, log))
            )
            continue
        for name in row_columns:
            columns[name][segment.start : segment.stop] = out.columns[name]
        report.pid = out.pid
    return columns, report


def _after_death(
    segment: _Segment,
    exc: EngineCrashedError,
    poison_after: int,
    single_rows_at: int,
    columns: dict[str, list[Any]],
    report: IsolationReport,
    log: Callable[[str], None],
) -> list[_Segment]:
    """The segments to run next, in order, after `segment`'s engine died."""
    size = segment.stop - segment.start
    what = "hung" if exc.hung else "died"
    where = f"rows {segment.start}-{segment.stop - 1}" if size > 1 else f"row {segment.start}"
    if not segment.exclusive:
        log(f"engine {what} with {where} in flight (death {report.deaths}); retrying them alone")
        return [replace(segment, exclusive=True)]
    if size > single_rows_at:
        middle = segment.start + size // 2
        log(f"engine {what} with {where} alone (death {report.deaths}); splitting them in halves")
        return [
            _Segment(segment.start, middle, exclusive=True),
            _Segment(middle, segment.stop, exclusive=True),
        ]
    if size > 1:
        log(f"engine {what} with {where} alone (death {report.deaths}); retrying them one by one")
        return [_Segment(i, i + 1, exclusive=True) for i in range(segment.start, segment.stop)]
    deaths = segment.alone_deaths + 1
    if deaths < poison_after:
        log(f"engine {what} with {where} alone ({deaths} of {poison_after}); retrying it")
        return [replace(segment, alone_deaths=deaths)]
    log(f"engine {what} with {where} alone {deaths} times; committing it as a poison row")
    columns[ERROR][segment.start] = poison_message(deaths)
    report.poisoned.append(segment.start)
    return []
