"""What the suite starts, test by test: vLLM engines, raw vLLM references, Prefect servers
and Ray clusters, counted from the process table, with the seconds each kind was alive.

A pytest plugin (loaded by `tests/conftest.py`). Each test process watches the processes
that carry its own `SESSION_MARK` (every command, cluster, actor and engine it starts
inherits it) and gives each test's report what appeared and how long each kind lived
while the test ran. The controlling process adds the reports up (across pytest-xdist's
test processes) and prints one screen at the end of the run; with `PV_STARTS_JSON=FILE`
it also writes the figures there, as `docs/benchmarks.md` keeps them.

The kinds, from the process table:

- `engine`: a `VLLM::EngineCore` under a Ray actor (a run's or a warm pool's engine);
- `raw vLLM`: a Python process whose `VLLM::EngineCore` has no Ray actor above it (a
  parity test's reference `LLM(...)`, `vllm run-batch`), counted with its imports;
- `Prefect server`: Prefect's server app under uvicorn (the session's, a command's own
  temporary one, `prefect server start`);
- `Ray cluster`: a `gcs_server` (one per cluster: `ray.init()`, `ray start --head`, each
  node of `ray.cluster_utils.Cluster` is a raylet of the same cluster).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ours

KINDS = ("engine", "raw vLLM", "Prefect server", "Ray cluster")

#: How often the process table is read (a start shorter than this may be missed; none is).
_POLL_S = 0.5

_PROPERTY = "pv_starts"


def _kind(cmdline: str) -> str | None:
    """The kind a process's command line names, before its ancestry is looked at."""
    if cmdline.startswith("VLLM::EngineCore"):
        return "engine"
    if "prefect.server.api.server" in cmdline or ("prefect" in cmdline and "server start" in cmdline):
        return "Prefect server"
    if cmdline.split(" ", 1)[0].endswith("gcs_server"):
        return "Ray cluster"
    return None


@dataclass
class _Watcher:
    """Reads the process table every `_POLL_S` in a thread; counts since the last `take`."""

    #: pid -> the kind it is counted as, or None for a process of another session.
    seen: dict[int, str | None] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    alive_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        import psutil

        last = time.monotonic()
        while not self.stop.wait(_POLL_S):
            now = time.monotonic()
            live = set(psutil.pids())
            for pid in live:
                kind = self.seen[pid] if pid in self.seen else self._classify(pid)
                if kind is not None:
                    with self.lock:
                        self.alive_s[kind] += now - last
            for pid in set(self.seen) - live:  # gone: a new process may reuse the pid
                del self.seen[pid]
            last = now

    def _classify(self, pid: int) -> str | None:
        """What process `pid` counts as (None for nothing); counted as started now."""
        import psutil

        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:  # cheaper than psutil
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return None
        kind = _kind(cmdline)
        if kind is None:
            if not _may_retitle(cmdline):
                self.seen[pid] = None  # never looked at again
            return None
        try:
            proc = psutil.Process(pid)
            parents = proc.parents()
            if not ours(pid):
                self.seen[pid] = None
                return None
            if kind == "engine" and parents and not any(_under_ray(p) for p in parents):
                # A raw reference: the script that made it is what it costs, imports included.
                script = parents[0]
                self.seen[pid] = None
                if self.seen.get(script.pid) is not None:
                    return None
                self.seen[script.pid] = kind = "raw vLLM"
                with self.lock:
                    self.alive_s[kind] += max(0.0, time.time() - script.create_time())
            elif kind == "Prefect server" and any(self.seen.get(p.pid) == kind for p in parents):
                self.seen[pid] = None  # `prefect server start`'s own uvicorn: the same server
                return None
            else:
                self.seen[pid] = kind
        except psutil.Error:
            return None
        with self.lock:
            self.starts[kind] += 1
        return None if kind == "raw vLLM" else kind  # the script's own pid accrues from now on

    def take(self) -> dict[str, Any]:
        """What started and how long each kind lived since the last `take`."""
        with self.lock:
            taken = {
                "starts": dict(self.starts),
                "alive_s": {k: round(v, 1) for k, v in self.alive_s.items()},
            }
            self.starts.clear()
            self.alive_s.clear()
        return taken


