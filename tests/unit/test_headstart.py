"""The command's head start: only an exact match is claimed, anything else is stopped."""

from __future__ import annotations

from typing import Any

import pytest

from prefect_vllm._engine.pool import VllmActorPool
from prefect_vllm._launch import headstart as _headstart
from prefect_vllm.config import ActorPoolConfig, EngineConfig


@pytest.fixture
def stopped(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The head starts stopped (instead of shutting down real actors and Ray)."""
    calls: list[Any] = []
    monkeypatch.setattr(_headstart, "_stop", calls.append)
    monkeypatch.setattr(_headstart, "_started", None)
    return calls


def pool(**engine: Any) -> VllmActorPool:
    return VllmActorPool("/models/tiny", EngineConfig(**engine), ActorPoolConfig(num_actors=1))


def head(of: VllmActorPool | None, address: str | None = None) -> _headstart.HeadStart:
    return _headstart.HeadStart(of, address, {"runtime_env": {}}, 1.0, 0.0)


def test_the_pool_the_flow_builds_claims_the_head_start_made_for_it(
    stopped: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    made = head(pool())
    monkeypatch.setattr(_headstart, "_started", made)
    assert _headstart.claim(pool(), None, {"runtime_env": {}}) is made
    assert not stopped
    assert _headstart.claim(pool(), None, {"runtime_env": {}}) is None, "claimed once"


@pytest.mark.parametrize(
    ("flow_pool", "address", "init_kwargs"),
    [
        (pool(max_model_len=512), None, {"runtime_env": {}}),  # other engine settings
        (pool(), "ray://head:10001", {"runtime_env": {}}),  # another cluster
        (pool(), None, {"runtime_env": {"env_vars": {"A": "1"}}}),  # another runtime environment
    ],
)
def test_a_head_start_made_for_anything_else_is_stopped(
    stopped: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    flow_pool: VllmActorPool,
    address: Any,
    init_kwargs: Any,
) -> None:
    made = head(pool())
    monkeypatch.setattr(_headstart, "_started", made)
    assert _headstart.claim(flow_pool, address, init_kwargs) is None
    assert stopped == [made]


def test_a_connection_for_a_warm_pool_is_never_claimed_as_engines(
    stopped: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    made = head(None)
    monkeypatch.setattr(_headstart, "_started", made)
    assert _headstart.claim(pool(), None, {"runtime_env": {}}) is None
    assert stopped == [made]


def test_a_head_start_nobody_claims_is_stopped_once(
    stopped: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    made = head(pool())
    monkeypatch.setattr(_headstart, "_started", made)
    _headstart.abandon()
    _headstart.abandon()
    assert stopped == [made]
