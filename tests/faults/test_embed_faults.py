"""An embedding job under faults: its engine SIGKILLed, then its flow process SIGKILLed."""

from __future__ import annotations

import math
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from prefect_vllm.testing import write_sample_prompts
from tests.helpers import (
    engine_processes,
    input_ids,
    markers,
    no_engine_left,
    part_digests,
    ray_processes,
    read_output,
    run_cli,
    start_cli,
    summary_of,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_an_embedding_job_survives_its_engine_and_its_flow_being_killed(
    tmp_path: Path, tiny_model: Path
) -> None:
    # 60 shards: commits go on well past both kills.
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=1200, seed=11)
    out = tmp_path / "out"
    args = ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--task", "embed",
            "--shard-size", "20", "--actors", "1", "--json"]  # fmt: skip
    log = tmp_path / "run-1.log"
    proc = start_cli(args, tmp_path / "home-1", log)
    wait_for(lambda: markers(out) or proc.poll() is not None, 900, "the first committed shard")
    assert proc.poll() is None, log.read_text()[-3000:]
    cores = engine_processes(("VLLM::EngineCore",))
    assert len(cores) == 1, cores
    os.kill(cores[0], signal.SIGKILL)
    at_kill = len(markers(out))
    # The restarted engine commits again; then the flow process itself is killed.
    wait_for(
        lambda: len(markers(out)) >= at_kill + 3 or proc.poll() is not None, 600, "commits after the kill"
    )
    assert proc.poll() is None, log.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "crash-exiting" in log.read_text(), "the actor saw its engine die"
    wait_for(
        lambda: not ray_processes() and not engine_processes(), 120, "the dead run's Ray processes to exit"
    )
    committed = {
        k: v for k, v in part_digests(out).items() if (out / "_commits" / f"{k[5:-8]}.json").exists()
    }
    n_before = len(markers(out))
    assert at_kill + 3 <= n_before < 60, n_before

    resumed = run_cli(args, tmp_path / "home-2")  # a new Prefect database: the checkpoints alone decide
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = summary_of(resumed)
    assert (summary["shards_skipped"], summary["shards_run"]) == (n_before, 60 - n_before)
    assert (summary["rows_ok"], summary["rows_failed"]) == (1200, 0)
    table = read_output(out)
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))
    after = part_digests(out)
    assert {k: after[k] for k in committed} == committed, "a committed shard was rewritten"
    for vector in table.column("embedding").to_pylist():  # whole, normalized vectors only
        assert len(vector) == 128 and math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-4)
    no_engine_left()
