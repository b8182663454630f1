"""Checkpoint storage: the job manifest, its fingerprint and the per-shard commit.

Layout, under the output location (a local folder or any `pyarrow.fs` URI):

```
part-<shard_id>.parquet      a shard's rows; rewritten by a re-run until committed
_manifest.json               job id, fingerprint, plan
_commits/<shard_id>.json     the commit marker, written after the part file is durable
_summary.json                the last run's summary
_openai/output.jsonl         with `--export openai`: generated rows, OpenAI Batch shape
_openai/errors.jsonl         with `--export openai`: row errors, OpenAI Batch shape
```

The exports sit under `_openai/` so the folder stays a Parquet dataset that
`pyarrow.parquet.read_table(DIR)` reads (it skips names starting with `_`).

A shard is complete only when its marker exists. On local disks every file is
written to a temporary name and renamed; on object stores a PUT is atomic and the
marker is the commit point.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from prefect_vllm._input.planning import JobPlan
from prefect_vllm.exceptions import ConfigurationError, FingerprintMismatchError, StorageError
from prefect_vllm.results import ShardResult

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

MANIFEST = "_manifest.json"
COMMITS = "_commits"
SUMMARY = "_summary.json"
EXPORTS = "_openai"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class JobManifest(BaseModel):
    """What a job is: its id, its fingerprint and its plan."""

    job_id: str
    fingerprint: dict[str, Any]
    plan: JobPlan
    created_at: float


def fingerprint_id(fingerprint: dict[str, Any]) -> str:
    """The default job id: a short hash of the fingerprint's canonical JSON."""
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def check_safe_id(value: str, what: str) -> str:
    """Refuse ids that could escape the output folder (`../`, absolute paths)."""
    if not _SAFE_ID.match(value) or value in {".", ".."}:
        raise ConfigurationError(
            f"{what} {value!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The fingerprint keys whose values differ, sorted."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


class CheckpointStore:
    """The output location, seen through `pyarrow.fs`.

    Args:
        uri: A local folder or a `pyarrow.fs` URI such as `s3://bucket/prefix`.
        filesystem: An explicit filesystem (e.g. an `S3FileSystem` with an endpoint);
            `uri` is then a path inside it.
    """

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None) -> None:
        import pyarrow.fs as pafs

        self.uri = uri
        if filesystem is not None:
            self.fs, self.root = filesystem, uri.rstrip("/")
        elif "://" in uri:
            try:
                self.fs, root = pafs.FileSystem.from_uri(uri)
            except OSError as exc:  # an object store resolves its bucket here (S3: its region)
                raise StorageError(uri, _os_reason(exc), action="reach") from None
            self.root = root.rstrip("/")
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def is_local(self) -> bool:
        """Whether the location is a local (or mounted network) folder, not an object store."""
        return self._local

    def path(self, name: str) -> str:
        """The full path of a file under the root."""
        return f"{self.root}/{name}"

    def child(self, name: str) -> CheckpointStore:
        """The location of the folder `name` under this one, with the same filesystem (and
        credentials), its `uri` named as the user names this one (query string kept)."""
        child = CheckpointStore(self.path(name), filesystem=self.fs)
        base, query = self.uri.split("?", 1) if "?" in self.uri else (self.uri, "")
        child.uri = f"{base.rstrip('/')}/{name}" + (f"?{query}" if query else "")
        return child

    def part_name(self, shard_id: str) -> str:
        """The part file name of a shard."""
        return f"part-{shard_id}.parquet"

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a file whole: temp name and rename on local disks, one PUT elsewhere.

        Raises:
            StorageError: The location refused the write (full, no permission, the
                store's error). On a local disk nothing is left under `name`; an object
                store may keep part of it, which no commit marker ever points to.
        """
        with self._writing(name) as out:
            out.write(data)

    @contextlib.contextmanager
    def open_output(self, name: str) -> Iterator[Any]:
        """A file written as a stream and in place only once closed without error
        (its folder made first).

        Raises:
            StorageError: As in `write_bytes`.
        """
        with self.storage_errors(name):
            self.fs.create_dir(self.path(name).rsplit("/", 1)[0], recursive=True)
        with self._writing(name) as out:
            yield out

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[Any]:
        """Local disks: a temp name, fsync, rename. Object stores: one upload on close."""
        dest = self.path(name)
        with self.storage_errors(name):
            if not self._local:
                with self.fs.open_output_stream(dest) as out:
                    yield out
                return
            tmp = f"{os.path.dirname(dest)}/.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as fh:
                    yield fh
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, dest)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)  # gone already once renamed

    @contextlib.contextmanager
    def storage_errors(self, name: str = "", action: str = "write") -> Iterator[None]:
        """The OS's or the store's errors of the block, as one `StorageError` naming what
        could not be done (`action`: write, read), the location (`name` under it) and the
        error."""
        try:
            yield
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            location = f"{self.uri.rstrip('/')}/{name}" if name else self.uri
            raise StorageError(location, _os_reason(exc), action=action) from exc

    def read_part(self, shard_id: str) -> pa.Table:
        """A committed shard's output table."""
        import pyarrow.parquet as pq

        with self.fs.open_input_file(self.path(self.part_name(shard_id))) as src:
            return pq.read_table(src)

    def read_bytes(self, name: str) -> bytes | None:
        """A file's bytes, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(self.path(name)) as src:
                return bytes(src.read())
        except FileNotFoundError:
            return None

    def read_manifest(self) -> JobManifest | None:
        """The job manifest, or None for a fresh output location."""
        data = self.read_bytes(MANIFEST)
        return None if data is None else JobManifest.model_validate_json(data)

    def write_manifest(self, manifest: JobManifest) -> None:
        """Record the job; written once, before any shard runs."""
        self.write_bytes(MANIFEST, manifest.model_dump_json().encode())

    def prepare(self, manifest: JobManifest, *, restart: bool) -> JobManifest:
        """Open the job in this location, refusing to mix two jobs' outputs.

        Returns:
            The manifest in force: the stored one when resuming (same fingerprint,
            so the same plan), else the given one.

        Raises:
            FingerprintMismatchError: The location holds another job, or this job with
                other parameters, and `restart` is false.
        """
        existing = self.read_manifest()
        if existing is not None and restart:
            self.clear()
            existing = None
        if existing is None:
            with self.storage_errors():
                self.fs.create_dir(self.root, recursive=True)
                self.fs.create_dir(self.path(COMMITS), recursive=True)
            self.write_manifest(manifest)
            return manifest
        self.check_same_job(existing, manifest.job_id, manifest.fingerprint)
        return existing

    def check_same_job(self, existing: JobManifest, job_id: str, fingerprint: dict[str, Any]) -> None:
        """Refuse to resume `existing` as a job with another id or fingerprint.

        Raises:
            FingerprintMismatchError: Naming every setting that differs.
        """
        changed = describe_changes(existing.fingerprint, fingerprint)
        if changed or existing.job_id != job_id:
            details = ", ".join(
                f"{k} ({_short(existing.fingerprint.get(k))} -> {_short(fingerprint.get(k))})"
                for k in changed
            )
            raise FingerprintMismatchError(
                f"{self.uri} holds job {existing.job_id!r}"
                + (f" made with different parameters: {details}" if changed else "")
                + ". Re-run with the same parameters to resume it, pass --restart to discard "
                "it, or choose another output location.",
                changed=changed or ["job_id"],
            )

    def committed(self) -> dict[str, ShardResult]:
        """Every commit marker present, by shard id."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path(COMMITS), allow_not_found=True)
        markers: dict[str, ShardResult] = {}
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
                continue
            data = self.read_bytes(f"{COMMITS}/{info.base_name}")
            if data is not None:
                result = ShardResult.model_validate_json(data)
                markers[result.shard_id] = result
        return markers

    def damaged(self, committed: dict[str, ShardResult], *, checksums: bool = False) -> dict[str, str]:
        """The committed shards whose part file does not match its marker: what is wrong.

        Presence and size come from one listing of the location (cheap on object
        stores); with `checksums`, every part is also read and its sha256 compared.
        """
        import pyarrow.fs as pafs

        sizes = {
            info.base_name: info.size
            for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
            if info.type == pafs.FileType.File
        }
        problems: dict[str, str] = {}
        for shard_id, result in sorted(committed.items()):
            name = self.part_name(shard_id)
            size = sizes.get(name)
            if size is None:
                problems[shard_id] = f"{name} is missing"
            elif result.part_bytes is not None and size != result.part_bytes:
                problems[shard_id] = f"{name} is {size} bytes, its commit marker says {result.part_bytes}"
            elif checksums and self._sha256(name) != result.checksum:
                problems[shard_id] = f"{name} does not match the sha256 in its commit marker"
        return problems

    def uncommit(self, shard_id: str) -> None:
        """Remove a shard's commit marker, so that it counts as not done until run again."""
        self.fs.delete_file(self.path(f"{COMMITS}/{shard_id}.json"))

    def _sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self.path(name)) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def write_part(self, shard_id: str, table: pa.Table) -> tuple[str, int]:
        """Write a shard's part file; returns its sha256 and size."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        self.write_bytes(self.part_name(shard_id), data)
        return hashlib.sha256(data).hexdigest(), len(data)

    def commit(self, result: ShardResult) -> None:
        """Write the shard's commit marker: from here on the shard is complete."""
        self.write_bytes(f"{COMMITS}/{result.shard_id}.json", result.model_dump_json().encode())

    def write_summary(self, summary: BaseModel) -> None:
        """Keep the last run's summary beside the output."""
        self.write_bytes(SUMMARY, summary.model_dump_json(indent=2).encode())

    def clear(self) -> None:
        """Discard the job: part files, markers, manifest and summary."""
        import pyarrow.fs as pafs

        self.fs.delete_dir_contents(self.path(COMMITS), missing_dir_ok=True)
        self.fs.delete_dir_contents(self.path(EXPORTS), missing_dir_ok=True)
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)):
            name = info.base_name
            if info.type == pafs.FileType.File and (
                (name.startswith("part-") and name.endswith(".parquet")) or name in {MANIFEST, SUMMARY}
            ):
                self.fs.delete_file(info.path)


def _os_reason(exc: OSError) -> str:
    """The OS error as one line: `[Errno 28] No space left on device`, or the store's message."""
    if exc.errno is not None and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
