"""Shared fixtures: a tiny model made offline and one Prefect server."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    SESSION_MARK,
    STRUCTURED_ENGINE_ARGS,
    SharedPool,
    engine_processes,
    free_port,
    run_cli,
)
from tests.pooling import CLASSES, RawVllm

# Each test process (pytest-xdist runs two) marks the processes it starts and keeps Ray's
# files in a folder of its own: a local `ray.init()` joins the cluster whose address file
# it finds in Ray's temporary folder, which must be this test process's cluster only.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ[SESSION_MARK] = f"{_WORKER}-{os.getpid()}"
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"pv-{_WORKER}-", dir="/tmp")  # short: socket paths


def pytest_unconfigure() -> None:
    """Remove this test process's Ray folder (every cluster in it has stopped)."""
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


def _run_root(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A folder every test process of this run shares."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent  # the parent is the run's, shared


def _made_once(root: Path, name: str, make: Callable[[Path], None]) -> Path:
    """`root/models/name`, made by `make` once per test run (the first test process to
    need it makes it; the other waits and reads it)."""
    from filelock import FileLock

    model, done = root / "models" / name, root / "models" / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            make(model)
            done.touch()
    return model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A tiny random Llama with a BPE tokenizer, made offline once per test run."""
    from prefect_vllm.testing import make_tiny_model

    return _made_once(
        _run_root(tmp_path_factory, worker_id), "tiny-llama", lambda to: make_tiny_model(to, seed=0)
    )


def _made_by_the_command(home: Path, *args: str) -> Callable[[Path], None]:
    def make(model: Path) -> None:
        made = run_cli(["make-tiny-model", str(model), *args], home)
        assert made.returncode == 0, made.stderr[-2000:]

    return make


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A tiny random classifier of three classes (`tests.pooling.CLASSES`), made by
    `prefect-vllm make-tiny-model DIR --classes ...` as a user makes one."""
    root = _run_root(tmp_path_factory, worker_id)
    return _made_once(root, "classifier", _made_by_the_command(root / "home", "--classes", ",".join(CLASSES)))


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A tiny random cross-encoder (a classifier of one label), made by the command."""
    root = _run_root(tmp_path_factory, worker_id)
    return _made_once(root, "reranker", _made_by_the_command(root / "home", "--classes", "relevance"))


@pytest.fixture(scope="session")
def raw_vllm(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> RawVllm:
    """Raw vLLM's answers for the parity tests: one `LLM(...)` per model per test run."""
    return RawVllm(_run_root(tmp_path_factory, worker_id) / "raw-vllm")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the session's warm pools (the generation pool, the pooling pools on its
    cluster) run last in their test process: their engines outlive them, and no other
    test of that process (a fault test counting engines, a run starting its own) should
    see them. (Both test processes may reach them, and each
    then starts a warm pool of its own.)"""
    items.sort(key=lambda item: "shared_pool" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def shared_pool(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedPool]:
    """A warm pool of one engine on a Ray cluster of the session's own, for the tests that
    kill no engine (fault tests kill fresh engines of their own).

    The cluster (`ray start --head`) keeps its files in a folder of its own, so a
    `ray.init()` elsewhere never joins it; it runs without token authentication, as
    clients given its address send none. Stopped at the end of the session.
    """
    import psutil

    temp_dir = tempfile.mkdtemp(prefix="pv-ray-", dir="/tmp")  # short: Ray's socket paths are bounded
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run(
        [ray, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    home = tmp_path_factory.mktemp("shared-pool-home")
    try:
        started = run_cli(
            ["pool", "start", "shared", "--model", str(tiny_model), "--ray-address", address,
             "--engine-args", STRUCTURED_ENGINE_ARGS],
            home, timeout=600,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr[-4000:]
        yield SharedPool(name="shared", address=address, warm=set(engine_processes()), pools={"shared"})
        run_cli(["pool", "stop", "shared", "--ray-address", address], home, timeout=300)
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class PoolingPools:
    """Warm pools of vLLM's pooling runner on the session's cluster, one per model,
    started when a test first asks for one and stopped at the end of the session."""

    cluster: SharedPool
    home: Path
    started: dict[Path, SharedPool]

    def pool(self, model: Path) -> SharedPool:
        """The session's pooling pool of `model` (started now if it is not yet)."""
        if model not in self.started:
            before = set(engine_processes())
            name = f"pooling-{model.name}"
            # The cluster's two CPUs are the generation pools': a pooling engine reserves none.
            started = run_cli(
                ["pool", "start", name, "--model", str(model), "--ray-address", self.cluster.address,
                 "--engine-args", '{"runner": "pooling"}', "--cpus-per-actor", "0"],
                self.home, timeout=600,
            )  # fmt: skip
            assert started.returncode == 0, started.stderr[-4000:]
            self.cluster.warm.update(set(engine_processes()) - before)
            self.cluster.pools.add(name)
            self.started[model] = SharedPool(
                name, self.cluster.address, self.cluster.warm, self.cluster.pools
            )
        return self.started[model]


@pytest.fixture(scope="session")
def pooling_pools(
    shared_pool: SharedPool, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PoolingPools]:
    """The session's pooling pools, for the embed, classify and score tests that kill
    nothing (fault tests kill fresh engines of their own). They share the session
    cluster, so tests using them run last too (`pytest_collection_modifyitems`)."""
    pools = PoolingPools(shared_pool, tmp_path_factory.mktemp("pooling-pools-home"), {})
    yield pools
    for pool in pools.started.values():
        run_cli(["pool", "stop", pool.name, "--ray-address", pool.address], pools.home, timeout=300)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One real Prefect server (SQLite) for the session: its API URL.

    In-process flows reach it through the harness's settings; `prefect-vllm`
    subprocesses get it as `PREFECT_API_URL` (`run_cli(..., api_url=prefect_server)`),
    so only the tests that prove a command starts its own server pay for one.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    # Its telemetry heartbeat cannot reach the internet here: an ERROR line each test run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=180):
        yield str(PREFECT_API_URL.value())


def pytest_configure(config: pytest.Config) -> None:
    """Count what each test starts, and print the tally at the end (`tests/starts.py`)."""
    from tests.starts import StartsPlugin

    config.pluginmanager.register(StartsPlugin(config), "pv-starts")
