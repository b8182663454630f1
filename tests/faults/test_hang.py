"""A SIGSTOPped `VLLM::EngineCore` (alive, no progress) is noticed at the call's deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from prefect_vllm._engine.deaths import HANG_CAUSE
from prefect_vllm._engine.pool import LOST_ACTOR_CAUSE
from prefect_vllm.testing import write_sample_prompts
from tests.helpers import (
    engine_processes,
    finish,
    input_ids,
    markers,
    no_engine_left,
    read_output,
    start_cli,
    summary_of,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

HANG_TIMEOUT_S = 15
#: How long the caller waits past the deadline before killing a frozen actor itself.
PROBE_TIMEOUT_S = 10


def start_committing_job(
    tmp_path: Path, tiny_model: Path, rows: int, api_url: str
) -> tuple[Path, Path, Path, subprocess.Popen[str]]:
    """Start a job with a 15 s call deadline; return once its first shard is committed."""
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=rows)
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    proc = start_cli(
        ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--shard-size", "20",
         "--max-tokens", "32", "--ignore-eos", "--temperature", "0",
         "--hang-timeout", str(HANG_TIMEOUT_S), "--hang-timeout-per-token", "0",
         "--probe-timeout", str(PROBE_TIMEOUT_S), "--json"],
        tmp_path / "home",
        log,
        api_url=api_url,
    )  # fmt: skip
    wait_for(lambda: markers(out) or proc.poll() is not None, 900, "the first committed shard")
    assert proc.poll() is None, log.read_text()[-3000:]
    return prompts, out, log, proc


def test_a_hung_engine_is_killed_at_its_deadline_and_the_job_completes_exactly(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    launched = time.monotonic()
    prompts, out, log, proc = start_committing_job(tmp_path, tiny_model, rows=400, api_url=prefect_server)
    first_commit_s = time.monotonic() - launched  # server, Ray and one engine start
    (core,) = engine_processes(("VLLM::EngineCore",))
    os.kill(core, signal.SIGSTOP)
    stopped = time.monotonic()

    done = finish(proc, log)
    recovered_s = time.monotonic() - stopped
    assert done.returncode == 0, done.stderr[-4000:]
    assert "hang:" in done.stderr, "the actor's deadline did not fire"
    # The deadline, one actor restart (no faster than the first start) and the rest
    # of the job, which takes seconds with this tiny model.
    assert recovered_s < HANG_TIMEOUT_S + first_commit_s + 30, (recovered_s, first_commit_s)
    summary = summary_of(done)
    assert summary["engine_restarts"] >= 1
    assert summary["engine_deaths_by_cause"] == {HANG_CAUSE: summary["engine_restarts"]}
    assert summary["rows_ok"] == 400 and summary["rows_failed"] == 0 and summary["poisoned_rows"] == []
    table = read_output(out)
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    assert set(table.column("completion_tokens").to_pylist()) == {32}
    no_engine_left()
    assert not psutil.pid_exists(core) or psutil.Process(core).status() == psutil.STATUS_ZOMBIE


def test_a_stuck_actor_process_is_killed_by_the_caller_and_restarted(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    """SIGSTOP the actor itself: its own deadline cannot fire, the caller's backstop must."""
    prompts, out, log, proc = start_committing_job(tmp_path, tiny_model, rows=200, api_url=prefect_server)
    (core,) = engine_processes(("VLLM::EngineCore",))
    actor = psutil.Process(core).ppid()
    os.kill(actor, signal.SIGSTOP)

    done = finish(proc, log)
    assert done.returncode == 0, done.stderr[-4000:]
    # Stopped during a call, the call's backstop fires; between calls, the next call's probe.
    assert "engine hung with rows" in done.stderr or "is alive but does not answer" in done.stderr
    summary = summary_of(done)
    assert summary["engine_restarts"] >= 1 and summary["rows_ok"] == 200
    # The actor process was killed from outside: it could record nothing, and is named so.
    assert summary["engine_deaths_by_cause"] == {LOST_ACTOR_CAUSE: summary["engine_restarts"]}
    table = read_output(out)
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    no_engine_left()
    assert not psutil.pid_exists(actor) or psutil.Process(actor).status() == psutil.STATUS_ZOMBIE
