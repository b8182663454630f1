"""`prefect-vllm cancel`: stop the run that holds a job, as a Prefect cancellation does."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from typing import Any

from prefect_vllm._cli.common import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, add_output_arguments, output_store
from prefect_vllm._cli.common import fail as _fail


def add_cancel_parser(sub: Any) -> None:
    """The `cancel` subcommand's flags."""
    cancel = sub.add_parser(
        "cancel", help="stop the run of a job (a Prefect cancellation); its committed shards stay"
    )
    add_output_arguments(cancel, "the job's output folder or URI")
    cancel.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="S",
        help="how long to wait for the run to stop (default 60)",
    )


def cancel(args: argparse.Namespace) -> int:
    """Cancel the job's run and wait until it has stopped; the exit status.

    A deployment's run (a Prefect worker or runner runs it) is set to Cancelling through
    the Prefect API it reports to (recorded in the job's lock), as the UI's Cancel
    button does; a flow called directly (`prefect-vllm run`, Python) on this host gets
    SIGTERM, as from `kill`. Either way its shards and engines stop within seconds and
    the job stays resumable.

    Exit status: 0 once no run holds the job (or none did), 1 if the run still holds
    it after `--wait` seconds, 2 when the output holds no job or the run cannot be
    reached from here.
    """
    from prefect_vllm._store.lock import running_holder
    from prefect_vllm.exceptions import ConfigurationError, StorageError

    try:
        store = output_store(args.output, args.storage)
        with store.storage_errors():
            manifest = store.read_manifest()
            held = running_holder(store) if manifest is not None else None
    except (ConfigurationError, StorageError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    if manifest is None:
        return _fail(f"{store.uri} holds no prefect-vllm job (no _manifest.json)", EXIT_USAGE)
    job = manifest.job_id
    if held is None:
        print(f"job {job}: no run is in progress; nothing to cancel")
        return EXIT_OK
    try:
        how = _stop(held)
    except ConfigurationError as exc:
        return _fail(f"job {job}: {exc}", EXIT_USAGE)
    print(f"job {job}: {how}; waiting for it to stop", file=sys.stderr, flush=True)
    started = time.monotonic()
    while time.monotonic() - started < args.wait:
        if running_holder(store) is None:
            print(
                f"job {job}: stopped in {time.monotonic() - started:.1f} s; its committed shards are kept, "
                "and the same run command (or a retry of the flow run) resumes it"
            )
            return EXIT_OK
        time.sleep(0.5)
    return _fail(f"job {job}: its run still holds the job after {args.wait:.0f} s", EXIT_INCOMPLETE)


def _stop(held: dict[str, Any]) -> str:
    """Ask the run in the lock record `held` to stop; what was done, in words.

    Raises:
        ConfigurationError: The run cannot be reached from here.
    """
    from prefect_vllm._launch.server import configured_api_url
    from prefect_vllm.exceptions import ConfigurationError

    run_id, api_url = held.get("flow_run_id"), held.get("api_url") or configured_api_url()
    if run_id and api_url and held.get("deployment_id"):  # a worker or runner stops it
        _cancel_flow_run(run_id, api_url)
        return f"cancelled its flow run ({held.get('owner')})"
    pid, host = held.get("pid"), held.get("host")
    if pid and host == socket.gethostname():  # a flow called directly: the command, or Python
        os.kill(int(pid), signal.SIGTERM)
        return f"sent SIGTERM to its process ({held.get('owner')}, pid {pid})"
    raise ConfigurationError(
        f"its run ({held.get('owner')}, pid {pid} on {host}) has no flow run this command can reach; "
        "cancel it in the Prefect UI, or stop that process on its host"
    )


def _cancel_flow_run(run_id: str, api_url: str) -> None:
    """Set the flow run Cancelling, as the UI's Cancel button does."""
    from prefect.client.orchestration import SyncPrefectClient, get_client
    from prefect.states import Cancelling

    from prefect_vllm._launch.server import configured_api_url
    from prefect_vllm.exceptions import ConfigurationError

    # The configured API keeps the profile's key (Prefect Cloud); a run's temporary server needs none.
    client = get_client(sync_client=True) if api_url == configured_api_url() else SyncPrefectClient(api_url)
    try:
        with client:
            client.set_flow_run_state(run_id, Cancelling(message="cancelled with prefect-vllm cancel"))
    except Exception as exc:
        raise ConfigurationError(f"could not cancel flow run {run_id} at {api_url} ({exc})") from None
