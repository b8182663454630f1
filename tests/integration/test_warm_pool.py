"""Warm engine pools on a long-lived Ray cluster: started once, used by many runs, stopped.

One pool for the module, on the session's cluster; the tests run in order (the last
one stops the pool). Where the two test processes share the module's tests, each has
its own session cluster and module pool. The engine-death test kills a real engine
inside the warm pool.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefect_vllm.testing import write_sample_prompts
from tests.helpers import (
    SharedPool,
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

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POOL = "tests"


@pytest.fixture(scope="module")
def cluster(shared_pool: SharedPool) -> SharedPool:
    """The session's long-lived Ray cluster (`ray start --head`): it outlives every run.

    Its own warm pool (`shared`) runs beside this module's; the tests tell their
    engines apart.
    """
    return shared_pool


@pytest.fixture(scope="module")
def pool(
    cluster: SharedPool, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The warm pool `tests` of one engine, started by the command line; what it printed.

    The module's last test stops it (and asserts so); where the two test processes share
    the module's tests, the other one's pool is stopped when its part of the module ends,
    so that no later test of that process meets its engine.
    """
    home = tmp_path_factory.mktemp("pool-home")
    started = run_cli(
        ["pool", "start", POOL, "--model", str(tiny_model), "--ray-address", cluster.address, "--json"],
        home,
        timeout=600,
    )
    assert started.returncode == 0, started.stderr[-4000:]
    yield dict(json.loads(started.stdout))
    run_cli(["pool", "stop", POOL, "--ray-address", cluster.address], home, timeout=300)  # gone already: fine


def pool_cli(cluster: SharedPool, tmp_path: Path, *args: str) -> Any:
    return run_cli(["pool", *args, "--ray-address", cluster.address], tmp_path / "home", timeout=300)


def run_args(prompts: Path, out: Path, model: Path, cluster: SharedPool, *extra: str) -> list[str]:
    return [
        "run", str(prompts), "--output", str(out), "--model", str(model), "--pool", POOL,
        "--ray-address", cluster.address, "--shard-size", "20", "--max-tokens", "16", "--temperature", "0",
        "--json", *extra,
    ]  # fmt: skip


def test_pool_list_and_status_show_the_pool_and_its_engine(
    tmp_path: Path, cluster: SharedPool, pool: dict[str, Any], tiny_model: Path
) -> None:
    listed = pool_cli(cluster, tmp_path, "list", "--json")
    assert listed.returncode == 0, listed.stderr[-3000:]
    pools = {p["name"]: p for p in json.loads(listed.stdout)}
    assert set(pools) == {POOL, *cluster.pools}  # this module's, and the session's
    only = pools[POOL]
    assert only["model"] == str(tiny_model)
    (actor,) = only["actors"]
    assert actor["state"] == "ALIVE" and actor["pid"] == pool["actors"][0]["pid"]
    status = pool_cli(cluster, tmp_path, "status", POOL)
    assert status.returncode == 0 and f"{POOL}: {tiny_model} (0: ALIVE pid {actor['pid']}" in status.stdout
    again = pool_cli(cluster, tmp_path, "start", POOL, "--model", str(tiny_model))
    assert again.returncode == 2 and f"a warm pool named '{POOL}' already runs" in again.stderr


