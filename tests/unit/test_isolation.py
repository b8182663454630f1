"""Poison isolation logic, with a fake engine that dies whenever it meets a poison row."""

from __future__ import annotations

from typing import Any

import pytest

from prefect_vllm._columns import ERROR, TEXT
from prefect_vllm._engine.isolation import ROW_COLUMNS, generate_isolating
from prefect_vllm._engine.protocol import GenerateResult
from prefect_vllm.exceptions import EngineCrashedError


class FakeEngine:
    """Generates `text-<i>` per row; dies on calls holding a poison row, or on cue."""

    def __init__(self, poison: set[int], *, unlucky_calls: set[int] | None = None) -> None:
        self.poison = poison
        self.unlucky_calls = unlucky_calls or set()
        self.calls: list[tuple[int, int, bool]] = []

    def __call__(self, start: int, stop: int, exclusive: bool) -> GenerateResult:
        self.calls.append((start, stop, exclusive))
        if len(self.calls) in self.unlucky_calls or self.poison & set(range(start, stop)):
            raise EngineCrashedError("engine died", actor_index=0)
        out: dict[str, Any] = {name: [None] * (stop - start) for name in ROW_COLUMNS}
        out[TEXT] = [f"text-{i}" for i in range(start, stop)]
        return GenerateResult(columns=out, pid=42, seconds=0.0)


@pytest.mark.parametrize("poison", [set(), {0}, {63}, {5, 11}, {0, 1, 2, 3}, set(range(64))])
@pytest.mark.parametrize("poison_after", [1, 2])
def test_every_row_is_generated_or_poisoned_and_only_poison_rows_fail(
    poison: set[int], poison_after: int
) -> None:
    engine = FakeEngine(poison)
    columns, report = generate_isolating(engine, 64, poison_after=poison_after, single_rows_at=8)
    assert sorted(report.poisoned) == sorted(poison)
    for i in range(64):
        if i in poison:
            assert columns[TEXT][i] is None
            assert "engine died while generating this row" in columns[ERROR][i]
        else:
            assert columns[TEXT][i] == f"text-{i}"
            assert columns[ERROR][i] is None
    assert report.deaths == len(engine.calls) - sum(
        1 for c in engine.calls if not poison & set(range(*c[:2]))
    )


def test_one_poison_row_costs_about_log2_of_the_shard_in_deaths() -> None:
    engine = FakeEngine({100})
    _, report = generate_isolating(engine, 512, poison_after=2)
    # shared, alone with 512 rows, alone with 256..2 rows (8), the lone row twice
    assert report.deaths == 1 + 1 + 8 + 2


def test_small_groups_go_row_by_row_so_each_death_names_its_row() -> None:
    engine = FakeEngine({100})
    _, report = generate_isolating(engine, 512, poison_after=2, single_rows_at=32)
    # shared, alone with 512..64 rows (4), 32 rows alone, the lone row twice
    assert report.deaths == 1 + 4 + 1 + 2
    assert report.poisoned == [100]


def test_a_death_while_sharing_the_engine_retries_the_rows_alone_before_splitting() -> None:
    engine = FakeEngine(set(), unlucky_calls={1})
    columns, report = generate_isolating(engine, 16, poison_after=2)
    assert engine.calls == [(0, 16, False), (0, 16, True)]
    assert report.deaths == 1 and report.poisoned == []
    assert columns[TEXT] == [f"text-{i}" for i in range(16)]


def test_one_unlucky_death_of_a_lone_row_does_not_condemn_it() -> None:
    engine = FakeEngine(set(), unlucky_calls={1, 2})
    columns, report = generate_isolating(engine, 1, poison_after=2)
    assert report.poisoned == [] and columns[TEXT] == ["text-0"]


def test_isolation_logs_one_line_per_death() -> None:
    lines: list[str] = []
    _, report = generate_isolating(FakeEngine({3}), 8, poison_after=1, log=lines.append)
    assert len(lines) == report.deaths
    assert "alone" in lines[0] and "poison row" in lines[-1]


def test_an_empty_shard_makes_no_call() -> None:
    engine = FakeEngine(set())
    columns, report = generate_isolating(engine, 0, poison_after=2)
    assert engine.calls == [] and columns[TEXT] == [] and report.calls == 0
