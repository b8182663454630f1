"""One local Prefect server for a run that has no `PREFECT_API_URL`.

Ray workers each starting Prefect's in-process ephemeral API against one SQLite
file gives "database is locked": instead the command starts one server, and every
process (flow, Ray workers) reaches it through `PREFECT_API_URL`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("prefect_vllm.server")

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    # Not Linux: no prctl, and the atexit hook still stops the server on a normal exit.
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


#: How many task run state events, and events, the server writes per insert
#: (Prefect's defaults: 1 and 20).
BATCH_SIZE_ENVS = (
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE",
)

#: Resolved here, not in the forked child before it runs the server: the child of a
#: process with other threads running must not load libraries (a `dlopen` may deadlock).
_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the server when the thread that started it ends (even by SIGKILL)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def configured_api_url() -> str | None:
    """The Prefect API URL in force (environment, profile or settings context), if any."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def run_api_url() -> str | None:
    """The Prefect API the current flow run reports to: the configured one, or else the
    temporary server Prefect started for a flow called with no API configured (its
    address is in the run's client only). Ray workers must be given it: without it
    each would start a temporary server of its own against the same SQLite file."""
    url = configured_api_url()
    if url:
        return url
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    client = context.client if context is not None else None
    return str(client.api_url).rstrip("/") if client is not None else None


def check_answers(url: str, timeout_s: float = 5.0) -> None:
    """Refuse a configured Prefect API that does not answer, before anything starts.

    Any HTTP answer counts (Prefect Cloud may ask for a key first); only a refused
    connection or silence does not: a run against it would fail after its engines
    started, with a long traceback of retries.

    Raises:
        ConfigurationError: Nothing answers at `url`.
    """
    import urllib.error
    import urllib.request

    from prefect_vllm.exceptions import ConfigurationError

    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answers
    except (TimeoutError, urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigurationError(
            f"PREFECT_API_URL: nothing answers at {url} ({reason}); start that Prefect server, "
            "or unset PREFECT_API_URL and the command starts a temporary one"
        ) from None


@contextmanager
def prefect_api(while_starting: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yield the Prefect API URL to use, starting a local server when none is configured.

    The server is a child process that dies with this one, so a killed run never
    leaves a server behind; its database is the profile's (`PREFECT_HOME`), so run
    history survives across runs.

    Args:
        while_starting: Called with the API URL while the server starts (its port is
            chosen first), for work that does not need the server yet. The URL
            yielded differs from the one it got only if that port was taken.
    """
    url = configured_api_url()
    if url:
        check_answers(url)
        if while_starting is not None:
            while_starting(url)
        yield url
        return

    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = _ChildServer()
    keeper = _ServerKeeper(server)
    try:
        if while_starting is not None:
            while_starting(server.api_url)
        keeper.wait_started()
    except BaseException:
        keeper.stop()  # an interrupt, or a server that did not start
        raise
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                # Ship buffered run logs and events while the server is still up: after it
                # stops, the log handler would retry against a dead address.
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=30)
                EventsWorker.drain_all(timeout=30)
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        keeper.stop()


class _ServerKeeper:
    """A thread that starts the server and lives as long as it runs.

    The server dies with the thread that started it (`PR_SET_PDEATHSIG` follows the
    parent thread, not the process), so the thread that starts it in the background
    waits until the server is stopped.
    """

    def __init__(self, server: _ChildServer) -> None:
        self._server = server
        self._started = threading.Event()
        self._release = threading.Event()
        self._failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._keep, name="prefect-server", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        try:
            self._server.start(timeout=180)
        except BaseException as exc:
            self._failed.append(exc)
        finally:
            self._started.set()
        self._release.wait()
        self._server.stop()

    def wait_started(self) -> None:
        """Return once the server answers; raise what stopped it from starting."""
        self._started.wait()
        if self._failed:
            raise self._failed[0]

    def stop(self) -> None:
        """Stop the server (once it has started, or failed to) and end the thread."""
        self._release.set()
        if self._started.is_set():
            self._thread.join(timeout=60)


class _ChildServer:
    """Prefect's server app under uvicorn in a child process, as Prefect's own temporary
    server (`prefect.server.api.server.SubprocessASGIServer`) runs it, with no UI.

    Not that class: importing it loads the whole server (its web app, SQLAlchemy, the
    database drivers) into this process, 2 s and 78 MB before the run does anything.
    """

    def __init__(self) -> None:
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float) -> None:
        """Start the server and return once it answers; another port if this one was taken."""
        import urllib.error
        import urllib.request

        self.process = self._run()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == _PORT_TAKEN:  # taken since it was chosen
                self.port = _free_port()
                self.process = self._run()
                continue
            if code is not None:
                raise RuntimeError(f"the temporary Prefect server exited with status {code} while starting")
            try:
                urllib.request.urlopen(f"{self.api_url}/health", timeout=2).close()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        """Stop the server: SIGTERM (it writes what it holds, then exits), SIGKILL after 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _run(self) -> subprocess.Popen[bytes]:
        import prefect

        return subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn",
                "--app-dir", str(prefect.__module_path__.parent),
                "--factory", "prefect.server.api.server:create_app",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on",
            ],
            env={
                # Task run states and events are written in batches of 100, not one
                # or 20 per insert: thousands of small shards would otherwise keep the
                # server busiest (both are flushed at least every 5 s, and at shutdown).
                **dict.fromkeys(BATCH_SIZE_ENVS, "100"),
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            },
            preexec_fn=_die_with_parent,
            # Its own session: a terminal's Ctrl-C goes to the whole foreground process
            # group, and a server killed by it leaves the interrupted flow retrying its
            # last state change against a dead address until the grace period ends.
            # The command stops it itself, and it dies with the command anyway.
            start_new_session=True,
        )  # fmt: skip


#: uvicorn's exit status when its port is taken.
_PORT_TAKEN = 3


def _free_port() -> int:
    """A free local port in Prefect's range for temporary servers (8000-8999)."""
    for _ in range(50):
        port = random.randrange(8000, 9000)
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for a temporary Prefect server in 8000-8999")
