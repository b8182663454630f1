"""The command's head start: handed to the flow it calls, claimed on an exact match only;
anything else stops the run naming the difference, and never starts a second engine set."""

from __future__ import annotations

from typing import Any

import pytest

from prefect_vllm._engine.pool import VllmActorPool
from prefect_vllm._launch import headstart as _headstart
from prefect_vllm.config import ActorPoolConfig, EngineConfig
from prefect_vllm.exceptions import HeadStartMismatchError


@pytest.fixture
def stopped(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The head starts stopped (instead of shutting down real actors and Ray)."""
    calls: list[Any] = []
    monkeypatch.setattr(_headstart, "_stop", calls.append)
    return calls


def pool(**engine: Any) -> VllmActorPool:
    return VllmActorPool("/models/tiny", EngineConfig(**engine), ActorPoolConfig(num_actors=1))


def head(of: VllmActorPool | None, address: str | None = None) -> _headstart.HeadStart:
    return _headstart.HeadStart(of, address, {"runtime_env": {}}, 1.0, 0.0)


def test_the_pool_the_flow_builds_claims_the_head_start_handed_to_it(stopped: list[Any]) -> None:
    made = head(pool())
    assert _headstart.claim(pool(), None, {"runtime_env": {}}) is None, "nothing handed over: the flow starts"
    with _headstart.offered(made) as offer:
        assert _headstart.claim(pool(), None, {"runtime_env": {}}) is made
        assert offer.claimed and not stopped
        assert _headstart.claim(pool(), None, {"runtime_env": {}}) is None, "claimed once"
    assert _headstart.claim(pool(), None, {"runtime_env": {}}) is None, "handed to that flow run only"


@pytest.mark.parametrize(
    ("flow_pool", "address", "init_kwargs", "named"),
    [
        (
            pool(max_model_len=512),
            None,
            {"runtime_env": {}},
            "engine.max_model_len: None started, 512 needed",
        ),
        (
            pool(),
            "ray://head:10001",
            {"runtime_env": {}},
            "ray_address: None started, 'ray://head:10001' needed",
        ),
        (
            pool(),
            None,
            {"runtime_env": {"env_vars": {"A": "1"}}},
            "ray_init.runtime_env.env_vars.A: None started",
        ),
    ],
)
def test_a_head_start_made_for_anything_else_stops_the_run_naming_the_difference(
    stopped: list[Any], flow_pool: VllmActorPool, address: Any, init_kwargs: Any, named: str
) -> None:
    made = head(pool())
    with _headstart.offered(made) as offer, pytest.raises(HeadStartMismatchError) as refused:
        _headstart.claim(flow_pool, address, init_kwargs)
    message = str(refused.value)
    assert message.startswith("the engines the command started early do not match the flow's: ")
    assert named in message and "no second set was started" in message and "\n" not in message
    assert stopped == [made] and offer.claimed, "stopped once, by the claim"


def test_a_connection_for_a_warm_pool_is_never_claimed_as_engines(stopped: list[Any]) -> None:
    made = head(None)
    with _headstart.offered(made), pytest.raises(HeadStartMismatchError, match="warm pool"):
        _headstart.claim(pool(), None, {"runtime_env": {}})
    assert stopped == [made]


def test_a_head_start_nobody_claims_is_stopped(stopped: list[Any]) -> None:
    made = head(pool())
    _headstart.abandon(made)
    _headstart.abandon(None)
    assert stopped == [made]
