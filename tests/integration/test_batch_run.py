"""End to end with real Prefect, Ray and vLLM: the command line and the Python API."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prefect import flow

from prefect_vllm._job_tasks import job_task
from prefect_vllm.flows._events import asset_key
from prefect_vllm.testing import write_sample_prompts
from tests.helpers import (
    SharedPool,
    events_named,
    finish,
    input_ids,
    markers,
    no_engine_left,
    read_output,
    readme_trigger,
    resource_events,
    run_cli,
    start_cli,
    summary_of,
    wait_for,
    wait_for_job_events,
)

pytestmark = pytest.mark.integration


@flow(name="build-index")
def build_index(output: str) -> None:
    """The README's downstream flow; here it is only triggered, never run."""


def test_cli_run_generates_every_row_against_one_local_prefect_server(
    tmp_path: Path, tiny_model: Path
) -> None:
    """No PREFECT_API_URL: the command starts one server that every Ray worker reaches."""
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=150)
    out = tmp_path / "out"
    args = ["run", str(prompts), "--output", str(out), "--model", str(tiny_model)]
    proc = run_cli(
        [*args, "--shard-size", "64", "--max-tokens", "8", "--temperature", "0", "--json"], tmp_path / "home"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "database is locked" not in proc.stderr
    # A quiet, honest terminal: stdout is the summary alone, stderr our own lines.
    assert json.loads(proc.stdout)["rows_ok"] == 150, "stdout holds more than the JSON summary"
    assert "Initializing a V1 LLM engine" not in proc.stderr, "vLLM's config dump"
    assert "Ray deduplicates logs" not in proc.stderr and "repeated" not in proc.stderr
    assert "Passing raw prompts" not in proc.stderr and "LD_PRELOAD" not in proc.stderr
    assert "\x1b[" not in proc.stderr, "colour codes in a log file"
    assert "Beginning flow run" not in proc.stderr, "Prefect's own progress lines"
    summary = summary_of(proc)
    assert summary["shards_total"] == 3 and summary["shards_run"] == 3 and summary["shards_skipped"] == 0
    assert summary["rows_ok"] == 150 and summary["rows_failed"] == 0
    assert summary["output_tokens"] == 150 * 8 or summary["output_tokens"] > 0
    timings = summary["timings"]  # the fixed costs the throughput benchmark reports
    assert set(timings) == {"prefect_server_start_s", "plan_s", "ray_start_s", "engine_start_s", "finalise_s"}
    assert all(v >= 0 for v in timings.values()) and timings["engine_start_s"] > 1
    # The flow's own phases fit in its wall time; Ray and the engine started beside the
    # server (before the flow), so theirs overlap the server's and end within the flow.
    assert timings["plan_s"] + summary["generation_s"] + timings["finalise_s"] <= summary["wall_s"] + 1
    assert (
        timings["ray_start_s"] + timings["engine_start_s"]
        <= timings["prefect_server_start_s"] + summary["wall_s"] + 1
    )
    assert f"ready {timings['engine_start_s']:.1f} s after their actors were created" in proc.stderr, (
        "the log and the summary disagree on the engine start"
    )
    table = read_output(out)
    assert tuple(table.column_names) == job_task("generate").output_columns
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    assert all(t for t in table.column("text").to_pylist())
    assert set(table.column("finish_reason").to_pylist()) <= {"length", "stop"}
    assert all(0 < n <= 8 for n in table.column("completion_tokens").to_pylist())
    assert table.column("error").null_count == len(table)
    no_engine_left()

    status = run_cli(["status", str(out), "--json"], tmp_path / "home", timeout=120)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout.splitlines()[-1]) | {"pending": []} == {
        "job_id": summary["job_id"], "output": str(out), "shards_total": 3, "shards_done": 3,
        "shards_pending": 0, "rows_total": 150, "rows_ok": 150, "rows_failed": 0, "pending": [], "damaged": {},
    }  # fmt: skip

    again = run_cli(
        [*args, "--shard-size", "64", "--max-tokens", "8", "--temperature", "0", "--json"], tmp_path / "home"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = summary_of(again)
    assert (rerun["shards_skipped"], rerun["shards_run"], rerun["job_id"]) == (3, 0, summary["job_id"])
    assert "Creating a local Ray instance" not in again.stderr, "a finished job must start nothing"
    assert "Starting temporary server" not in again.stderr, "nor a Prefect server"


def test_python_api_turns_an_overlong_prompt_into_a_row_error(
    tmp_path: Path, tiny_model: Path, prefect_server: str, shared_pool: SharedPool
) -> None:
    """One prompt longer than the context is a row error; the engine is not restarted.
    A prompt may be token ids; too many of them, or a list that is not ids, is a row error too."""
    from prefect_vllm.config import SamplingConfig
    from prefect_vllm.flows import batch_inference

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"custom_id": f"ok-{i}", "prompt": f"Tell me about cat {i}."} for i in range(40)]
    rows.insert(17, {"custom_id": "too-long", "prompt": "cat dog bird " * 2000})
    rows.insert(5, {"custom_id": "empty", "prompt": ""})
    rows += [
        {"custom_id": "token-ids", "prompt": [1, 20, 30, 40]},
        {"custom_id": "too-many-ids", "prompt": [5] * 2000},
        {"custom_id": "not-ids", "prompt": [1, "x"]},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = batch_inference(
        input=str(prompts),
        output=str(tmp_path / "out"),
        model=str(tiny_model),
        shard_size=16,
        sampling=SamplingConfig(max_tokens=8, temperature=0.7, seed=3),
        **shared_pool.kwargs(),
    )
    assert (result.rows_ok, result.rows_failed, result.engine_restarts) == (41, 4, 0)
    table = read_output(tmp_path / "out").to_pylist()
    errors = {r["custom_id"]: r["error"] for r in table if r["error"]}
    assert set(errors) == {"too-long", "empty", "too-many-ids", "not-ids"}
    assert "maximum context length is 1024" in errors["too-many-ids"]
    assert errors["not-ids"] == "prompt[1]: a token id must be an integer >= 0, got 'x'"
    assert next(r for r in table if r["custom_id"] == "token-ids")["prompt_tokens"] == 4
    assert "maximum context length is 1024" in errors["too-long"] and "cat dog" not in errors["too-long"]
    assert errors["empty"] == "prompt is empty"
    assert all(r["text"] is not None and r["finish_reason"] for r in table if not r["error"])
    no_engine_left(besides=shared_pool.engines)


def test_two_runs_of_one_job_started_together_write_it_once_and_the_second_is_refused(
    tmp_path: Path, tiny_model: Path, prefect_server: str, shared_pool: SharedPool
) -> None:
    """Both pass the early look (nobody holds the job yet); the job lock lets one write."""
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=600, seed=11)
    out = tmp_path / "out"
    args = greedy_run(prompts, out, tiny_model, shared_pool, shard_size=50, max_tokens=16)
    logs = [tmp_path / f"run-{i}.log" for i in range(2)]
    procs = [
        start_cli(args, tmp_path / f"home-{i}", log, api_url=prefect_server) for i, log in enumerate(logs)
    ]
    done = [finish(proc, log) for proc, log in zip(procs, logs, strict=True)]
    assert sorted(d.returncode for d in done) == [0, 2], [d.stderr[-3000:] for d in done]
    ran, refused = sorted(done, key=lambda d: d.returncode)
    last = refused.stderr.strip().splitlines()[-1]
    assert "is already running" in last and "two runs never write one job at once" in last, last
    assert "Traceback" not in refused.stderr, refused.stderr[-3000:]
    summary = summary_of(ran)
    assert (summary["shards_run"], summary["shards_skipped"], summary["rows_ok"]) == (12, 0, 600)
    assert Counter(read_output(out).column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    assert not (out / "_lock.json").exists()
    events = wait_for_job_events(prefect_server, summary["job_id"], "prefect-vllm.job.completed")
    assert len(events_named(events, "shard.committed")) == 12
    (refusal,) = events_named(events, "job.refused")
    assert "is already running" in refusal["payload"]["reason"]
    # Lineage: the output is an asset this run materialized, from the input asset.
    output_asset = asset_key(summary["output"])
    (made,) = wait_for(
        lambda: resource_events(prefect_server, output_asset, "prefect.asset.materialization."),
        60, "the output asset's materialization", interval=1.0,
    )  # fmt: skip
    assert made["event"] == "prefect.asset.materialization.succeeded"
    assert {"prefect.resource.id": asset_key(str(prompts)), "prefect.resource.role": "asset"} in made[
        "related"
    ]
    assert (made["payload"]["job_id"], made["payload"]["rows"]) == (summary["job_id"], 600)
    no_engine_left(besides=shared_pool.engines)


def test_prefect_vllm_cancel_stops_a_command_run_in_seconds_and_the_same_command_resumes_it(
    tmp_path: Path, tiny_model: Path, prefect_server: str, shared_pool: SharedPool
) -> None:
    """A flow called directly (the command) gets SIGTERM: exit 143, resumable, lock freed."""
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=2000, seed=23)
    out = tmp_path / "out"
    args = [*greedy_run(prompts, out, tiny_model, shared_pool, shard_size=16, max_tokens=64), "--ignore-eos"]
    log = tmp_path / "run.log"
    proc = start_cli(args, tmp_path / "home", log, api_url=prefect_server)
    wait_for(lambda: len(markers(out)) >= 2 or proc.poll() is not None, 600, "two committed shards")
    cancelled_at = time.monotonic()
    cancel = run_cli(["cancel", str(out)], tmp_path / "home", api_url=prefect_server, timeout=120)
    assert cancel.returncode == 0, cancel.stderr[-3000:]
    assert "sent SIGTERM to its process" in cancel.stderr and "stopped in" in cancel.stdout, cancel
    stopped = finish(proc, log, timeout=60)
    took = time.monotonic() - cancelled_at
    assert stopped.returncode == 143 and took < 30, (stopped.returncode, took, stopped.stderr[-3000:])
    assert not (out / "_lock.json").exists()
    committed = len(markers(out))
    assert 2 <= committed < 125, committed
    again = run_cli(["cancel", str(out)], tmp_path / "home", api_url=prefect_server, timeout=120)
    assert again.returncode == 0 and "nothing to cancel" in again.stdout
    resumed = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = summary_of(resumed)
    assert (summary["shards_skipped"], summary["shards_run"]) == (committed, 125 - committed)
    assert Counter(read_output(out).column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    no_engine_left(besides=shared_pool.engines)


def test_the_readme_automation_starts_the_index_build_when_a_job_completes(
    tmp_path: Path, tiny_model: Path, prefect_server: str, shared_pool: SharedPool
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deployment_id = build_index.to_deployment(name="after-batch", triggers=[readme_trigger()]).apply()

    async def runs_for(output: str) -> list[Any]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
        return [r for r in runs if r.parameters.get("output") == output]

    try:
        prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=40, seed=5)
        args = greedy_run(prompts, tmp_path / "out", tiny_model, shared_pool, shard_size=20, max_tokens=4)
        done = run_cli(args, tmp_path / "home", api_url=prefect_server, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        output = summary_of(done)["output"]
        (run,) = wait_for(
            lambda: asyncio.run(runs_for(output)), 60, "the index build's flow run", interval=1.0
        )
        assert run.parameters == {"output": output}
    finally:

        async def remove() -> None:
            async with get_client() as client:
                await client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
                await client.delete_deployment(deployment_id)

        asyncio.run(remove())
    no_engine_left(besides=shared_pool.engines)


def test_a_deleted_and_a_truncated_committed_part_are_reported_and_generated_again(
    tmp_path: Path, tiny_model: Path, prefect_server: str, shared_pool: SharedPool
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=60, seed=12)
    out = tmp_path / "out"
    args = greedy_run(prompts, out, tiny_model, shared_pool, shard_size=10, max_tokens=8)
    first = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: read_output_part(p) for p in sorted(out.glob("part-*.parquet"))}
    deleted, truncated = sorted(before)[1], sorted(before)[4]
    (out / deleted).unlink()
    (out / truncated).write_bytes((out / truncated).read_bytes()[:100])

    status = run_cli(["status", str(out), "--verify", "--json"], tmp_path / "home", timeout=120)
    assert status.returncode == 1, status.stderr
    report = json.loads(status.stdout.splitlines()[-1])
    assert (report["shards_done"], report["shards_pending"], report["rows_ok"]) == (4, 2, 40)
    assert sorted(report["damaged"].values()) == sorted(
        [
            f"{deleted} is missing",
            f"{truncated} is 100 bytes, its commit marker says {len(before[truncated][1])}",
        ]
    )

    again = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = summary_of(again)
    assert (summary["shards_repaired"], summary["shards_run"], summary["shards_skipped"]) == (2, 2, 4)
    assert f"but {deleted} is missing: generating it again" in again.stderr
    after = {p.name: read_output_part(p) for p in sorted(out.glob("part-*.parquet"))}
    assert {name: rows for name, (rows, _) in after.items()} == {
        name: rows for name, (rows, _) in before.items()
    }
    assert Counter(read_output(out).column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    healthy = run_cli(["status", str(out), "--verify", "--json"], tmp_path / "home", timeout=120)
    assert healthy.returncode == 0 and json.loads(healthy.stdout.splitlines()[-1])["damaged"] == {}


def read_output_part(path: Path) -> tuple[list[tuple[str, str]], bytes]:
    """A part file's (custom_id, text) rows and its bytes."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    rows = list(zip(table.column("custom_id").to_pylist(), table.column("text").to_pylist(), strict=True))
    return rows, path.read_bytes()


def greedy_run(
    prompts: Path, out: Path, model: Path, pool: SharedPool, *, shard_size: int, max_tokens: int
) -> list[str]:
    """`prefect-vllm run` of a greedy job on the session's warm pool, with a JSON summary."""
    return ["run", str(prompts), "--output", str(out), "--model", str(model), "--shard-size", str(shard_size),
            "--max-tokens", str(max_tokens), "--temperature", "0", "--json", *pool.cli_args()]  # fmt: skip
