"""The checkpoint store on a local folder: manifest, fingerprint guard, commit, restart."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from prefect_vllm._input.planning import JobPlan
from prefect_vllm._store.checkpoint import CheckpointStore, JobManifest, check_safe_id, fingerprint_id
from prefect_vllm.exceptions import ConfigurationError, FingerprintMismatchError
from prefect_vllm.results import ShardResult

PLAN = JobPlan(files=[], shards=[], rows_total=0, has_id_column=False)


def manifest(**fingerprint: object) -> JobManifest:
    fp = {"model": "m", "sampling.max_tokens": 16, **fingerprint}
    return JobManifest(job_id=fingerprint_id(fp), fingerprint=fp, plan=PLAN, created_at=0.0)


def marker(shard_id: str) -> ShardResult:
    return ShardResult(
        shard_id=shard_id, rows=1, rows_ok=1, rows_failed=0, prompt_tokens=1, output_tokens=1,
        checksum="x", attempt=1, actor_pid=1, generate_s=0, write_s=0, total_s=0, committed_at=0,
    )  # fmt: skip


def test_a_changed_parameter_is_refused_by_name(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "out"))
    store.prepare(manifest(), restart=False)
    assert store.prepare(manifest(), restart=False).job_id == manifest().job_id
    other = manifest(**{"sampling.max_tokens": 32})
    with pytest.raises(FingerprintMismatchError, match=r"sampling\.max_tokens \(16 -> 32\)") as info:
        store.prepare(other.model_copy(update={"job_id": manifest().job_id}), restart=False)
    assert info.value.changed == ["sampling.max_tokens"]


def test_restart_discards_parts_markers_and_manifest(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    store.prepare(manifest(), restart=False)
    store.write_part("000000", pa.table({"custom_id": ["a"]}))
    store.commit(marker("000000"))
    (tmp_path / "keep.txt").write_text("user file")
    assert set(store.committed()) == {"000000"}
    other = manifest(**{"sampling.max_tokens": 32})
    assert store.prepare(other, restart=True).job_id == other.job_id
    assert store.committed() == {}
    assert not list(tmp_path.glob("part-*"))
    assert (tmp_path / "keep.txt").exists()


def test_write_part_is_atomic_and_checksummed(tmp_path: Path) -> None:
    import hashlib

    store = CheckpointStore(str(tmp_path))
    checksum, size = store.write_part("000001", pa.table({"custom_id": ["a", "b"]}))
    data = (tmp_path / "part-000001.parquet").read_bytes()
    assert hashlib.sha256(data).hexdigest() == checksum and len(data) == size
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/b", "", ".", "..", "x" * 200])
def test_ids_that_could_escape_the_output_folder_are_refused(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        check_safe_id(bad, "job id")


def test_default_job_id_is_a_stable_hash_of_the_fingerprint() -> None:
    assert fingerprint_id({"a": 1, "b": 2}) == fingerprint_id({"b": 2, "a": 1})
    assert fingerprint_id({"a": 1}) != fingerprint_id({"a": 2})
    assert len(fingerprint_id({"a": 1})) == 16


def test_parts_missing_or_of_another_size_are_found_and_checksums_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "out" / "_commits").mkdir(parents=True)
    store = CheckpointStore(str(tmp_path / "out"))
    table = pa.table({"custom_id": [f"r{i}" for i in range(50)], "text": ["hello"] * 50})
    for shard_id in ("a", "b", "c", "d"):
        checksum, size = store.write_part(shard_id, table)
        store.commit(marker(shard_id).model_copy(update={"checksum": checksum, "part_bytes": size}))
    committed = store.committed()
    assert store.damaged(committed, checksums=True) == {}
    (tmp_path / "out" / "part-a.parquet").unlink()
    part_b = tmp_path / "out" / "part-b.parquet"
    part_b.write_bytes(part_b.read_bytes()[:100])
    part_c = tmp_path / "out" / "part-c.parquet"
    data = bytearray(part_c.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    part_c.write_bytes(bytes(data))
    assert store.damaged(committed) == {
        "a": "part-a.parquet is missing",
        "b": f"part-b.parquet is 100 bytes, its commit marker says {committed['b'].part_bytes}",
    }
    assert set(store.damaged(committed, checksums=True)) == {"a", "b", "c"}
    assert "sha256" in store.damaged(committed, checksums=True)["c"]
    old_marker = {"d": committed["d"].model_copy(update={"part_bytes": None})}  # before sizes were kept
    assert store.damaged(old_marker) == {}
    store.uncommit("a")
    assert set(store.committed()) == {"b", "c", "d"}


def test_a_write_the_location_refuses_is_one_storage_error_naming_the_file_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    """Any OS error of a write (here: a file where a folder should be) names location and cause."""
    from prefect_vllm._store.checkpoint import CheckpointStore
    from prefect_vllm.exceptions import StorageError

    (tmp_path / "out").write_text("a file, not a folder")
    store = CheckpointStore(str(tmp_path / "out"))
    with pytest.raises(StorageError) as refused:
        store.write_bytes("part-000001.parquet", b"rows")
    assert str(refused.value).startswith(f"cannot write {tmp_path}/out/part-000001.parquet: [Errno 20] ")
    with (
        pytest.raises(StorageError, match=r"cannot write .*/out/_openai/output.jsonl: \[Errno"),
        store.open_output("_openai/output.jsonl") as out,
    ):
        out.write(b"{}")
    assert (tmp_path / "out").read_text() == "a file, not a folder"


def test_a_child_location_keeps_the_filesystem_and_is_named_as_the_user_names_its_parent(
    tmp_path: Path,
) -> None:
    import pyarrow.fs as pafs

    local = CheckpointStore(str(tmp_path)).child("job-a")
    assert (local.root, local.uri, local.is_local) == (f"{tmp_path}/job-a", f"{tmp_path}/job-a", True)
    fs = pafs.LocalFileSystem()
    parent = CheckpointStore(str(tmp_path), filesystem=fs)
    parent.uri = "s3://bucket/jobs/?region=eu-west-1"  # as a storage block's location reads
    child = parent.child("job-b")
    assert child.fs is fs and child.root == f"{tmp_path}/job-b"
    assert child.uri == "s3://bucket/jobs/job-b?region=eu-west-1"
