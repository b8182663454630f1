"""Sampled jobs on CPU: no spontaneous engine death, and a retried shard samples the same text."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from prefect_vllm.testing import write_sample_prompts
from tests.helpers import (
    engine_processes,
    finish,
    markers,
    no_engine_left,
    read_output,
    run_cli,
    start_cli,
    summary_of,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def long_prompts(path: Path, n: int) -> Path:
    """`n` prompts of ~50 tokens: 256 of them overflow one engine step's 4,096 tokens, so
    vLLM must spread prompts over steps (where it used to chunk them and kill the engine)."""
    write_sample_prompts(path, n=n)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "prompt": " ".join([r["prompt"]] * 4)}) + "\n" for r in rows))
    return path


def test_a_sampled_job_keeps_its_engine_and_a_shard_retried_after_an_engine_death_samples_the_same_text(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    prompts = long_prompts(tmp_path / "prompts.jsonl", 2000)
    out = tmp_path / "out"
    args = ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--shard-size", "200",
            "--max-tokens", "16", "--temperature", "1", "--seed", "7", "--json"]  # fmt: skip
    first = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert first.returncode == 0, first.stderr[-4000:]
    summary = summary_of(first)
    assert summary["engine_restarts"] == 0, "a sampled run lost its engine"
    assert (summary["rows_ok"], summary["rows_failed"]) == (2000, 0)
    assert "CPU Generator does not use offset" not in first.stderr
    texts = {r["custom_id"]: r["text"] for r in read_output(out).to_pylist()}
    assert len(set(texts.values())) > 1900, "sampling should give (nearly) every row its own text"
    no_engine_left()

    # Forget four shards and run them again; kill the engine once the first of them is
    # committed: the others are retried on a fresh engine, alone, in other batches.
    forgotten = sorted(markers(out))[:4]
    for marker in forgotten:
        marker.unlink()
        (out / f"part-{marker.stem}.parquet").unlink()
    log = tmp_path / "rerun.log"
    proc = start_cli(args, tmp_path / "home", log, api_url=prefect_server)
    wait_for(lambda: len(markers(out)) > 6 or proc.poll() is not None, 600, "the first re-run commit")
    assert proc.poll() is None, log.read_text()[-3000:]
    (core,) = engine_processes(("VLLM::EngineCore",))
    os.kill(core, signal.SIGKILL)
    done = finish(proc, log)
    assert done.returncode == 0, done.stderr[-4000:]
    rerun = summary_of(done)
    assert (rerun["shards_skipped"], rerun["shards_run"]) == (6, 4)
    assert rerun["engine_restarts"] >= 1
    again = {r["custom_id"]: r["text"] for r in read_output(out).to_pylist()}
    assert again == texts, "a row sampled other text when its shard ran again"
    no_engine_left()
