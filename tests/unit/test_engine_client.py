"""The shard tasks' engine client: failover, blame and frozen actors, with fake actors."""

from __future__ import annotations

from typing import Any

import pytest

from prefect_vllm._engine import client as client_module
from prefect_vllm._engine.client import UNSTARTED_RETRIES, EngineClient
from prefect_vllm._engine.isolation import ROW_COLUMNS
from prefect_vllm._engine.protocol import GenerateCall, GenerateResult, GenerateStarted
from prefect_vllm.exceptions import EngineCrashedError, EngineUnavailableError
from prefect_vllm.flows._ray import _stops_the_run

CALL = GenerateCall.of_prompts(["hi"], deadline_s=10.0)
DONE = GenerateResult(columns={name: [None] for name in ROW_COLUMNS}, pid=7, seconds=0.1)


class FakeActor:
    """An actor whose calls play a script: each call's stream yields (or raises) its items."""

    def __init__(self, name: str, calls: list[list[Any]], state: str = "ALIVE", answers: bool = True) -> None:
        self.name, self.calls, self.state, self.answers = name, calls, state, answers
        self.killed = 0
        self.generate = self
        self.info = self

    def options(self, **_kwargs: Any) -> FakeActor:
        return self

    def remote(self, *_args: Any) -> list[Any]:
        return list(self.calls.pop(0)) if self.calls else [GenerateStarted(1), DONE]


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def next_item(stream: list[Any], _timeout: float | None) -> Any:
        item = stream.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def kill(actor: FakeActor, no_restart: bool = True) -> None:
        actor.killed += 1

    monkeypatch.setattr(client_module, "_next_item", next_item)
    monkeypatch.setattr(client_module, "actor_state", lambda actor: actor.state)
    monkeypatch.setattr(EngineClient, "_answers", lambda self, index: self.handles[index].answers)
    monkeypatch.setattr(ray, "kill", kill)
    monkeypatch.setattr(client_module.time, "sleep", lambda _s: None)


def died() -> BaseException:
    import ray

    return ray.exceptions.RayActorError(error_msg="The actor died unexpectedly")


def timed_out() -> BaseException:
    import ray

    return ray.exceptions.GetTimeoutError("no answer")


def test_a_call_is_served_by_its_preferred_actor(fake_ray: None) -> None:
    a, b = FakeActor("a", []), FakeActor("b", [])
    assert EngineClient((a, b)).generate(CALL, preferred=1) == DONE
    assert not a.killed and not b.killed


def test_an_actor_dead_for_good_is_left_out_and_the_next_one_serves(fake_ray: None) -> None:
    a, b = FakeActor("a", [[died()]], state="DEAD"), FakeActor("b", [])
    assert EngineClient((a, b)).generate(CALL) == DONE


def test_when_every_actor_is_dead_the_call_fails_over_to_none(fake_ray: None) -> None:
    actors = (FakeActor("a", [[died()]], state="DEAD"), FakeActor("b", [[died()]], state="DEAD"))
    with pytest.raises(EngineUnavailableError, match="no live vLLM engine actor is left out of 2") as raised:
        EngineClient(actors).generate(CALL)
    assert raised.value.for_good, "no attempt of this run can be served: the run stops starting shards"
    assert _stops_the_run(raised.value) and _stops_the_run(EngineUnavailableError("all restarting")) is None


def test_a_death_after_the_call_started_is_the_rows_and_the_caller_decides(fake_ray: None) -> None:
    a = FakeActor("a", [[GenerateStarted(1), died()]])
    with pytest.raises(EngineCrashedError, match="died during the call") as crashed:
        EngineClient((a,)).generate(CALL)
    assert crashed.value.actor_index == 0 and not crashed.value.hung


def test_calls_lost_before_they_started_are_sent_again_then_count_as_a_death(fake_ray: None) -> None:
    a = FakeActor("a", [[died()] for _ in range(UNSTARTED_RETRIES - 1)])
    assert EngineClient((a,)).generate(CALL) == DONE, "lost calls are resent without blame"
    a = FakeActor("a", [[died()] for _ in range(UNSTARTED_RETRIES)])
    with pytest.raises(EngineCrashedError, match=f"died {UNSTARTED_RETRIES} times before the call started"):
        EngineClient((a,)).generate(CALL)


def test_a_restarting_actor_is_skipped_and_waited_for_when_none_can_take_the_call(fake_ray: None) -> None:
    a = FakeActor("a", [[died()], [died()]], state="RESTARTING")
    b = FakeActor("b", [[died()]], state="RESTARTING")
    assert EngineClient((a, b)).generate(CALL) == DONE
    assert not a.killed and not b.killed, "a restarting actor is never killed"


def test_a_call_waiting_its_turn_behind_others_is_not_blamed_nor_killed(fake_ray: None) -> None:
    a = FakeActor("a", [[timed_out(), timed_out(), GenerateStarted(1), DONE]])
    assert EngineClient((a,), probe_timeout_s=1.0).generate(CALL) == DONE
    assert not a.killed


def test_an_actor_that_answers_nothing_is_killed_and_the_unstarted_rows_go_elsewhere(fake_ray: None) -> None:
    frozen = FakeActor("a", [[timed_out()]], answers=False)
    b = FakeActor("b", [])
    assert EngineClient((frozen, b), probe_timeout_s=1.0).generate(CALL) == DONE
    assert frozen.killed == 1


def test_a_call_stuck_after_it_started_is_a_hang_and_its_actor_is_killed(fake_ray: None) -> None:
    a = FakeActor("a", [[GenerateStarted(1), timed_out()]])
    with pytest.raises(EngineCrashedError, match="hung past the call's deadline") as hung:
        EngineClient((a,)).generate(CALL)
    assert hung.value.hung and a.killed == 1


def test_a_calls_rows_cross_ray_msgpack_encoded_and_come_back_the_same() -> None:
    import pickle

    import ray.cloudpickle

    from prefect_vllm._engine.protocol import EngineRow, GenerateCall

    rows = [
        EngineRow(prompt="hi", sampling={"n": 2}),
        EngineRow(messages=[{"role": "user", "content": "hi"}], adapter="pirate"),
        EngineRow(prompt=[1, 2, 3]),
        EngineRow(prompt="q", documents=["a", "b"], top_n=1),
        EngineRow(error="bad"),
    ]
    call = GenerateCall(rows=rows, seeds=[1, None, 2, None, None], exclusive=True, deadline_s=5.0)
    sent = ray.cloudpickle.dumps(call)
    assert b"pirate" in sent and b"EngineRow" not in sent, "one msgpack blob, not pickled objects"
    assert pickle.loads(sent) == call


def test_an_engines_answer_about_itself_is_typed_and_an_older_actors_dict_still_reads() -> None:
    from prefect_vllm._engine.protocol import EngineInfo

    older = EngineInfo.of({"pid": 7, "tasks": ["embed"], "deaths": ["killed by SIGKILL"], "unknown": 1})
    assert older == EngineInfo(pid=7, tasks=("embed",), deaths=("killed by SIGKILL",))
    assert older.max_model_len is None and EngineInfo.of(older) is older
    assert older.as_dict()["tasks"] == ["embed"] and older.as_dict()["gpus"] == []
