"""Shared fixtures: a tiny model made offline and one Prefect server."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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

# Each test process (pytest-xdist runs two) marks the processes it starts and keeps Ray's
# files in a folder of its own: a local `ray.init()` joins the cluster whose address file
# it finds in Ray's temporary folder, which must be this test process's cluster only.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ[SESSION_MARK] = f"{_WORKER}-{os.getpid()}"
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"pv-{_WORKER}-", dir="/tmp")  # short: socket paths


def pytest_unconfigure() -> None:
    """Remove this test process's Ray folder (every cluster in it has stopped)."""
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A tiny random Llama with a BPE tokenizer, made offline once per test run (the
    first test process to need it makes it; the other waits and reads it)."""
    from filelock import FileLock

    from prefect_vllm.testing import make_tiny_model

    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent  # the parent is the run's, shared
    model, done = root / "models" / "tiny-llama", root / "models" / "tiny-llama.done"
    with FileLock(str(root / "tiny-llama.lock")):
        if not done.exists():
            make_tiny_model(model, seed=0)
            done.touch()
    return model


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the session's warm pool run last in their test process: its engine
    outlives them, and no other test of that process (a fault test counting engines, a
    run starting its own) should see it. (Both test processes may reach them, and each
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
        yield SharedPool(name="shared", address=address, engines=tuple(engine_processes()))
        run_cli(["pool", "stop", "shared", "--ray-address", address], home, timeout=300)
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One real Prefect server (SQLite) for the session: its API URL.

    In-process flows reach it through the harness's settings; `prefect-vllm`
    subprocesses get it as `PREFECT_API_URL` (`run_cli(..., api_url=prefect_server)`),
    so only the tests that prove a command starts its own server pay for one.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield str(PREFECT_API_URL.value())


def pytest_configure(config: pytest.Config) -> None:
    """Count what each test starts, and print the tally at the end (`tests/starts.py`)."""
    from tests.starts import StartsPlugin

    config.pluginmanager.register(StartsPlugin(config), "pv-starts")
