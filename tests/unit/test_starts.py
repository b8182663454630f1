"""The suite's start counter (`tests/starts.py`): what it counts, and its end-of-run screen."""

from __future__ import annotations

from tests.starts import KINDS, _kind, render, summarize


def test_each_kind_is_told_by_its_command_line() -> None:
    assert _kind("VLLM::EngineCore") == "engine"
    assert _kind(
        "/venv/bin/python -m uvicorn --app-dir /p --factory prefect.server.api.server:create_app"
    ) == ("Prefect server")
    assert _kind("/venv/bin/python /venv/bin/prefect server start --port 4200") == "Prefect server"
    assert (
        _kind("/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --port=6379")
        == "Ray cluster"
    )
    for other in (
        "ray::VllmEngineActor",
        "VLLM::Worker",
        "/venv/bin/python -m pytest",
        "raylet --gcs_server",
    ):
        assert _kind(other) is None, other


def test_the_tally_adds_up_each_kind_over_tests_and_lists_the_slowest_first() -> None:
    tests = {
        "a": {"s": 10.0, "starts": {"engine": 2}, "alive_s": {"engine": 12.5, "Ray cluster": 9.0}},
        "b": {"s": 30.0, "starts": {"engine": 1, "raw vLLM": 1}, "alive_s": {"raw vLLM": 20.0}},
        "c": {"s": 1.0, "starts": {}, "alive_s": {}},
    }
    tally = summarize(tests)
    assert tally["kinds"]["engine"] == {"started": 3, "alive_s": 12.5}
    assert tally["kinds"]["raw vLLM"] == {"started": 1, "alive_s": 20.0}
    assert tally["kinds"]["Prefect server"] == {"started": 0, "alive_s": 0.0}
    assert [row["test"] for row in tally["slowest"]] == ["b", "a", "c"]
    screen = render(tally)
    assert len(screen) <= 4 + len(KINDS) + 12 and "1 engine, 1 raw vLLM" in screen[-3]
