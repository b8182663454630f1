"""Rows that kill every engine they meet are isolated, committed as row errors, and the job ends."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from prefect_vllm.testing import POISON_ENGINE_ARGS, POISON_MARKER, POISON_RAISE_MARKER, write_sample_prompts
from tests.helpers import (
    events_named,
    input_ids,
    no_engine_left,
    read_output,
    run_cli,
    summary_of,
    wait_for_job_events,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

#: Rows 5 and 11 share shard 0, row 40 is in shard 1 (shards of 32 rows).
POISON_ROWS = (5, 11, 40)


def poisoned_prompts(path: Path, n: int, marker: str = POISON_MARKER) -> set[str]:
    """A prompt file whose POISON_ROWS carry the marker; returns their custom ids."""
    write_sample_prompts(path, n=n)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i in POISON_ROWS:
        records[i]["prompt"] = f"Tell me about {marker} number {i}."
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {records[i]["custom_id"] for i in POISON_ROWS}


def test_poison_rows_become_row_errors_and_every_other_row_is_generated(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    poison = poisoned_prompts(prompts, 192)
    out = tmp_path / "out"
    done = run_cli(
        ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--actors", "2",
         "--shard-size", "32", "--max-tokens", "8", "--temperature", "0", "--poison-after", "1",
         "--engine-args", json.dumps(POISON_ENGINE_ARGS), "--json"],
        tmp_path / "home",
        api_url=prefect_server,
        timeout=1500,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    summary = summary_of(done)
    assert set(summary["poisoned_rows"]) == poison
    assert summary["rows_failed"] == 3 and summary["rows_ok"] == 189
    # Shard 0: one death sharing the engine, one alone with its 32 rows, then one
    # per poison row run alone (poison_after=1): 4. Shard 1: 3. Shards sharing an
    # engine with them die along, which adds no restart. One spare for a lost race.
    assert summary["engine_restarts"] <= 8, summary
    assert summary["engine_deaths_by_cause"] == {"killed by SIGKILL": summary["engine_restarts"]}
    assert set(summary["engine_deaths_by_shard"]) >= {"000000", "000001"}
    table = read_output(out)
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    rows = table.to_pylist()
    failed = {r["custom_id"]: r["error"] for r in rows if r["error"] is not None}
    assert set(failed) == poison
    assert all("engine died while generating this row" in e for e in failed.values())
    assert all(r["text"] for r in rows if r["custom_id"] not in poison)
    assert "committing it as a poison row" in done.stderr
    # What automations see: the server holds the run's events.
    events = wait_for_job_events(prefect_server, summary["job_id"], "prefect-vllm.job.completed")
    assert len(events_named(events, "job.started")) == 1
    committed = events_named(events, "shard.committed")
    assert sorted(e["payload"]["shard_id"] for e in committed) == [f"{i:06d}" for i in range(6)]
    assert sum(e["payload"]["rows_failed"] for e in committed) == 3
    poisoned = events_named(events, "row.poisoned")
    assert sorted(e["payload"]["custom_id"] for e in poisoned) == sorted(poison)
    assert len(events_named(events, "engine.died")) == summary["engine_restarts"]
    (completed,) = events_named(events, "job.completed")
    assert (completed["payload"]["rows_ok"], completed["payload"]["rows_failed"]) == (189, 3)
    assert completed["payload"]["poisoned_rows"] == 3 and completed["payload"]["shards_run"] == 6
    roles = {r["prefect.resource.role"] for r in completed["related"]}
    assert {"model", "output", "flow-run"} <= roles, completed["related"]
    assert "Tell me about" not in json.dumps(events), "prompt text in an event"
    no_engine_left()


def test_a_run_restart_budget_stops_a_crash_loop_with_exit_1(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    """With a job budget of one restart, isolation cannot finish: the run stops, it never loops.

    Here the poison rows make the engine raise, and the summary names the error.
    """
    prompts = tmp_path / "prompts.jsonl"
    poisoned_prompts(prompts, 64, marker=POISON_RAISE_MARKER)
    out = tmp_path / "out"
    done = run_cli(
        ["run", str(prompts), "--output", str(out), "--model", str(tiny_model),
         "--shard-size", "32", "--max-tokens", "8", "--temperature", "0", "--max-job-restarts", "1",
         "--engine-args", json.dumps(POISON_ENGINE_ARGS), "--json"],
        tmp_path / "home",
        api_url=prefect_server,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-4000:]
    assert "max_job_restarts=1" in done.stderr
    summary = summary_of(done)
    assert summary["shards_incomplete"] and summary["engine_restarts"] <= 3
    raised = f"crashed: RuntimeError: poison row: {POISON_RAISE_MARKER} reached the engine"
    assert summary["engine_deaths_by_cause"] == {raised: summary["engine_restarts"]}
    assert raised in done.stderr, "the flow's log names the cause too"
    no_engine_left()
