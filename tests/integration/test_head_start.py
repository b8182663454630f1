"""The engines `prefect-vllm run` starts beside its server are handed to the flow it calls:
the flow claims them, and engines made for other settings stop the run, naming the
difference, instead of a silent second start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from prefect_vllm.testing import write_sample_prompts
from tests.helpers import REPO, cli_env, no_engine_left, read_output, summary_of

pytestmark = pytest.mark.integration

#: The command, with its early engines and the flow's own engine start watched; with
#: `--mismatch`, the early engines are made for another context length than the job's.
_COMMAND = """
import sys
from prefect_vllm._engine.pool import VllmActorPool
from prefect_vllm._launch import headstart

mismatch = sys.argv.pop(1) == "--mismatch"
real_start_early, real_start = headstart.start_early, VllmActorPool.start

def start_early(pool, address, api_url):
    print("test: engines started early", file=sys.stderr, flush=True)
    if mismatch:
        engine = pool.engine.model_copy(update={"max_model_len": 200})
        pool = VllmActorPool(pool.model, engine, pool.config, pool.hf_token)
    return real_start_early(pool, address, api_url)

def start(self, *args, **kwargs):
    print("test: the flow started engines of its own", file=sys.stderr, flush=True)
    return real_start(self, *args, **kwargs)

headstart.start_early, VllmActorPool.start = start_early, start

if __name__ == "__main__":
    from prefect_vllm.cli import main

    sys.exit(main(sys.argv[1:]))
"""


def _command(tmp_path: Path, api_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "command.py"
    script.write_text(_COMMAND)
    return subprocess.run(
        [sys.executable, str(script), *args], env=cli_env(tmp_path / "home", api_url),
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip


def test_the_flow_claims_the_engines_the_command_started_and_refuses_engines_made_for_other_settings(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=6, seed=3)
    job = [str(prompts), "--model", str(tiny_model), "--max-tokens", "4", "--shard-size", "3", "--json"]

    claimed = _command(tmp_path, prefect_server, "--match", "run", *job, "--output", str(tmp_path / "out"))
    assert claimed.returncode == 0, claimed.stderr[-3000:]
    assert "test: engines started early" in claimed.stderr
    assert "test: the flow started engines of its own" not in claimed.stderr, "the flow claimed them"
    assert summary_of(claimed)["rows_ok"] == 6 and read_output(tmp_path / "out").num_rows == 6

    other = tmp_path / "out-other"
    refused = _command(tmp_path, prefect_server, "--mismatch", "run", *job, "--output", str(other))
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert last == (
        "prefect-vllm: error: the engines the command started early do not match the flow's: "
        "engine.max_model_len: 200 started, None needed; no second set was started (this is a bug of "
        "prefect-vllm: please report it)"
    ), refused.stderr[-3000:]
    assert "test: the flow started engines of its own" not in refused.stderr
    assert "Traceback" not in refused.stderr and not list(other.glob("part-*"))
    no_engine_left()
