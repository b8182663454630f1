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
