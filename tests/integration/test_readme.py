"""The README's Python snippet, run as a new user runs it: a script, no Prefect server configured."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_vllm.testing import write_sample_prompts
from tests.helpers import REPO, cli_env, no_engine_left

pytestmark = pytest.mark.integration


def readme_python_snippet() -> str:
    """The first Python block of the README's "### Python" section."""
    section = (REPO / "README.md").read_text().split("### Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README has no Python snippet under ### Python"
    return match.group(1)


def test_the_readme_python_snippet_runs_with_one_temporary_server_and_refuses_a_changed_job_in_one_line(
    tmp_path: Path, tiny_model: Path
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=64)
    out = tmp_path / "out-python"
    code = (
        readme_python_snippet()
        .replace("/tmp/prompts.jsonl", str(prompts))
        .replace("/tmp/out-python", str(out))
        .replace("/tmp/tiny-llama", str(tiny_model))
    )
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = cli_env(tmp_path / "home")  # no PREFECT_API_URL: Prefect starts a temporary server
    assert not any(k == "PREFECT_API_URL" for k in env)
    # That server's telemetry cannot reach the internet here, and its writes race the run's
    # for the SQLite file ("database is locked" from Prefect's own service, not ours).
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-4000:]
    assert done.stdout.strip().splitlines()[-1].startswith("64 0 [] "), done.stdout[-2000:]
    # One server for the run: Ray workers reach it instead of starting their own.
    assert logs.count("Starting temporary server") == 1, logs[-4000:]
    assert "database is locked" not in logs
    no_engine_left()

    script.write_text(code.replace("max_tokens=32", "max_tokens=16"))
    refused = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert refused.returncode == 1
    raised = [ln for ln in refused.stderr.splitlines() if ln.startswith("prefect_vllm.exceptions.")]
    assert len(raised) == 1 and raised[0].startswith("prefect_vllm.exceptions.FingerprintMismatchError: "), (
        raised
    )
    assert "sampling.max_tokens (32 -> 16)" in raised[0]
    assert refused.stderr.count("Traceback (most recent call last)") == 1, (
        "only Python's own, for the raised exception"
    )
    assert "FingerprintMismatchError" not in refused.stdout
    assert os.listdir(out), "the refused run left the job as it was"
