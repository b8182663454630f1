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

from tests.helpers import STRUCTURED_ENGINE_ARGS, SharedPool, free_port, run_cli


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a BPE tokenizer, made offline once per session."""
    from prefect_vllm.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the session's warm pool run last: its engine outlives them, and no other
    test (a fault test counting engines, a run starting its own) should see it."""
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

    from prefect_vllm.testing import engine_processes

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
