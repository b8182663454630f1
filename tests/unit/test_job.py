"""A job's identity and its warm pool's settings: pure logic."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefect_vllm._job import adopt_pool_settings
from prefect_vllm.config import EngineConfig
from prefect_vllm.exceptions import ConfigurationError


def test_a_job_without_engine_settings_takes_the_pools(tmp_path: Path) -> None:
    pool_engine = EngineConfig(max_model_len=512, engine_args={"max_num_seqs": 8})
    model, engine = adopt_pool_settings("p", str(tmp_path), pool_engine, str(tmp_path), EngineConfig())
    assert (model, engine) == (str(tmp_path), pool_engine)


def test_the_same_folder_by_another_path_is_the_same_model(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "m")
    model, _ = adopt_pool_settings(
        "p", str(tmp_path / "m"), EngineConfig(), str(tmp_path / "link"), EngineConfig()
    )
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
