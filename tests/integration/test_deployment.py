"""The flow as a deployment on a real Prefect server: served by a process, triggered through
the API as the UI does, with artifacts, bad parameters and two triggers of one job."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from prefect_vllm.testing import write_sample_prompts
from tests.helpers import (
    REPO,
    SharedPool,
    engine_processes,
    input_ids,
    markers,
    no_engine_left,
    read_output,
    run_cli,
    wait_for,
)

pytestmark = pytest.mark.integration

DEPLOYMENT = "batch-inference/it"


async def _deployment_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        try:
            await client.read_deployment_by_name(name)
        except Exception:
            return False
        return True


async def _flow_run(run_id: UUID) -> Any:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_run(run_id)


async def _artifacts(run_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )


def trigger(parameters: dict[str, Any]) -> UUID:
    """Create a flow run of the deployment, as the UI's Run button does, without waiting."""
    from prefect.deployments import run_deployment

    return run_deployment(DEPLOYMENT, parameters=parameters, timeout=0).id


def final_states(run_ids: list[UUID], timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        runs = [asyncio.run(_flow_run(r)) for r in run_ids]
        if all(r.state is not None and r.state.is_final() for r in runs):
            return [r.state for r in runs]
        assert time.monotonic() < deadline, [r.state for r in runs]
        time.sleep(1)


@pytest.fixture
def served(tmp_path: Path, prefect_server: str) -> Any:
    """`examples/serve.py` in its own process, serving the deployment to the test's server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "examples/serve.py", "--name", "it", "--limit", "4"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: asyncio.run(_deployment_exists(DEPLOYMENT)) or proc.poll() is not None,
            180,
            "the deployment",
        )
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_two_triggers_of_one_job_run_it_once_and_the_run_page_has_our_artifacts(
    tmp_path: Path, tiny_model: Path, served: Any
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=96)
    params = {
        "input": str(prompts), "output": str(tmp_path / "out"), "model": str(tiny_model),
        "shard_size": 32, "sampling": {"max_tokens": 8, "temperature": 0},
    }  # fmt: skip
    runs = [trigger(params), trigger(params)]
    states = final_states(runs, timeout=900)
    completed = [i for i, s in enumerate(states) if s.is_completed()]
    assert len(completed) == 1, [(s.type, s.message) for s in states]
    refused = states[1 - completed[0]]
    assert refused.is_failed() and "is already running" in (refused.message or ""), refused.message
    table = read_output(tmp_path / "out")
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))

    artifacts = {a.key: a for a in asyncio.run(_artifacts(runs[completed[0]]))}
    by_kind = {key.rsplit("-", 1)[-1]: a for key, a in artifacts.items() if key}
    assert set(by_kind) >= {"progress", "shards", "summary"}, list(artifacts)
    assert float(by_kind["progress"].data) == 100.0
    assert "96 (96 ok, 0 row errors)" in by_kind["summary"].data
    assert str(tmp_path / "out") in by_kind["summary"].data
    assert by_kind["shards"].type == "table"

    # The UI's Retry on the refused run: the same job, now committed, completes at once.
    refused_id = runs[1 - completed[0]]
    asyncio.run(_retry(refused_id))
    (retried,) = final_states([refused_id], timeout=300)
    assert retried.is_completed(), retried.message
    retry_artifacts = {a.key for a in asyncio.run(_artifacts(refused_id)) if a.key}
    assert any(k.endswith("-summary") for k in retry_artifacts), retry_artifacts
    no_engine_left()


async def _retry(run_id: UUID) -> None:
    """What the UI's Retry button does: schedule the finished run again, `AwaitingRetry`."""
    from prefect.client.orchestration import get_client
    from prefect.states import AwaitingRetry

    async with get_client() as client:
        result = await client.set_flow_run_state(run_id, AwaitingRetry(), force=True)
        assert result.status.value == "ACCEPT", result


def test_bad_parameters_fail_the_run_at_once_naming_the_parameter(
    tmp_path: Path, tiny_model: Path, served: Any
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=4)
    base = {"input": str(prompts), "output": str(tmp_path / "out"), "model": str(tiny_model)}
    with pytest.raises(Exception, match="shard_size") as refused:
        trigger({**base, "shard_size": -1})
    assert "less than the minimum of 1" in str(refused.value), "refused by the server, before any run"
    started = time.monotonic()
    runs = [
        trigger({**base, "cluster": "no-such-cluster"}),
        trigger({**base, "input": str(tmp_path / "missing" / "prompts.jsonl")}),
        trigger({**base, "storage": "no-such-storage"}),
    ]
    states = final_states(runs, timeout=300)
    messages = [s.message or "" for s in states]
    assert all(s.is_failed() for s in states), messages
    assert "cluster: no vLLM Ray Cluster block named 'no-such-cluster'" in messages[0]
    assert f"input: {tmp_path}/missing/prompts.jsonl is no file" in messages[1], "the parameter is named"
    assert "storage: no vLLM Checkpoint Storage block named 'no-such-storage'" in messages[2]
    assert time.monotonic() - started < 240, "bad parameters must fail before any engine starts"
    assert not list((tmp_path / "out").glob("part-*"))


def deploy_from_prefect_yaml(name: str) -> dict[str, str]:
    """`prefect deploy --name NAME` from the project's prefect.yaml into the session's
    server, its `batch` work pool made first; the environment it ran with."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    async def make_pool() -> None:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="batch", type="process"), overwrite=True)

    asyncio.run(make_pool())
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_VLLM_REPO": str(REPO)}
    deployed = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", name],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    return env


def test_prefect_yaml_registers_the_nightly_schedule_and_dated_parameters(prefect_server: str) -> None:
    """`prefect deploy` from the project's prefect.yaml, checked through the API; no clock waits."""
    from prefect.client.orchestration import get_client

    deploy_from_prefect_yaml("nightly")

    async def read() -> Any:
        async with get_client() as client:
            return await client.read_deployment_by_name("batch-inference/nightly")

    deployment = asyncio.run(read())
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]  # type: ignore[union-attr]
    assert deployment.parameters["input"] == "/data/prompts/{yesterday}"
    assert deployment.parameters["model"] == "vllm-model/llama"
    assert deployment.work_pool_name == "batch" and deployment.global_concurrency_limit is not None
    assert deployment.global_concurrency_limit.limit == 1
    schema = deployment.parameter_openapi_schema["properties"]
    assert schema["shard_size"]["minimum"] == 1 and "unit of commit" in schema["shard_size"]["description"]
    assert set(schema) >= {"input", "output", "model", "sampling", "cluster", "storage", "export"}


