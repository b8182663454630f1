"""Which source wins for each of a run's settings, and which combinations are refused."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import SecretStr

from prefect_vllm._input.planning import InputColumns
from prefect_vllm.blocks import RayCluster, VllmModel
from prefect_vllm.config import ActorPoolConfig, EngineConfig, RequestConfig, SamplingConfig
from prefect_vllm.exceptions import ConfigurationError
from prefect_vllm.flows._resolve import resolve_settings

WHEN = dt.datetime(2026, 3, 1, 2, 0, tzinfo=dt.timezone.utc)


def test_parameters_alone_get_the_defaults_and_dated_paths() -> None:
    settings = resolve_settings(input="/in/{yesterday}.jsonl", output="/out/{date}", model="m", when=WHEN)
    assert (settings.input, settings.output) == ("/in/2026-02-28.jsonl", "/out/2026-03-01")
    assert settings.model == "m"
    assert settings.engine == EngineConfig()
    assert settings.sampling == SamplingConfig()
    assert settings.requests == RequestConfig()
    assert settings.columns == InputColumns()
    assert settings.pool == ActorPoolConfig()
    assert (settings.warm_pool, settings.ray_address, settings.runtime_env, settings.hf_token) == (
        None,
        None,
        {},
        None,
    )


def test_a_model_block_gives_model_engine_and_token_and_its_sampling_is_only_a_default() -> None:
    block = VllmModel(
        model="/models/m",
        max_model_len=512,
        sampling=SamplingConfig(max_tokens=7),
        hf_token=SecretStr("hf_x"),
    )
    settings = resolve_settings(input="i", output="o", model="ignored", model_block=block, when=WHEN)
    assert settings.model == "/models/m"
    assert settings.engine == block.engine_config()
    assert settings.sampling.max_tokens == 7
    assert settings.hf_token is not None and settings.hf_token.get_secret_value() == "hf_x"
    assert "hf_x" not in repr(settings)
    own = resolve_settings(
        input="i", output="o", model="m", model_block=block, sampling=SamplingConfig(max_tokens=3), when=WHEN
    )
    assert own.sampling.max_tokens == 3


def test_the_sampling_fields_given_are_set_over_a_model_blocks_an_explicit_default_too() -> None:
    block = VllmModel(model="m", sampling=SamplingConfig(max_tokens=7, temperature=0.2, seed=5))
    given = resolve_settings(
        input="i", output="o", model="m", model_block=block, sampling=SamplingConfig(max_tokens=3), when=WHEN
    )
    assert (given.sampling.max_tokens, given.sampling.temperature, given.sampling.seed) == (3, 0.2, 5)
    typed_default = resolve_settings(
        input="i",
        output="o",
        model="m",
        model_block=block,
        sampling=SamplingConfig(temperature=1.0),
        when=WHEN,
    )
    assert (typed_default.sampling.max_tokens, typed_default.sampling.temperature) == (7, 1.0)
    from_json = SamplingConfig.model_validate({"seed": 0})  # a deployment's parameters arrive as JSON
    assert resolve_settings(
        input="i", output="o", model="m", model_block=block, sampling=from_json, when=WHEN
    ).sampling == SamplingConfig(max_tokens=7, temperature=0.2, seed=0)


def test_engine_settings_beside_a_model_block_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"^engine: give engine settings in the VllmModel block"):
        resolve_settings(
            input="i",
            output="o",
            model="m",
            model_block=VllmModel(model="m"),
            engine=EngineConfig(),
            when=WHEN,
        )


def test_a_cluster_block_gives_address_environment_actors_and_a_default_warm_pool() -> None:
    cluster = RayCluster(
        address="ray://head:10001",
        runtime_env={"env_vars": {"A": "1"}},
        actors=ActorPoolConfig(num_actors=3),
        warm_pool="night",
    )
    settings = resolve_settings(input="i", output="o", model="m", cluster=cluster, when=WHEN)
    assert settings.ray_address == "ray://head:10001"
    assert settings.runtime_env == {"env_vars": {"A": "1"}}
    assert settings.pool.num_actors == 3
    assert settings.warm_pool == "night"
    assert settings.engine is None, "left for the warm pool's settings"
    same_address = resolve_settings(
        input="i",
        output="o",
        model="m",
        cluster=cluster,
        ray_address="ray://head:10001",
        warm_pool="day",
        when=WHEN,
    )
    assert same_address.warm_pool == "day"
    settings.runtime_env["env_vars"] = {}
    assert cluster.runtime_env == {"env_vars": {"A": "1"}}, "the block is not changed through the settings"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"pool": ActorPoolConfig()}, r"^pool: give actor settings in the RayCluster block or in `pool`"),
        ({"ray_address": "auto"}, r"^ray_address: give the address in the RayCluster block or here"),
    ],
)
def test_settings_given_twice_beside_a_cluster_block_are_refused(
    extra: dict[str, object], message: str
) -> None:
    cluster = RayCluster(address="ray://head:10001")
    with pytest.raises(ConfigurationError, match=message):
        resolve_settings(input="i", output="o", model="m", cluster=cluster, when=WHEN, **extra)  # type: ignore[arg-type]


def test_lora_adapters_on_a_warm_pool_are_refused_from_a_parameter_or_a_block() -> None:
    lora = RequestConfig(lora_dir="/adapters")
    with pytest.raises(ConfigurationError, match=r"^pool: LoRA adapters \(lora_dir\) need engines started"):
        resolve_settings(input="i", output="o", model="m", requests=lora, warm_pool="p", when=WHEN)
    with pytest.raises(ConfigurationError, match=r"^pool: LoRA adapters"):
        resolve_settings(
            input="i", output="o", model="m", requests=lora, cluster=RayCluster(warm_pool="p"), when=WHEN
        )
    own_engines = resolve_settings(input="i", output="o", model="m", requests=lora, when=WHEN)
    assert own_engines.requests.lora_dir == "/adapters"


def test_a_path_with_another_field_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"only \{date\} and \{yesterday\}"):
        resolve_settings(input="/in/{month}", output="o", model="m", when=WHEN)
