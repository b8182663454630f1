"""Whether a pool's engine actors fit the Ray cluster, node by node, before any is created.

An actor's GPUs must all be on one node (vLLM's tensor-parallel workers share it), so
the cluster's total is not the answer: each node holds as many actors as its free CPUs
and GPUs allow. A cluster that may grow (an autoscaler publishes its node types) is
not refused: its actors wait for the nodes it adds.
"""

from __future__ import annotations

from prefect_vllm.config import ActorPoolConfig
from prefect_vllm.exceptions import ConfigurationError

__all__ = ["check_fits", "cluster_grows"]


def cluster_grows() -> bool:
    """Whether an autoscaler may add nodes to the connected cluster (KubeRay's and the
    cluster launcher's publish their node types): actors that no node holds today then
    wait for one instead of being refused."""
    try:
        from ray._private import state

        return state.state.get_cluster_config() is not None
    except Exception:  # an older Ray, or a client connection: assume it does not grow
        return False


def check_fits(cfg: ActorPoolConfig, num_gpus: float, nodes: list[dict[str, float]]) -> None:
    """Raise when the actors cannot all be placed on the cluster's nodes at once.

    An actor's reservation is never split across nodes (its engine's workers are its
    own child processes): each actor needs one node with all of it, which is what a
    tensor-parallel engine needs of its GPUs.

    Examples:
        ```python
        from prefect_vllm._engine.placement import check_fits
        from prefect_vllm.config import ActorPoolConfig
        from prefect_vllm.exceptions import ConfigurationError

        two_nodes = [{"CPU": 2.0, "GPU": 2.0}, {"CPU": 2.0, "GPU": 2.0}]
        check_fits(ActorPoolConfig(num_actors=4, num_cpus=0.5), 1.0, two_nodes)
        try:
            check_fits(ActorPoolConfig(num_actors=1, num_cpus=0.5), 4.0, two_nodes)
        except ConfigurationError as exc:
            assert "no node of this Ray cluster has more than 2 GPU" in str(exc)
        ```
    """
    per_actor = {
        name: amount
        for name, amount in {"CPU": cfg.num_cpus, "GPU": num_gpus, **cfg.resources}.items()
        if amount > 0
    }
    if not per_actor:  # reserves nothing: fits anywhere
        return
    totals = {name: sum(node.get(name, 0.0) for node in nodes) for name in per_actor}
    short = {
        name: (amount * cfg.num_actors, totals[name])
        for name, amount in per_actor.items()
        if amount * cfg.num_actors > totals[name] + 1e-9
    }
    if short:
        name, (need, have) = next(iter(short.items()))
        hint = ""
        if name == "CPU" and have > 0:
            hint = f", or --cpus-per-actor {have / cfg.num_actors:g} (CPU engines share the cores anyway)"
        raise ConfigurationError(
            f"{cfg.num_actors} engine actors reserve {need:g} {name} in all, but this Ray cluster has "
            f"{have:g}: ask for fewer actors (--actors){hint}"
        )
    for name, amount in per_actor.items():
        most = max((node.get(name, 0.0) for node in nodes), default=0.0)
        if amount > most + 1e-9:
            flag = {"GPU": "--gpus-per-actor, by default --tensor-parallel-size", "CPU": "--cpus-per-actor"}
            raise ConfigurationError(
                f"an engine actor reserves {amount:g} {name} ({flag.get(name, '--actor-resources')}), but "
                f"no node of this Ray cluster has more than {most:g} {name}: an actor's {name} must all "
                "be on one node"
            )
    held = [
        min(int(node.get(name, 0.0) / amount + 1e-9) for name, amount in per_actor.items()) for node in nodes
    ]
    each = ", ".join(f"{amount:g} {name}" for name, amount in per_actor.items())
    if sum(held) == 0:
        raise ConfigurationError(
            f"an engine actor reserves {each}, but no node of this Ray cluster has all of it: an "
            "actor's resources must all be on one node"
        )
    if sum(held) < cfg.num_actors:
        raise ConfigurationError(
            f"{cfg.num_actors} engine actors of {each} each do not fit this Ray cluster's nodes, which hold "
            f"{sum(held)} at once ({' + '.join(str(n) for n in held if n)} by node): ask for fewer actors "
            f"(--actors {sum(held)})"
        )