def test_a_warm_pool_serves_two_runs_in_a_row_without_starting_an_engine(
    tmp_path: Path, cluster: SharedPool, pool: dict[str, Any], tiny_model: Path, prefect_server: str
) -> None:
    """The command line, then the Python API: both generate on the pool's one engine."""
    from prefect_vllm.config import SamplingConfig
    from prefect_vllm.flows import batch_inference

    engines = sorted(engine_processes())
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=100)
    done = run_cli(run_args(prompts, tmp_path / "first", tiny_model, cluster), tmp_path / "home",
                   api_url=prefect_server)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    # The run started no engine (how soon it commits is benchmarks/startup.py's to measure).
    assert f"using warm pool '{POOL}'" in done.stderr and "engine(s) ready" not in done.stderr
    assert sorted(engine_processes()) == engines, "the first run started or stopped an engine"
    summary = summary_of(done)
    assert (summary["rows_ok"], summary["engine_restarts"]) == (100, 0)

    result = batch_inference(
        input=str(prompts), output=str(tmp_path / "second"), model=str(tiny_model), shard_size=20,
        sampling=SamplingConfig(max_tokens=16, temperature=0.0), warm_pool=POOL, ray_address=cluster.address,
    )  # fmt: skip
    assert (result.rows_ok, result.engine_restarts, result.job_id) == (100, 0, summary["job_id"])
    for out in ("first", "second"):
        table = read_output(tmp_path / out)
        assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    assert read_output(tmp_path / "first").sort_by("custom_id").column("text") == read_output(
        tmp_path / "second"
    ).sort_by("custom_id").column("text"), "greedy text differs between two runs on one engine"
    assert sorted(engine_processes()) == engines, "an engine was started or stopped"


def test_two_concurrent_runs_on_one_pool_each_get_exactly_their_own_rows(
    tmp_path: Path, cluster: SharedPool, pool: dict[str, Any], tiny_model: Path, prefect_server: str
) -> None:
    procs = {}
    for name in ("a", "b"):
        prompts = write_sample_prompts(tmp_path / f"{name}.jsonl", n=120, seed=ord(name), id_prefix=name)
        log = tmp_path / f"{name}.log"
        args = run_args(prompts, tmp_path / f"out-{name}", tiny_model, cluster)
        procs[name] = (prompts, log, start_cli(args, tmp_path / f"home-{name}", log, api_url=prefect_server))
    for name, (prompts, log, proc) in procs.items():
        done = finish(proc, log)
        assert done.returncode == 0, done.stderr[-4000:]
        assert summary_of(done)["rows_ok"] == 120
        table = read_output(tmp_path / f"out-{name}")
        assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))


def test_a_job_whose_model_or_engine_settings_differ_from_the_pool_is_refused(
    tmp_path: Path, cluster: SharedPool, pool: dict[str, Any], tiny_model: Path, prefect_server: str
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=8)
    args = run_args(prompts, tmp_path / "out", tiny_model, cluster, "--max-model-len", "512")
    refused = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert (
        f"warm pool '{POOL}' runs other settings" in line
        and "engine.max_model_len (pool: null, job: 512)" in line
    )
    assert "Traceback" not in refused.stderr, refused.stderr[-3000:]
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)  # the same weights, but not the pool's model
    refused = run_cli(
        run_args(prompts, tmp_path / "out", other, cluster), tmp_path / "home", api_url=prefect_server
    )
    assert refused.returncode == 2 and "model (pool: " in refused.stderr, refused.stderr[-3000:]
    assert not list((tmp_path / "out").glob("part-*"))


def test_an_engine_killed_inside_a_warm_pool_is_restarted_and_the_pool_stays_healthy(
    tmp_path: Path, cluster: SharedPool, pool: dict[str, Any], tiny_model: Path, prefect_server: str
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=400)
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    args = run_args(prompts, out, tiny_model, cluster, "--ignore-eos", "--max-tokens", "64")
    proc = start_cli(args, tmp_path / "home", log, api_url=prefect_server)
    wait_for(lambda: markers(out) or proc.poll() is not None, 600, "the first committed shard")
    assert proc.poll() is None, log.read_text()[-3000:]
    (core,) = set(engine_processes(("VLLM::EngineCore",))) - set(cluster.engines)
    os.kill(core, signal.SIGKILL)

    done = finish(proc, log)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = summary_of(done)
    assert summary["engine_restarts"] >= 1 and summary["rows_ok"] == 400 and summary["poisoned_rows"] == []
    table = read_output(out)
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    assert set(table.column("completion_tokens").to_pylist()) == {64}

    status = pool_cli(cluster, tmp_path, "status", POOL, "--json")
    (actor,) = json.loads(status.stdout)["actors"]
    assert actor["state"] == "ALIVE" and actor["restarts"] >= 1 and actor["pid"] != pool["actors"][0]["pid"]
    (new_core,) = set(engine_processes(("VLLM::EngineCore",))) - set(cluster.engines)
    assert new_core != core
    healthy = run_cli(run_args(prompts, tmp_path / "after", tiny_model, cluster), tmp_path / "home",
                      api_url=prefect_server)  # fmt: skip
    assert healthy.returncode == 0 and summary_of(healthy)["engine_restarts"] == 0, healthy.stderr[-3000:]