def _may_retitle(cmdline: str) -> bool:
    """Whether a process of no kind yet may become one: vLLM retitles the processes it
    spawns (`multiprocessing`'s child, once vLLM is imported) or forks (from a Ray actor)."""
    return "multiprocessing" in cmdline or cmdline.startswith("ray::") or not cmdline


def _under_ray(proc: Any) -> bool:
    """Whether `proc` is a Ray worker or actor process."""
    try:
        cmdline = " ".join(proc.cmdline())
    except Exception:
        return False
    return cmdline.startswith("ray::") or "default_worker.py" in cmdline


class StartsPlugin:
    """The pytest hooks: a watcher in each test process, the tally in the controller."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.watcher: _Watcher | None = None
        self.tests: dict[str, dict[str, Any]] = {}

    # -- in each test process -------------------------------------------------------------
    @pytest.hookimpl
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput") or not self._distributed():
            self.watcher = _Watcher()
            threading.Thread(target=self.watcher.run, name="pv-starts", daemon=True).start()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        outcome = yield
        if self.watcher is not None and call.when == "teardown":
            outcome.get_result().user_properties.append((_PROPERTY, self.watcher.take()))

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.watcher is not None:
            self.watcher.stop.set()

    # -- in the controller ----------------------------------------------------------------
    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if hasattr(self.config, "workerinput"):
            return
        test = self.tests.setdefault(report.nodeid, {"s": 0.0, "starts": {}, "alive_s": {}})
        test["s"] += report.duration
        for name, value in report.user_properties:
            if name == _PROPERTY:
                for key in ("starts", "alive_s"):
                    for kind, n in value[key].items():
                        test[key][kind] = test[key].get(kind, 0) + n

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if hasattr(self.config, "workerinput") or not self.tests:
            return
        tally = summarize(self.tests)
        for line in render(tally):
            terminalreporter.write_line(line)
        if out := os.environ.get("PV_STARTS_JSON"):
            every = sorted(self.tests.items(), key=lambda kv: -kv[1]["s"])
            tally["every_test"] = [{"test": nodeid, **t} for nodeid, t in every]
            Path(out).write_text(json.dumps(tally, indent=1) + "\n")

    def _distributed(self) -> bool:
        return bool(getattr(self.config.option, "numprocesses", None))


def summarize(tests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Totals by kind, and the tests that started the most, heaviest first."""
    kinds = {
        kind: {
            "started": sum(t["starts"].get(kind, 0) for t in tests.values()),
            "alive_s": round(sum(t["alive_s"].get(kind, 0.0) for t in tests.values()), 1),
        }
        for kind in KINDS
    }
    heaviest = sorted(tests.items(), key=lambda kv: -kv[1]["s"])
    return {
        "tests": len(tests),
        "test_s": round(sum(t["s"] for t in tests.values()), 1),
        "kinds": kinds,
        "slowest": [
            {"test": nodeid, "s": round(t["s"], 1), "starts": t["starts"]} for nodeid, t in heaviest[:12]
        ],
    }


def render(tally: dict[str, Any]) -> list[str]:
    """The end-of-run screen."""
    lines = [
        "",
        f"what the suite started ({tally['tests']} tests, {tally['test_s']:.0f} s of test time in all)",
        f"  {'kind':<15} {'started':>8} {'alive s':>9}",
    ]
    for kind, row in tally["kinds"].items():
        lines.append(f"  {kind:<15} {row['started']:>8} {row['alive_s']:>9.0f}")
    lines.append("  slowest tests and what each started:")
    for row in tally["slowest"]:
        started = ", ".join(f"{n} {k}" for k, n in sorted(row["starts"].items())) or "nothing"
        lines.append(f"  {row['s']:>6.0f} s  {row['test']}  ({started})")
    return lines
