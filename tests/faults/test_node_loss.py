"""A multi-node Ray cluster loses a worker node mid-job: its shards finish on the other node."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from prefect_vllm.testing import write_sample_prompts
from tests.helpers import (
    finish,
    input_ids,
    markers,
    no_engine_left,
    read_output,
    run_cli,
    start_cli,
    summary_of,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture
def cluster() -> Iterator[Any]:
    """A head node that runs no engine (no CPUs) and two worker nodes of 2 CPUs each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def engines_on(node: Any) -> list[int]:
    """PIDs of the vLLM engine processes running under a node's raylet."""
    from ray._private import ray_constants

    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    found = []
    for proc in raylet.children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("VLLM::EngineCore"):
                found.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def test_losing_a_worker_node_mid_job_moves_its_engine_and_completes_exactly(
    tmp_path: Path, tiny_model: Path, cluster: Any, prefect_server: str
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=800)
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    proc = start_cli(
        ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--actors", "2",
         "--shard-size", "20", "--max-tokens", "64", "--ignore-eos", "--temperature", "0",
         "--ray-address", cluster.address, "--json"],
        tmp_path / "home",
        log,
        api_url=prefect_server,
    )  # fmt: skip
    wait_for(lambda: markers(out) or proc.poll() is not None, 900, "the first committed shard")
    assert proc.poll() is None, log.read_text()[-3000:]
    workers = list(cluster.worker_nodes)
    assert all(engines_on(node) for node in workers), "the engines were not spread over both workers"
    lost = workers[0]
    cluster.remove_node(lost, allow_graceful=False)
    committed_at_loss = len(markers(out))

    done = finish(proc, log)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = summary_of(done)
    assert summary["rows_ok"] == 800 and summary["rows_failed"] == 0
    assert summary["shards_run"] == 40 and committed_at_loss < 40
    table = read_output(out)
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    assert set(table.column("completion_tokens").to_pylist()) == {64}
    (survivor,) = cluster.worker_nodes
    assert len(engines_on(survivor)) == 0  # the pool shut its engines down at the end
    no_engine_left()


def test_losing_the_whole_cluster_ends_the_run_with_exit_1_and_a_new_cluster_resumes(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    from ray.cluster_utils import Cluster

    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=600)
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    args = ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--shard-size", "20",
            "--max-tokens", "64", "--ignore-eos", "--temperature", "0", "--json"]  # fmt: skip
    first = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        proc = start_cli(
            [*args, "--ray-address", first.address], tmp_path / "home", log, api_url=prefect_server
        )
        wait_for(lambda: markers(out) or proc.poll() is not None, 900, "the first committed shard")
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        first.shutdown()
    done = finish(proc, log, timeout=600)
    assert done.returncode == 1, done.stderr[-4000:]
    committed = len(markers(out))
    assert 1 <= committed < 30
    no_engine_left()

    second = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        resumed = run_cli([*args, "--ray-address", second.address], tmp_path / "home", api_url=prefect_server)
    finally:
        second.shutdown()
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = summary_of(resumed)
    assert summary["shards_skipped"] == committed and summary["shards_run"] == 30 - committed
    table = read_output(out)
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
