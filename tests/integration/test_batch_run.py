"""End to end with real Prefect, Ray and vLLM: the command line and the Python API."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from prefect_vllm._columns import OUTPUT_COLUMNS
from prefect_vllm.testing import write_sample_prompts
from tests.helpers import SharedPool, input_ids, no_engine_left, read_output, run_cli, summary_of

pytestmark = pytest.mark.integration


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
    summary = summary_of(proc)
    assert summary["shards_total"] == 3 and summary["shards_run"] == 3 and summary["shards_skipped"] == 0
    assert summary["rows_ok"] == 150 and summary["rows_failed"] == 0
    assert summary["output_tokens"] == 150 * 8 or summary["output_tokens"] > 0
    timings = summary["timings"]  # the fixed costs the throughput benchmark reports
    assert set(timings) == {"prefect_server_start_s", "plan_s", "ray_start_s", "engine_start_s", "finalise_s"}
    assert all(v >= 0 for v in timings.values()) and timings["engine_start_s"] > 1
    assert (
        sum(timings.values()) + summary["generation_s"]
        <= summary["wall_s"] + timings["prefect_server_start_s"] + 1
    )
    table = read_output(out)
    assert tuple(table.column_names) == OUTPUT_COLUMNS
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    assert all(t for t in table.column("text").to_pylist())
    assert set(table.column("finish_reason").to_pylist()) <= {"length", "stop"}
    assert all(0 < n <= 8 for n in table.column("completion_tokens").to_pylist())
    assert table.column("error").null_count == len(table)
    no_engine_left()

    status = run_cli(["status", str(out), "--json"], tmp_path / "home", timeout=120)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout.splitlines()[-1]) | {"pending": []} == {
        "job_id": summary["job_id"], "shards_total": 3, "shards_done": 3, "shards_pending": 0,
        "rows_total": 150, "rows_ok": 150, "rows_failed": 0, "pending": [],
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
    """One prompt longer than the context is a row error; the engine is not restarted."""
    from prefect_vllm.config import SamplingConfig
    from prefect_vllm.flows import batch_inference

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"custom_id": f"ok-{i}", "prompt": f"Tell me about cat {i}."} for i in range(40)]
    rows.insert(17, {"custom_id": "too-long", "prompt": "cat dog bird " * 2000})
    rows.insert(5, {"custom_id": "empty", "prompt": ""})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = batch_inference(
        input=str(prompts),
        output=str(tmp_path / "out"),
        model=str(tiny_model),
        shard_size=16,
        sampling=SamplingConfig(max_tokens=8, temperature=0.7, seed=3),
        **shared_pool.kwargs(),
    )
    assert (result.rows_ok, result.rows_failed, result.engine_restarts) == (40, 2, 0)
    table = read_output(tmp_path / "out").to_pylist()
    errors = {r["custom_id"]: r["error"] for r in table if r["error"]}
    assert set(errors) == {"too-long", "empty"}
    assert "maximum context length is 1024" in errors["too-long"] and "cat dog" not in errors["too-long"]
    assert errors["empty"] == "prompt is empty"
    assert all(r["text"] is not None and r["finish_reason"] for r in table if not r["error"])
    no_engine_left(besides=shared_pool.engines)
