"""One local Prefect server for a run that has no `PREFECT_API_URL`.

Ray workers each starting Prefect's in-process ephemeral API against one SQLite
file gives "database is locked": instead the command starts one server, and every
process (flow, Ray workers) reaches it through `PREFECT_API_URL`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

logger = logging.getLogger("prefect_vllm.server")

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    # Not Linux: no prctl, and the atexit hook still stops the server on a normal exit.
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


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

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _ChildServer(SubprocessASGIServer):
        _instances: ClassVar[dict[int | None, Any]] = {}  # type: ignore[misc]  # a registry of our own

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
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

    server = _ChildServer()
    server.port = server.find_available_port()
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
                # Ship buffered run logs while the server is still up: after it
                # stops, the log handler would retry against a dead address.
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=30)
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

    def __init__(self, server: Any) -> None:
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
