"""A job's identity and its warm pool's settings: pure logic."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefect_vllm._job import adopt_pool_settings
from prefect_vllm.config import EngineConfig
from prefect_vllm.exceptions import ConfigurationError


def test_a_job_without_engine_settings_takes_the_pools(tmp_path: Path) -> None:
    pool_engine = EngineConfig(max_model_len=512, engine_args={"max_num_seqs": 8})
    model, engine = adopt_pool_settings("p", str(tmp_path), pool_engine, str(tmp_path), None)
    assert (model, engine) == (str(tmp_path), pool_engine)


def test_engine_settings_given_as_the_defaults_are_honoured_not_replaced_by_the_pools(tmp_path: Path) -> None:
    pool_engine = EngineConfig(max_model_len=512)
    with pytest.raises(ConfigurationError, match=r"engine\.max_model_len \(pool: 512, job: null\)"):
        adopt_pool_settings("p", str(tmp_path), pool_engine, str(tmp_path), EngineConfig())
    assert (
        adopt_pool_settings("p", str(tmp_path), EngineConfig(), str(tmp_path), EngineConfig())[1]
        == EngineConfig()
    )


def test_command_line_engine_and_actor_flags_are_given_only_when_typed() -> None:
    from prefect_vllm._cli.common import engine_config, pool_config
    from prefect_vllm.cli import _parser
    from prefect_vllm.config import ActorPoolConfig

    bare = _parser().parse_args(["run", "in.jsonl", "--output", "out", "--model", "m"])
    assert (engine_config(bare), pool_config(bare)) == (None, None)
    typed = _parser().parse_args(
        ["run", "in.jsonl", "--output", "out", "--model", "m", "--tensor-parallel-size", "1", "--actors", "1"]
    )
    assert engine_config(typed) == EngineConfig(tensor_parallel_size=1)
    assert pool_config(typed) == ActorPoolConfig(num_actors=1)
    assert "num_actors" in pool_config(typed).model_fields_set


def test_sampling_and_recovery_flags_are_given_only_when_typed_and_the_models_own_the_defaults() -> None:
    from prefect_vllm._cli.common import recovery_config, sampling_config
    from prefect_vllm.cli import _parser
    from prefect_vllm.config import RecoveryConfig, SamplingConfig

    bare = _parser().parse_args(["run", "in.jsonl", "--output", "out", "--model", "m"])
    assert sampling_config(bare) is None
    assert recovery_config(bare) == RecoveryConfig() and recovery_config(bare).model_fields_set == set()
    typed = _parser().parse_args(
        ["run", "in.jsonl", "--output", "out", "--model", "m", "--temperature", "1.0", "--ignore-eos",
         "--probe-timeout", "60"]
    )  # fmt: skip
    sampling = sampling_config(typed)
    assert sampling == SamplingConfig(temperature=1.0, ignore_eos=True)
    assert sampling.model_fields_set == {"temperature", "ignore_eos"}, "an explicit default is kept as given"
    recovery = recovery_config(typed)
    assert recovery.probe_timeout_s == 60.0 and recovery.model_fields_set == {"probe_timeout_s"}
    help_text = _parser()._subparsers._group_actions[0].choices["run"].format_help()  # type: ignore[union-attr]
    assert f"(default {RecoveryConfig().max_job_restarts})" in help_text
    assert f"default {SamplingConfig().max_tokens}" in help_text


def test_the_same_folder_by_another_path_is_the_same_model(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "m")
    model, _ = adopt_pool_settings("p", str(tmp_path / "m"), EngineConfig(), str(tmp_path / "link"), None)
    assert model == str(tmp_path / "m"), "the pool's name for the model goes into the fingerprint"


def test_every_difference_from_the_pool_is_named(tmp_path: Path) -> None:
    pool_engine = EngineConfig(dtype="float32")
    job_engine = EngineConfig(dtype="bfloat16", max_model_len=256)
    with pytest.raises(ConfigurationError) as refused:
        adopt_pool_settings("nightly", "org/model-a", pool_engine, "org/model-b", job_engine)
    message = str(refused.value)
    assert message.startswith("pool: warm pool 'nightly' runs other settings than this job: ")
    assert "model (pool: 'org/model-a', job: 'org/model-b')" in message
    assert 'engine.dtype (pool: "float32", job: "bfloat16")' in message
    assert "engine.max_model_len (pool: null, job: 256)" in message
    assert "engine.engine_args" not in message, "only the settings that differ"