def test_a_prefect_worker_runs_the_prefect_yaml_deployment_end_to_end(
    tmp_path: Path, tiny_model: Path, prefect_server: str, shared_pool: SharedPool
) -> None:
    """`prefect deploy` of the on-demand deployment, a real `prefect worker` picks the run
    up and runs it in its own process: completed, output exact, artifacts on the run."""
    from prefect.deployments import run_deployment

    env = deploy_from_prefect_yaml("on-demand")
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "batch", "--limit", "1"],
            # The worker asks for runs every second, not Prefect's default ten.
            env={**env, "PYTHONUNBUFFERED": "1", "PREFECT_WORKER_QUERY_SECONDS": "1"}, stdout=log,
            stderr=subprocess.STDOUT, cwd=tmp_path,
            start_new_session=True,
        )  # fmt: skip
    try:
        prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=60, seed=3)
        out = tmp_path / "out"
        parameters = {
            "input": str(prompts), "output": str(out), "model": str(tiny_model), "shard_size": 20,
            "sampling": {"max_tokens": 4, "temperature": 0.0}, **shared_pool.kwargs(),
        }  # fmt: skip
        run_id = run_deployment("batch-inference/on-demand", parameters=parameters, timeout=0).id
        (state,) = final_states([run_id], 600)
        assert state.is_completed(), (state, log_path.read_text()[-4000:])
        assert "Worker '" in log_path.read_text() and str(run_id) in log_path.read_text()
        run = asyncio.run(_flow_run(run_id))
        assert run.work_pool_name == "batch" and run.infrastructure_pid, run
        assert Counter(read_output(out).column("custom_id").to_pylist()) == Counter(input_ids(prompts))
        keys = {a.key for a in asyncio.run(_artifacts(run_id))}
        assert any(k and k.endswith("-summary") for k in keys) and any(
            k and k.endswith("-shards") for k in keys
        ), keys
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
    no_engine_left(besides=shared_pool.engines)


def test_a_run_cancelled_from_the_api_stops_within_seconds_and_the_next_run_resumes_exactly(
    tmp_path: Path, tiny_model: Path, served: Any, prefect_server: str
) -> None:
    # 90 shards: enough that the cancellation lands mid-run (30 were all committed before it did).
    shards = 90
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=16 * shards, seed=31)
    out = tmp_path / "out"
    params = {
        "input": str(prompts), "output": str(out), "model": str(tiny_model), "shard_size": 16,
        "sampling": {"max_tokens": 48, "temperature": 0.0, "ignore_eos": True},
    }  # fmt: skip
    first = trigger(params)
    wait_for(lambda: len(markers(out)) >= 2, 600, "two committed shards")
    cancelled_at = time.monotonic()
    # `prefect-vllm cancel` sets the deployment's run Cancelling through the API, as the UI does.
    cancel = run_cli(["cancel", str(out)], tmp_path / "home", api_url=prefect_server, timeout=120)
    assert cancel.returncode == 0 and "cancelled its flow run" in cancel.stderr, cancel
    assert "stopped in" in cancel.stdout
    (state,) = final_states([first], timeout=120)
    took = time.monotonic() - cancelled_at
    assert state.is_cancelled(), state
    assert took < 30, f"the run took {took:.0f} s to stop"
    wait_for(lambda: not engine_processes(), 30, "the cancelled run's engines to exit")
    committed = len(markers(out))
    assert 2 <= committed < shards, committed

    second = trigger(params)
    (state,) = final_states([second], timeout=600)
    assert state.is_completed(), state.message
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["shards_skipped"], summary["shards_run"]) == (committed, shards - committed)
    assert Counter(read_output(out).column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    no_engine_left()
