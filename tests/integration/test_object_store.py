"""Output and checkpoints on a real S3-protocol server (moto's, over HTTP on loopback)."""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_vllm.testing import write_sample_prompts
from tests.helpers import input_ids, run_cli, summary_of

pytestmark = pytest.mark.integration

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


def test_full_run_and_resume_with_output_on_s3(
    tmp_path: Path,
    tiny_model: Path,
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    prefect_server: str,
) -> None:
    import boto3
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=f"http://{s3_endpoint}", region_name="us-east-1")
    s3.create_bucket(Bucket="jobs")
    output = f"s3://jobs/nightly/run-1?endpoint_override={s3_endpoint}&scheme=http"
    prompts = write_sample_prompts(tmp_path / "prompts.jsonl", n=90)
    args = ["run", str(prompts), "--output", output, "--model", str(tiny_model), "--shard-size", "30",
            "--max-tokens", "8", "--temperature", "0", "--json"]  # fmt: skip

    first = run_cli(args, tmp_path / "home", api_url=prefect_server)
    assert first.returncode == 0, first.stderr[-4000:]
    assert summary_of(first)["shards_run"] == 3
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="jobs", Prefix="nightly/run-1/")["Contents"]}
    assert {"nightly/run-1/_manifest.json", "nightly/run-1/_commits/000001.json"} <= keys
    assert {"nightly/run-1/part-000000.parquet", "nightly/run-1/part-000002.parquet"} <= keys

    # Lose one shard's commit: the re-run redoes exactly that shard, from the object store alone.
    s3.delete_object(Bucket="jobs", Key="nightly/run-1/_commits/000001.json")
    second = run_cli(args, tmp_path / "home-2", api_url=prefect_server)
    assert second.returncode == 0, second.stderr[-4000:]
    assert (summary_of(second)["shards_skipped"], summary_of(second)["shards_run"]) == (2, 1)

    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", **_keys())
    table = ds.dataset(
        "jobs/nightly/run-1", filesystem=fs, format="parquet", exclude_invalid_files=True
    ).to_table()
    assert Counter(table.column("custom_id").to_pylist()) == Counter(input_ids(prompts))

    status = run_cli(["status", output, "--json"], tmp_path / "home-2", timeout=120)
    assert status.returncode == 0 and '"shards_done": 3' in status.stdout

    # Ops with a storage block: its credentials alone, and the jobs of a folder listed.
    from prefect_vllm.blocks import CheckpointStorage

    CheckpointStorage(
        base_uri="s3://jobs", access_key_id="testing", secret_access_key="testing", region="us-east-1",
        endpoint_override=f"http://{s3_endpoint}",
    ).save("moto-jobs", overwrite=True)  # fmt: skip
    for key in CREDENTIALS:
        monkeypatch.delenv(key)
    listed = run_cli(
        ["status", "nightly", "--storage", "moto-jobs", "--json"], tmp_path / "home-3", api_url=prefect_server
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    (job,) = json.loads(listed.stdout)
    assert (job["job_id"], job["shards_done"], job["rows_ok"]) == (summary_of(first)["job_id"], 3, 90)
    assert job["output"] == "jobs/nightly/run-1"
    missing = run_cli(
        ["status", "nightly", "--storage", "no-such"], tmp_path / "home-3", api_url=prefect_server
    )
    (line,) = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and "--storage: no" in line and "'no-such'" in line, missing.stderr
    empty = run_cli(
        ["status", "empty", "--storage", "moto-jobs"], tmp_path / "home-3", api_url=prefect_server
    )
    assert empty.returncode == 2 and "holds no prefect-vllm job" in empty.stderr, empty.stderr


def _keys() -> dict[str, str]:
    return {"access_key": os.environ["AWS_ACCESS_KEY_ID"], "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
