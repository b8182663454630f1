"""The run's commit lines: notable shards alone and at once, plain ones together."""

from __future__ import annotations

import pytest

from prefect_vllm.flows import _ray
from prefect_vllm.results import ShardResult


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args: object) -> None:
        self.lines.append(message % args)


def _result(shard_id: str, **kwargs: object) -> ShardResult:
    fields: dict[str, object] = dict(
        shard_id=shard_id, rows=2, rows_ok=2, rows_failed=0, prompt_tokens=4, output_tokens=3,
        checksum="x", part_bytes=1, attempt=1, actor_pid=1, generate_s=0.01, write_s=0.01, total_s=0.02,
        committed_at=0.0,
    )  # fmt: skip
    fields.update(kwargs)
    return ShardResult(**fields)  # type: ignore[arg-type]


def test_plain_commits_are_told_together_and_notable_ones_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(_ray.time, "monotonic", lambda: now[0])
    log = _Lines()
    lines = _ray._CommitLines(log, 6)
    lines.add(_result("000000"))  # the first at once
    assert log.lines == ["1 shard committed (000000): 2 rows, 3 tokens, 0.0 s; 1 of 6"]
    lines.add(_result("000001"))
    lines.add(_result("000002", total_s=0.31))
    assert len(log.lines) == 1, "plain commits wait for the next line"
    lines.add(_result("000003", rows_ok=1, rows_failed=1))  # a row error: the waiting ones, then it
    assert log.lines[1:] == [
        "2 shards committed (000001 ... 000002): 4 rows, 6 tokens, 0.0-0.3 s each; 3 of 6",
        "shard 000003 committed: 2 rows (1 error, 0 poison rows), 3 tokens, 0.0 s, attempt 1, 0 engine deaths; 4 of 6",
    ]
    lines.add(_result("000004", attempt=2, engine_deaths=1))
    assert (
        log.lines[3].startswith("shard 000004 committed:")
        and "attempt 2, 1 engine death; 5 of 6" in log.lines[3]
    )
    now[0] += _ray._COMMIT_LINES_EVERY_S  # long enough since the last group
    lines.add(_result("000005"))
    assert log.lines[4] == "1 shard committed (000005): 2 rows, 3 tokens, 0.0 s; 6 of 6"
    lines.flush()
    assert len(log.lines) == 5, "nothing left to tell"


def test_a_signal_raised_inside_ray_comes_out_as_itself() -> None:
    from prefect.exceptions import TerminationSignal

    for raised in (TerminationSignal(signal=15), KeyboardInterrupt()):
        try:
            try:
                raise raised
            except BaseException as cause:
                raise SystemError(
                    "<cyfunction CoreWorker.wait> returned a result with an exception set"
                ) from cause
        except SystemError as exc:
            assert _ray.signal_raised_in_ray(exc) is raised
    plain = SystemError("something else")
    assert _ray.signal_raised_in_ray(plain) is plain
