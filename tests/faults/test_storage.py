"""The output location fills up mid-job: one clear line, exit 1, nothing half-committed, a re-run resumes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_vllm.testing import write_sample_prompts
from tests.helpers import SharedPool, input_ids, markers, read_output, run_cli, summary_of

pytestmark = [pytest.mark.faults]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem of 64 KiB (tmpfs): room for the job's metadata and a few parts."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_output_filesystem_ends_the_run_with_the_location_and_the_os_error(
    tmp_path: Path, tiny_model: Path, prefect_server: str, shared_pool: SharedPool, small_disk: Path
) -> None:
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=240, seed=14)
    out = small_disk / "out"
    args = ["run", str(prompts), "--output", str(out), "--model", str(tiny_model), "--shard-size", "12",
            "--max-tokens", "48", "--ignore-eos", "--temperature", "0", "--json", *shared_pool.cli_args()]  # fmt: skip
    full = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert full.returncode == 1, full.stderr[-4000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("prefect-vllm: error: "), last
    assert f"cannot write {out}/" in last and "No space left on device" in last, last
    assert "run the same command again" in last, last
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    summary = summary_of(full)
    assert summary["stopped_by"] and "No space left on device" in summary["stopped_by"]
    committed = markers(out)
    assert 0 < len(committed) < 20, "some shards fit, not all"
    for marker in committed:  # a marker only ever stands for a whole, readable part
        record = json.loads(marker.read_text())
        part = out / f"part-{record['shard_id']}.parquet"
        assert hashlib.sha256(part.read_bytes()).hexdigest() == record["checksum"]
        assert len(read_output_of(part)) == record["rows"]

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # the cause, fixed
    again = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert again.returncode == 0, again.stderr[-4000:]
    resumed = summary_of(again)
    assert (resumed["shards_skipped"], resumed["shards_run"]) == (len(committed), 20 - len(committed))
    assert Counter(read_output(out).column("custom_id").to_pylist()) == Counter(input_ids(prompts))


def read_output_of(part: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(part).column("custom_id").to_pylist()