def test_embedding_jobs_run_on_a_pool_of_pooling_engines_and_a_generation_pool_refuses_them(
    tmp_path: Path, cluster: SharedPool, pool: dict[str, Any], tiny_model: Path, prefect_server: str
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=60)
    embed = ["--task", "embed"]
    refused = run_cli([*run_args(prompts, tmp_path / "refused", tiny_model, cluster), *embed], tmp_path / "home",
                      api_url=prefect_server)  # fmt: skip
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "cannot embed: vLLM serves generate" in last, refused.stderr[-3000:]
    assert """--engine-args '{"runner": "pooling"}'""" in last and not list(
        (tmp_path / "refused").glob("part-*")
    )

    try:
        # The session cluster's two CPUs are the two generation pools': this one reserves none.
        started = pool_cli(cluster, tmp_path, "start", "embedder", "--model", str(tiny_model), "--engine-args",
                           '{"runner": "pooling"}', "--cpus-per-actor", "0", "--json")  # fmt: skip
        assert started.returncode == 0, started.stderr[-4000:]
        engines = sorted(engine_processes())
        args = run_args(prompts, tmp_path / "one", tiny_model, cluster, *embed, "--pool", "embedder")
        outputs = {}
        for out in ("one", "two"):  # two jobs (other outputs, the same job id) on the one engine
            args[args.index("--output") + 1] = str(tmp_path / out)
            done = run_cli(args, tmp_path / "home", api_url=prefect_server)
            assert done.returncode == 0, done.stderr[-4000:]
            assert "using warm pool 'embedder'" in done.stderr and "engine(s) ready" not in done.stderr
            assert summary_of(done)["rows_ok"] == 60
            table = read_output(tmp_path / out).sort_by("custom_id")
            assert table.column("custom_id").to_pylist() == sorted(input_ids(prompts))
            outputs[out] = table.column("embedding").to_pylist()
        assert outputs["one"] == outputs["two"] and len(outputs["one"][0]) == 128
        assert sorted(engine_processes()) == engines, "an embedding run started or stopped an engine"
        generate = run_cli(run_args(prompts, tmp_path / "text", tiny_model, cluster, "--pool", "embedder"),
                           tmp_path / "home", api_url=prefect_server)  # fmt: skip
        assert generate.returncode == 2, generate.stderr[-3000:]
        assert "cannot generate" in generate.stderr.strip().splitlines()[-1]
    finally:
        stopped = pool_cli(cluster, tmp_path, "stop", "embedder")
    assert stopped.returncode == 0, stopped.stderr[-3000:]


def test_pool_stop_ends_every_engine_process(
    tmp_path: Path, cluster: SharedPool, pool: dict[str, Any]
) -> None:
    assert set(engine_processes()) - set(cluster.engines)
    stopped = pool_cli(cluster, tmp_path, "stop", POOL)
    assert stopped.returncode == 0 and f"warm pool '{POOL}' stopped (1 engine actor(s))" in stopped.stdout
    no_engine_left(besides=cluster.engines)
    listed = pool_cli(cluster, tmp_path, "list", "--json")
    assert listed.returncode == 0 and sorted(p["name"] for p in json.loads(listed.stdout)) == sorted(
        cluster.pools
    )
