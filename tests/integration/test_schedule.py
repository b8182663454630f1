"""A scheduled deployment gets its runs: the Prefect server's scheduler works with the
versions this project installs (Prefect 3.7 with SQLAlchemy 2.1 created none)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, wait_for

pytestmark = pytest.mark.integration


def test_the_server_scheduler_creates_the_runs_of_a_scheduled_deployment(tmp_path: Path) -> None:
    """A real `prefect server start`, its scheduler looking every second; no flow runs."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "home"),
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1",
        PREFECT_UI_ENABLED="false",
        # Telemetry cannot reach the internet here, and its first write races the other
        # services for the SQLite file on a loaded machine ("database is locked").
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: _healthy(api_url), 180, "the Prefect server to answer")
        deployment_id = asyncio.run(_scheduled_deployment(api_url))
        wait_for(lambda: asyncio.run(_scheduled_runs(api_url, deployment_id)), 90, "scheduled runs")
    finally:
        server.terminate()
        server.wait(timeout=60)
    text = log.read_text()
    assert "Can't evaluate bulk DML" not in text and "Traceback" not in text, text[-4000:]


def _healthy(api_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def _scheduled_deployment(api_url: str) -> Any:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import IntervalSchedule

    async with PrefectClient(api_url) as client:
        flow_id = await client.create_flow_from_name("batch-inference")
        return await client.create_deployment(
            flow_id=flow_id,
            name="every-hour",
            schedules=[DeploymentScheduleCreate(schedule=IntervalSchedule(interval=dt.timedelta(hours=1)))],
        )


async def _scheduled_runs(api_url: str, deployment_id: Any) -> int:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with PrefectClient(api_url) as client:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    return len(runs)
