"""A run with a secret token leaves no trace of it, nor of prompts, in logs, artifacts or output."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import no_engine_left, wait_for

pytestmark = pytest.mark.integration

TOKEN = "hf_NotReal0Secret4Test9Token"
PROMPT_WORD = "Quixotically"


def flow_run_traces(flow_run_id: Any) -> str:
    """Everything the Prefect server keeps about a flow run: the run, its tasks, logs, artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    async def read() -> str:
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            tasks = await client.read_task_runs(flow_run_filter=runs)
            artifacts = await client.read_artifacts(flow_run_filter=runs)
            parts = [run.model_dump_json(), *(t.model_dump_json() for t in tasks)]
            parts += [a.model_dump_json() for a in artifacts] + [log.message for log in logs]
            return "\n".join(parts)

    from prefect.logging.handlers import APILogHandler

    def complete() -> str | None:
        text = asyncio.run(read())
        return text if " complete: " in text else None

    APILogHandler().flush()  # the flow's own logs are sent by a background worker
    return str(wait_for(complete, 60, "the run's last log line on the server", interval=1.0))


def test_secret_token_and_prompts_appear_nowhere(
    tmp_path: Path, tiny_model: Path, prefect_server: str, capfd: pytest.CaptureFixture[str]
) -> None:
    from prefect_vllm.blocks import VllmModel
    from prefect_vllm.config import SamplingConfig
    from prefect_vllm.flows import batch_inference

    VllmModel(model=str(tiny_model), hf_token=TOKEN).save("secret-model", overwrite=True)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"custom_id": f"r{i}", "prompt": f"{PROMPT_WORD} tell me about cat {i}."} for i in range(12)]
    rows.append({"custom_id": "too-long", "prompt": f"{PROMPT_WORD} " * 3000})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"

    state = batch_inference(
        input=str(prompts),
        output=str(out),
        model=VllmModel.load("secret-model"),
        shard_size=8,
        sampling=SamplingConfig(max_tokens=4, temperature=0),
        return_state=True,
    )
    result = state.result()
    assert (result.rows_ok, result.rows_failed) == (12, 1)
    captured = capfd.readouterr()
    traces = {
        "console": captured.out + captured.err,
        "prefect": flow_run_traces(state.state_details.flow_run_id),
    }
    # Read from the run's logs on the server: the console's format depends on what
    # configured logging earlier in the session.
    assert "Hugging Face token set" in traces["prefect"], "the token did not reach the engines"
    for path in out.rglob("*"):
        if path.is_file():
            traces[str(path)] = path.read_bytes().decode("utf-8", "replace")
    for path in Path(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "session_latest", "logs").rglob("*"):
        if path.is_file():
            traces[str(path)] = path.read_bytes().decode("utf-8", "replace")
    assert len(traces) > 10
    leaks = [where for where, text in traces.items() if TOKEN in text]
    assert not leaks, f"the token leaked into {leaks}"
    prompt_leaks = [where for where in ("console", "prefect") if PROMPT_WORD in traces[where]]
    assert not prompt_leaks, f"prompt text was logged in {prompt_leaks}"
    no_engine_left()
