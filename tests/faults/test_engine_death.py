"""A real `VLLM::EngineCore` is SIGKILLed mid-run: the actor restarts, nothing is lost."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

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
    start_cli,
    summary_of,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_killed_engine_is_restarted_and_every_row_is_generated_once(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=600)
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    proc = start_cli(
        ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--actors", "2",
         "--shard-size", "20", "--max-tokens", "64", "--ignore-eos", "--temperature", "0", "--json"],
        tmp_path / "home",
        log,
        api_url=prefect_server,
    )  # fmt: skip
    wait_for(lambda: markers(out) or proc.poll() is not None, 900, "the first committed shard")
    assert proc.poll() is None, log.read_text()[-3000:]
    cores = engine_processes(("VLLM::EngineCore",))
    assert len(cores) == 2, cores
    killed_actor = psutil.Process(cores[0]).ppid()
    os.kill(cores[0], signal.SIGKILL)

    done = finish(proc, log)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "crash-exiting" in done.stderr
    summary = summary_of(done)
    assert summary["engine_restarts"] >= 1
    # Every death is named: the actor saw its engine killed by a signal.
    assert summary["engine_deaths_by_cause"] == {"killed by SIGKILL": summary["engine_restarts"]}
    assert summary["rows_ok"] == 600 and summary["rows_failed"] == 0 and summary["poisoned_rows"] == []
    table = read_output(out)
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    assert set(table.column("completion_tokens").to_pylist()) == {64}
    # A kill between two calls is noticed by the health check before the next call and
    # blames no shard; the shards that did lose a call were sent again, to a live actor.
    resent = [
        json.loads((out / "_commits" / f"{k}.json").read_text()) for k in summary["engine_deaths_by_shard"]
    ]
    assert all(m["actor_pid"] != killed_actor for m in resent), "a lost shard claims the dead actor"
    no_engine_left()
