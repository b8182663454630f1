"""An actor's record of why its engines died, read back by its next process."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefect_vllm._engine import deaths


def test_causes_recorded_by_earlier_processes_are_read_back_oldest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "deaths"
    assert deaths.recorded_deaths(folder, "abc") == []
    deaths.record_death(folder, "abc", "killed by SIGKILL")
    deaths.record_death(folder, "abc", "crashed: RuntimeError: boom")
    deaths.record_death(folder, "other", deaths.HANG_CAUSE)
    assert deaths.recorded_deaths(folder, "abc") == ["killed by SIGKILL", "crashed: RuntimeError: boom"]
    assert deaths.recorded_deaths(folder, "other") == [deaths.HANG_CAUSE]


def test_a_torn_line_of_the_record_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed while appending leaves half a line; the rest of the record stands."""
    deaths.record_death(tmp_path, "abc", "killed by SIGKILL")
    with open(tmp_path / "abc.jsonl", "a", encoding="utf-8") as f:
        f.write('{"cause": "crash')
    assert deaths.recorded_deaths(tmp_path, "abc") == ["killed by SIGKILL"]


def test_signals_are_named_and_unknown_numbers_still_say_what_they_are() -> None:
    assert deaths.signal_name(9) == "SIGKILL"
    assert deaths.signal_name(11) == "SIGSEGV"
    assert deaths.signal_name(250) == "signal 250"


def test_the_engine_log_cause_is_the_engine_process_error_not_the_front_end_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The front end's `EngineDeadError` says "see above"; the engine's own error is the cause."""
    log = tmp_path / "worker.err"
    log.write_text(
        "(EngineCore pid=7) ERROR 11-29 03:43:24 [core.py:1] RuntimeError: an old start-up error\n"
    )
    since = {str(log): log.stat().st_size}
    with log.open("a") as f:
        f.write(
            "(EngineCore pid=7) ERROR 11-29 03:44:00 [core.py:1010] EngineCore encountered a fatal error.\n"
            "(EngineCore pid=7) ERROR 11-29 03:44:00 [core.py:1010] Traceback (most recent call last):\n"
            "(EngineCore pid=7) ERROR 11-29 03:44:00 [core.py:1010] RuntimeError: CPU Generator does not use offset\n"
            "(MainProcess pid=6) ERROR 11-29 03:44:00 [async_llm.py:906] vllm.v1.engine.exceptions."
            "EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause.\n"
        )
    monkeypatch.setattr(deaths, "_log_files", lambda: [str(log)])
    assert (
        deaths.engine_log_cause(since, engine_only=True) == "RuntimeError: CPU Generator does not use offset"
    )
    assert deaths.engine_log_cause(since).startswith("vllm.v1.engine.exceptions.EngineDeadError")


def test_records_go_to_rays_session_folder_beside_the_actors_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the session, not in a shared temp folder that another user may own."""
    logs = tmp_path / "session_2026" / "logs"
    monkeypatch.setattr(deaths, "_log_files", lambda: [str(logs / "worker-1.out")])
    assert deaths.deaths_dir() == tmp_path / "session_2026" / "prefect-vllm-deaths"
