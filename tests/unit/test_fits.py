"""Actors are refused before any engine starts when the cluster's nodes cannot hold them:
an actor's GPUs (a tensor-parallel engine's) are never split across nodes."""

from __future__ import annotations

import pytest

from prefect_vllm._engine.placement import check_fits
from prefect_vllm.config import ActorPoolConfig
from prefect_vllm.exceptions import ConfigurationError

TWO_NODES = [{"CPU": 2.0, "GPU": 2.0, "memory": 1e9}, {"CPU": 2.0, "GPU": 2.0, "memory": 1e9}]


def refusal(actors: int, gpus: float, nodes: list[dict[str, float]], **pool: object) -> str:
    with pytest.raises(ConfigurationError) as refused:
        check_fits(ActorPoolConfig(num_actors=actors, num_cpus=0.25, **pool), gpus, nodes)  # type: ignore[arg-type]
    return str(refused.value)


def test_actors_that_fill_every_node_fit() -> None:
    check_fits(ActorPoolConfig(num_actors=4, num_cpus=0.25), 1.0, TWO_NODES)
    check_fits(ActorPoolConfig(num_actors=2, num_cpus=0.25), 2.0, TWO_NODES)
    check_fits(ActorPoolConfig(num_actors=8, num_cpus=0.25), 0.0, TWO_NODES)


def test_more_gpus_than_the_cluster_has_in_all_names_both_counts() -> None:
    assert refusal(3, 2.0, TWO_NODES) == (
        "3 engine actors reserve 6 GPU in all, but this Ray cluster has 4: ask for fewer actors (--actors)"
    )


def test_an_actor_bigger_than_every_node_is_refused_although_the_cluster_has_enough_in_all() -> None:
    assert refusal(1, 4.0, TWO_NODES) == (
        "an engine actor reserves 4 GPU (--gpus-per-actor, by default --tensor-parallel-size), but no node "
        "of this Ray cluster has more than 2 GPU: an actor's GPU must all be on one node"
    )


def test_actors_that_fit_in_all_but_not_node_by_node_say_how_many_fit() -> None:
    three_gpu_nodes = [{"CPU": 4.0, "GPU": 3.0}, {"CPU": 4.0, "GPU": 3.0}]
    assert refusal(3, 2.0, three_gpu_nodes) == (
        "3 engine actors of 0.25 CPU, 2 GPU each do not fit this Ray cluster's nodes, which hold 2 at once "
        "(1 + 1 by node): ask for fewer actors (--actors 2)"
    )


def test_an_actor_whose_resources_no_one_node_has_together_is_refused() -> None:
    apart = [{"CPU": 2.0}, {"CPU": 0.0, "GPU": 1.0}]
    assert "no node of this Ray cluster has all of it" in refusal(1, 1.0, apart)


def test_a_custom_resource_is_named_with_its_flag() -> None:
    assert "(--actor-resources)" in refusal(
        1, 0.0, [{"CPU": 2.0, "engine": 1.0}] * 2, resources={"engine": 2}
    )


def test_actors_that_reserve_nothing_fit_any_cluster() -> None:
    check_fits(ActorPoolConfig(num_actors=3, num_cpus=0), 0.0, TWO_NODES)
