"""Helpers for tests that run the real command and read its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

#: Set by conftest to a value of this test process's own and inherited by every process
#: it starts (commands, Ray clusters, their actors, vLLM engines): pytest-xdist runs two
#: test processes side by side, and each counts and kills only its own engines.
SESSION_MARK = "PV_TEST_SESSION"


def ours(pid: int) -> bool:
    """Whether process `pid` was started by this test process (its mark, or the nearest
    marked ancestor's: a process that retitled itself with `setproctitle`, as vLLM's
    spawned engine and worker processes do, may have written over the environment the
    kernel shows)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        for candidate in (proc, *proc.parents()):
            mark = candidate.environ().get(SESSION_MARK)
            if mark is not None:
                return bool(mark == os.environ.get(SESSION_MARK))
    except psutil.Error:
        return False
    return False


def engine_processes(kinds: tuple[str, ...] = ("VLLM::EngineCore", "VLLM::Worker")) -> list[int]:
    """This test process's live vLLM engine processes (`prefect_vllm.testing.engine_processes`
    narrowed to the ones it started)."""
    from prefect_vllm import testing

    return [pid for pid in testing.engine_processes(kinds) if ours(pid)]


def cli_env(prefect_home: Path, api_url: str | None = None) -> dict[str, str]:
    """The environment of a `prefect-vllm` subprocess: its own Prefect home.

    Given `api_url` (the session's server), the command uses it; with none, the
    command starts its one local server itself, as it does for a new user.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), PYTHONUNBUFFERED="1")
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


def cli(*args: str) -> list[str]:
    """The argv of a `prefect-vllm` command run with this interpreter."""
    return [sys.executable, "-m", "prefect_vllm.cli", *args]


def run_cli(
    args: list[str], prefect_home: Path, timeout: float = 900, api_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `prefect-vllm` to completion, capturing its output."""
    return subprocess.run(
        cli(*args),
        env=cli_env(prefect_home, api_url),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def summary_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The `--json` summary: the last line of stdout."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines, f"no stdout; stderr tail:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def read_output(output: Path) -> Any:
    """Every part file of an output folder, as one Arrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(output.glob("part-*.parquet"))
    assert parts, f"no part files in {output}"
    return pa.concat_tables([pq.read_table(p) for p in parts])


def input_ids(path: Path) -> list[str]:
    """The custom ids of a JSONL prompt file, in order."""
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines() if line.strip()]


def markers(output: Path) -> list[Path]:
    """The commit markers present in an output folder."""
    return sorted((output / "_commits").glob("*.json"))


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def no_engine_left(timeout: float = 60, besides: tuple[int, ...] = ()) -> None:
    """Assert that no vLLM engine process outlives its actor (waits for cleanup).

    Args:
        besides: The engine processes of a warm pool, which outlive runs on purpose.
    """
    try:
        wait_for(
            lambda: not set(engine_processes()) - set(besides), timeout, "every vLLM engine process to exit"
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {describe(set(engine_processes()) - set(besides))}") from None


def describe(pids: set[int]) -> str:
    """Each process: pid, title and its parents' titles (which run left it behind)."""
    import psutil

    described = []
    for pid in sorted(pids):
        try:
            proc = psutil.Process(pid)
            chain = " < ".join(" ".join(p.cmdline())[:60] for p in (proc, *proc.parents()[:3]))
        except psutil.Error:
            chain = "gone"
        described.append(f"{pid} ({chain})")
    return "; ".join(described) or "none"


@dataclass(frozen=True)
class SharedPool:
    """A warm pool of the session's, for tests that kill no engine.

    Attributes:
        name: The pool's name.
        address: Its Ray cluster's address.
        warm: The engine processes of every session pool on that cluster (they outlive
            every run on them), shared by the pools as they start.
        pools: The names of every session pool on that cluster, shared likewise.
    """

    name: str
    address: str
    warm: set[int] = field(default_factory=set, compare=False)
    pools: set[str] = field(default_factory=set, compare=False)

    @property
    def engines(self) -> tuple[int, ...]:
        """The engine processes of the session's pools, which every run leaves alone."""
        return tuple(sorted(self.warm))

    def cli_args(self) -> list[str]:
        """The `prefect-vllm run` flags that generate on this pool."""
        return ["--pool", self.name, "--ray-address", self.address]

    def kwargs(self) -> dict[str, str]:
        """The `batch_inference` arguments that generate on this pool."""
        return {"warm_pool": self.name, "ray_address": self.address}


#: The shared pool's engine arguments: a random model loves whitespace; inside JSON
#: (structured output) it would fill max_tokens with it.
STRUCTURED_ENGINE_ARGS = json.dumps(
    {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}
)


def free_port() -> int:
    """A TCP port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cli(
    args: list[str], prefect_home: Path, log: Path, api_url: str | None = None, sigint: bool = False
) -> subprocess.Popen[str]:
    """Start `prefect-vllm` in the background; stdout is piped, stderr goes to `log`.

    Args:
        sigint: Give the command SIGINT's default action, as a terminal's foreground job
            has it (a background job of a non-interactive shell, as CI may run the tests
            in, inherits SIGINT ignored).
    """
    import signal

    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen(
        cli(*args),
        env=cli_env(prefect_home, api_url),
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        cwd=REPO,
        preexec_fn=default_sigint if sigint else None,
    )


def finish(proc: subprocess.Popen[str], log: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Wait for a background `prefect-vllm` and return it like `subprocess.run` would."""
    stdout, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, log.read_text())


