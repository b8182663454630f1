"""Engines that cannot start end the run with one clear error, in bounded time, leaving nothing behind."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from prefect_vllm.testing import write_sample_prompts
from tests.helpers import no_engine_left, ray_processes, run_cli, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def broken_model(tiny_model: Path, tmp_path: Path, **overrides: object) -> Path:
    """A copy of the tiny model whose config.json has `overrides` applied."""
    model = tmp_path / "broken-model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config.update(overrides)
    (model / "config.json").write_text(json.dumps(config, indent=2))
    return model


def test_a_model_config_that_is_not_json_is_refused_with_exit_2_before_any_engine(
    tmp_path: Path, tiny_model: Path, prefect_server: str
) -> None:
    model = tmp_path / "broken-model"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n  "hidden_size": 128,,\n}')
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=4)
    done = run_cli(
        ["run", str(prompts), "--output", str(tmp_path / "out"), "--model", str(model)],
        tmp_path,
        api_url=prefect_server,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"{model / 'config.json'}, line 2: not valid JSON" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown-architecture", "NoSuchModelForCausalLM"),
        ("kv-cache-too-large", "memory"),
    ],
)
def test_an_engine_that_cannot_start_ends_the_run_with_exit_1_in_bounded_time(
    tmp_path: Path, tiny_model: Path, case: str, expected: str, prefect_server: str
) -> None:
    model, engine_args = tiny_model, "{}"
    if case == "unknown-architecture":
        model = broken_model(tiny_model, tmp_path, architectures=["NoSuchModelForCausalLM"])
    else:
        engine_args = json.dumps({"kv_cache_memory_bytes": 1 << 50})  # a petabyte
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=8)
    started = time.monotonic()
    done = run_cli(
        ["run", str(prompts), "--output", str(tmp_path / "out"), "--model", str(model), "--actors", "2",
         "--engine-args", engine_args],
        tmp_path / "home",
        timeout=600,
        api_url=prefect_server,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-3000:]
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("prefect-vllm: error: the vLLM engine"), last_line
    assert expected.lower() in last_line.lower(), last_line
    assert elapsed < 240, f"start failure took {elapsed:.0f} s: a crash loop?"
    no_engine_left()
    wait_for(lambda: not ray_processes(), 60, "every Ray process to exit")
