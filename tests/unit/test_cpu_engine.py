"""The one-process CPU engine patches vLLM internals: a vLLM that moved them is caught here,
and at run time such an engine starts in vLLM's own layout, never half patched."""

from __future__ import annotations

import logging

import pytest

from prefect_vllm._engine import cpu


def test_every_vllm_internal_the_one_process_engine_patches_is_where_it_expects() -> None:
    """Fails on a vLLM release that moved one: `_engine/cpu.py` must follow it first."""
    assert cpu.moved_internals() == []


def test_an_engine_whose_patch_cannot_apply_starts_in_vllms_own_layout_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from vllm.utils import system_utils

    monkeypatch.delattr(system_utils, "_maybe_force_spawn")
    kwargs = {"model": "m", "enforce_eager": True}
    with caplog.at_level(logging.WARNING, logger="prefect_vllm.engine"):
        assert cpu.one_process_engine(dict(kwargs)) == kwargs, "no executor chosen: vLLM's own"
    (line,) = [r.getMessage() for r in caplog.records]
    assert "vllm.utils.system_utils._maybe_force_spawn is gone" in line and "vLLM's own layout" in line


def test_an_internal_whose_parameters_changed_is_named_with_what_it_takes_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.v1.engine import core

    monkeypatch.setattr(core, "set_process_title", lambda title: None)
    assert cpu.moved_internals() == [
        "vllm.v1.engine.core.set_process_title takes (title), not (name, suffix, prefix)"
    ]


def test_a_tensor_parallel_cpu_engine_is_vllms_multiprocess_layout_with_each_worker_on_its_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(cpu.THREADS_BIND_ENV, raising=False)
    monkeypatch.setattr(cpu, "_numa_nodes", lambda: 1)
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {3, 1, 2, 0})
    kwargs = {"model": "m", "tensor_parallel_size": 2}
    assert cpu.cpu_engine(dict(kwargs)) == {**kwargs, cpu.EXECUTOR_ARG: "mp"}
    assert cpu.os.environ[cpu.THREADS_BIND_ENV] == "0,1|2,3"


def test_a_users_executor_and_thread_binding_and_a_machine_with_a_numa_node_per_worker_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kwargs = {"model": "m", "tensor_parallel_size": 2, cpu.EXECUTOR_ARG: "ray"}
    monkeypatch.setenv(cpu.THREADS_BIND_ENV, "4-7|8-11")
    assert cpu.cpu_engine(dict(kwargs)) == kwargs
    assert cpu.os.environ[cpu.THREADS_BIND_ENV] == "4-7|8-11"
    monkeypatch.delenv(cpu.THREADS_BIND_ENV)
    monkeypatch.setattr(cpu, "_numa_nodes", lambda: 2)
    cpu.multiprocess_engine({"model": "m", "pipeline_parallel_size": 2})
    assert cpu.THREADS_BIND_ENV not in cpu.os.environ, "vLLM binds one NUMA node per worker itself"


@pytest.mark.parametrize(
    ("ranks", "cpus", "binding"),
    [
        (2, [0, 1], "0|1"),
        (2, [0, 1, 2, 3, 4], "0,1,2|3,4"),
        (4, [8, 9, 10, 11], "8|9|10|11"),
        (3, [4, 5], "4|5|4"),
    ],
)
def test_thread_binding_shares(ranks: int, cpus: list[int], binding: str) -> None:
    assert cpu.threads_binding(ranks, cpus) == binding
