"""What a run shows: stdout for the summary alone, our lines at INFO, refusals in one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import REPO


def test_while_the_run_lasts_everything_written_to_stdout_goes_to_stderr_but_the_summary() -> None:
    """Ray prints its workers' output to file descriptor 1; children inherit it too."""
    script = textwrap.dedent(
        """
        import os, subprocess, sys
        from prefect_vllm._logs import summary_stdout

        with summary_stdout() as out:
            print("a worker's line")
            os.write(1, b"written to fd 1\\n")
            subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
            print('{"rows_ok": 3}', file=out)
        print("after the run")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stdout.splitlines() == ['{"rows_ok": 3}', "after the run"]
    assert done.stderr.splitlines() == ["a worker's line", "written to fd 1", "a child process"]


def test_only_our_own_lines_pass_below_warning_and_refusals_lose_their_traceback() -> None:
    import logging

    from prefect_vllm._logs import _OursAtInfo, _RefusalWithoutTraceback
    from prefect_vllm.exceptions import EngineError, JobRunningError

    ours = logging.LogRecord(
        "prefect.flow_runs", logging.INFO, "/x/prefect_vllm/flows/batch.py", 1, "job", None, None
    )
    theirs = logging.LogRecord(
        "prefect.flow_runs", logging.INFO, "/x/prefect/flow_engine.py", 1, "Beginning", None, None
    )
    server = logging.LogRecord(
        "prefect", logging.INFO, "/x/prefect/server.py", 1, "Starting temporary server", None, None
    )
    warning = logging.LogRecord(
        "vllm", logging.WARNING, "/x/vllm/config.py", 1, "KV cache is small", None, None
    )
    advice = logging.LogRecord(
        "ray",
        logging.WARNING,
        "/x/ray/a.py",
        1,
        "Token authentication is enabled for this Ray cluster",
        None,
        None,
    )
    keep = _OursAtInfo(("Starting temporary server",))
    assert [keep.filter(r) for r in (ours, theirs, server, warning, advice)] == [
        True,
        False,
        True,
        True,
        False,
    ]

    def records() -> tuple[logging.LogRecord, logging.LogRecord]:
        refused = logging.LogRecord(
            "prefect", logging.ERROR, "x", 1, "refused", None, (JobRunningError, JobRunningError("x"), None)
        )
        crashed = logging.LogRecord(
            "prefect", logging.ERROR, "x", 1, "failed", None, (EngineError, EngineError("x"), None)
        )
        return refused, crashed

    refused, crashed = records()
    quiet = _RefusalWithoutTraceback(console=False)  # the run's logs on the server
    assert quiet.filter(refused) and quiet.filter(crashed)
    assert refused.exc_info is None, "a refusal is its one line"
    assert crashed.exc_info is not None, "an engine failure keeps its traceback"
    refused, crashed = records()
    console = _RefusalWithoutTraceback(console=True)  # the command's: its last line says it
    assert not console.filter(refused), "a refusal has no ERROR line above the command's own"
    assert console.filter(crashed) and crashed.exc_info is not None

    interrupted = logging.LogRecord(
        "prefect.flow_runs", logging.ERROR, "/x/prefect/flow_engine.py", 1,
        "Crash detected! Execution was aborted by an interrupt signal.", None, None,
    )  # fmt: skip
    assert not keep.filter(interrupted), "Ctrl-C is said by the command's last line"