def ray_processes() -> list[int]:
    """PIDs of this test process's live Ray processes (raylet, GCS, workers, actors)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        if (cmd.startswith("ray::") or "raylet" in cmd or "gcs_server" in cmd) and ours(proc.info["pid"]):
            found.append(proc.info["pid"])
    return found


def part_digests(output: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every part file, by name."""
    import hashlib

    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(output.glob("part-*.parquet"))
    }


def job_events(api_url: str, job_id: str) -> list[dict[str, Any]]:
    """Every `prefect-vllm.*` event of one job the server holds, oldest first, as JSON."""
    from prefect_vllm.flows._events import job_resource_id

    return resource_events(api_url, job_resource_id(job_id), "prefect-vllm.")


def resource_events(api_url: str, resource_id: str, prefix: str) -> list[dict[str, Any]]:
    """The events about one resource whose names start with `prefix`, oldest first, as JSON."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.filters import EventFilter, EventNameFilter, EventOrder, EventResourceFilter

    event_filter = EventFilter(
        event=EventNameFilter(prefix=[prefix]),
        resource=EventResourceFilter(id=[resource_id]),
        order=EventOrder.ASC,
    )
    with SyncPrefectClient(api_url) as client:
        page = client.read_events(filter=event_filter, limit=50)
        events = list(page.events)
        while page.next_page:
            page = client.read_events_page(str(page.next_page))
            events += page.events
    return [event.model_dump(mode="json") for event in events]


def wait_for_job_events(api_url: str, job_id: str, last: str, count: int = 1) -> list[dict[str, Any]]:
    """The job's events once `count` events named `last` are stored (the server writes
    them in batches, a few seconds after they are sent)."""

    def stored() -> list[dict[str, Any]] | None:
        events = job_events(api_url, job_id)
        return events if sum(1 for e in events if e["event"] == last) >= count else None

    return list(wait_for(stored, 60, f"{count} {last} event(s) of job {job_id}", interval=1.0))


def events_named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The events called `prefect-vllm.<name>`."""
    return [e for e in events if e["event"] == f"prefect-vllm.{name}"]


def readme_trigger() -> Any:
    """The deployment trigger of the README's "Events for automations" example."""
    import re

    import yaml
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    section = (REPO / "README.md").read_text().split("### Events for automations", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    (deployment,) = yaml.safe_load(block)["deployments"]
    (trigger,) = deployment["triggers"]
    return DeploymentEventTrigger.model_validate(trigger)
