"""The VllmModel block round-trips through a real Prefect server; its token stays secret."""

from __future__ import annotations

import pytest

from prefect_vllm.blocks import VllmModel
from prefect_vllm.config import EngineConfig

pytestmark = pytest.mark.integration


def test_model_block_saves_loads_and_yields_engine_settings(prefect_server: None) -> None:
    block = VllmModel(
        model="/models/tiny", dtype="float32", engine_args={"max_num_seqs": 8}, hf_token="hf_secret"
    )
    block.save("tiny-test", overwrite=True)
    loaded = VllmModel.load("tiny-test")
    assert loaded.model == "/models/tiny"
    assert loaded.hf_token is not None and loaded.hf_token.get_secret_value() == "hf_secret"
    assert "hf_secret" not in repr(loaded) and "hf_secret" not in loaded.model_dump_json()
    assert loaded.engine_config() == EngineConfig(dtype="float32", engine_args={"max_num_seqs": 8})
