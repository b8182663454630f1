"""Shared fixtures: a tiny model made offline and one Prefect server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a BPE tokenizer, made offline once per session."""
    from prefect_vllm.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


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
