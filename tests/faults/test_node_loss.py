"""A multi-node Ray cluster loses a worker node mid-job: its shards finish on the other node.

The worker nodes advertise GPUs they do not have (`num_gpus=2` each; the engines still
run on CPU), so what is shown is GPU scheduling as Ray sees it: each actor's GPUs on one
node, actors spread over the nodes, an actor that lost its node back on the other when
that node has a GPU free, and requests no node can hold refused before any engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from prefect_vllm.testing import write_sample_prompts
from tests.helpers import (
    engine_processes,
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


def gpu_cluster() -> Any:
    """A head node that runs no engine (no CPUs) and two worker nodes of 2 CPUs and 2
    (advertised) GPUs each."""
    from ray.cluster_utils import Cluster

    # A lost node is declared dead after 2 missed 1-second health checks (Ray's default: 15 s).
    checks = {
        "health_check_period_ms": 1000,
        "health_check_timeout_ms": 1000,
        "health_check_failure_threshold": 2,
    }
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": checks})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    return cluster


@pytest.fixture
def cluster() -> Iterator[Any]:
    """`gpu_cluster`, for one test (it loses a node)."""
    cluster = gpu_cluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def intact_cluster() -> Iterator[Any]:
    """`gpu_cluster`, for the tests that lose no node."""
    cluster = gpu_cluster()
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
         "--gpus-per-actor", "1", "--shard-size", "20", "--max-tokens", "64", "--ignore-eos",
         "--temperature", "0", "--ray-address", cluster.address, "--json"],
        tmp_path / "home",
        log,
        api_url=prefect_server,
    )  # fmt: skip
    wait_for(lambda: markers(out) or proc.poll() is not None, 900, "the first committed shard")
    assert proc.poll() is None, log.read_text()[-3000:]
    workers = list(cluster.worker_nodes)
    assert all(engines_on(node) for node in workers), "the engines were not spread over both workers"
    lost, survivor = workers
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
    assert list(cluster.worker_nodes) == [survivor]
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


def pool_cli(cluster: Any, home: Path, *args: str) -> Any:
    return run_cli(["pool", *args, "--ray-address", cluster.address, "--json"], home, timeout=600)


def placed(cluster: Any, home: Path, name: str, *flags: str) -> list[dict[str, Any]]:
    """Start warm pool `name` with `flags`, read where each actor runs, stop it."""
    started = pool_cli(cluster, home, "start", name, *flags)
    assert started.returncode == 0, started.stderr[-4000:]
    try:
        status = pool_cli(cluster, home, "status", name)
        assert status.returncode == 0, status.stderr[-3000:]
        actors: list[dict[str, Any]] = summary_of(status)["actors"]
    finally:
        stopped = pool_cli(cluster, home, "stop", name)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    return actors


def test_each_actor_holds_its_gpus_on_one_node_and_actors_spread_over_the_nodes(
    tmp_path: Path, tiny_model: Path, intact_cluster: Any
) -> None:
    home = tmp_path / "home"
    model = ["--model", str(tiny_model), "--cpus-per-actor", "0.25"]
    nodes = {node.node_id for node in intact_cluster.worker_nodes}
    four = placed(intact_cluster, home, "one-gpu", *model, "--actors", "4", "--gpus-per-actor", "1")
    assert sorted(Counter(a["node"] for a in four).values()) == [2, 2] and {a["node"] for a in four} == nodes
    assert all(len(a["gpus"]) == 1 for a in four)
    assert len({(a["node"], a["gpus"][0]) for a in four}) == 4, "two actors were given one GPU"
    # Tensor parallelism: each engine's two workers run on its actor's two GPUs, on one node.
    two = placed(intact_cluster, home, "two-gpu", *model, "--actors", "2", "--tensor-parallel-size", "2")
    assert {a["node"] for a in two} == nodes and all(sorted(a["gpus"]) == ["0", "1"] for a in two), two
    no_engine_left()


@pytest.mark.parametrize(
    ("flags", "refusal"),
    [
        (["--tensor-parallel-size", "4"],
         "an engine actor reserves 4 GPU (--gpus-per-actor, by default --tensor-parallel-size), but no "
         "node of this Ray cluster has more than 2 GPU: an actor's GPU must all be on one node"),
        (["--actors", "3", "--tensor-parallel-size", "2"],
         "3 engine actors reserve 6 GPU in all, but this Ray cluster has 4: ask for fewer actors (--actors)"),
        (["--gpus-per-actor", "1", "--tensor-parallel-size", "2"],
         "--gpus-per-actor 1 is fewer than --tensor-parallel-size 2: each of an engine's workers needs a "
         "GPU of its actor"),
    ],
)  # fmt: skip
def test_gpus_no_node_can_give_are_refused_in_one_line_before_any_engine_starts(
    tmp_path: Path, tiny_model: Path, intact_cluster: Any, prefect_server: str, flags: list[str], refusal: str
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=4)
    out = tmp_path / "out"
    done = run_cli(
        ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--cpus-per-actor", "0.25",
         *flags, "--ray-address", intact_cluster.address],
        tmp_path / "home",
        timeout=300,
        api_url=prefect_server,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == f"prefect-vllm: error: {refusal}", done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "engine(s) ready" not in done.stderr
    assert not engine_processes() and not list(out.glob("part-*"))


def test_an_actor_whose_node_is_lost_comes_back_on_the_other_node_when_it_has_a_gpu_free(
    tmp_path: Path, tiny_model: Path, cluster: Any
) -> None:
    home = tmp_path / "home"
    started = pool_cli(
        cluster, home, "start", "moves", "--model", str(tiny_model), "--cpus-per-actor", "0.25",
        "--actors", "2", "--gpus-per-actor", "1",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr[-4000:]
    try:
        before = summary_of(pool_cli(cluster, home, "status", "moves"))["actors"]
        lost = next(node for node in cluster.worker_nodes if node.node_id == before[0]["node"])
        (survivor,) = {node.node_id for node in cluster.worker_nodes} - {lost.node_id}
        assert before[1]["node"] == survivor, before
        cluster.remove_node(lost, allow_graceful=False)

        def moved() -> list[dict[str, Any]]:
            actors: list[dict[str, Any]] = summary_of(pool_cli(cluster, home, "status", "moves"))["actors"]
            return actors if all(a["state"] == "ALIVE" and a["node"] for a in actors) else []

        after = wait_for(moved, 300, "the lost actor back on the surviving node", interval=2)
        assert [a["node"] for a in after] == [survivor, survivor], after
        assert sorted(a["gpus"][0] for a in after) == ["0", "1"], "the surviving node's two GPUs, one each"
        assert [a["restarts"] for a in after] == [1, 0], after
    finally:
        stopped = pool_cli(cluster, home, "stop", "moves")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    no_engine_left()
