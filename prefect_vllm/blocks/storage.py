"""The `CheckpointStorage` block: where outputs and checkpoints live, with its credentials."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from prefect_vllm.blocks._logo import _LOGO_URL

if TYPE_CHECKING:
    from prefect_vllm._store.checkpoint import CheckpointStore


class CheckpointStorage(Block):
    """Storage for job outputs and checkpoints: a `pyarrow.fs` location and its credentials.

    A job's `output` is then a path under `base_uri`. Credentials are secrets: they are
    never logged, and reach Ray workers only inside the filesystem object they build.

    Examples:
        Save an S3 location (or MinIO, with `endpoint_override`) once:

        ```python
        from prefect_vllm.blocks import CheckpointStorage

        CheckpointStorage(
            base_uri="s3://my-bucket/batch", access_key_id="AKIA...", secret_access_key="..."
        ).save("batch-bucket", overwrite=True)
        storage = CheckpointStorage.load("BLOCK_NAME")
        print(storage.location("nightly/2026-11-25"))
        ```
    """

    _block_type_name = "vLLM Checkpoint Storage"
    _block_type_slug = "vllm-checkpoint-storage"
    _logo_url = _LOGO_URL  # type: ignore[assignment]
    _documentation_url = "https://arrow.apache.org/docs/python/filesystems.html"  # type: ignore[assignment]
    _description = "Where prefect-vllm writes part files and commit markers, with credentials as secrets."

    base_uri: str = Field(description="A local folder or a pyarrow.fs URI such as s3://bucket/prefix.")
    access_key_id: SecretStr | None = Field(default=None, description="S3 access key id.")
    secret_access_key: SecretStr | None = Field(default=None, description="S3 secret access key.")
    session_token: SecretStr | None = Field(default=None, description="S3 session token, if any.")
    region: str | None = Field(default=None, description="S3 region; empty lets pyarrow find it.")
    endpoint_override: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, Ceph), e.g. http://minio:9000."
    )

    def location(self, output: str) -> str:
        """The path of a job's output under `base_uri`."""
        return f"{self.base_uri.rstrip('/')}/{output.strip('/')}" if output else self.base_uri

    def store(self, output: str) -> CheckpointStore:
        """The output location of a job whose `output` is a path under `base_uri`, opened
        with this block's credentials (an S3 filesystem built from them; any other URI
        resolved by pyarrow)."""
        import pyarrow.fs as pafs

        from prefect_vllm._store.checkpoint import CheckpointStore

        uri = self.location(output)
        if not uri.startswith("s3://"):
            return CheckpointStore(uri)
        filesystem = pafs.S3FileSystem(
            access_key=_secret(self.access_key_id),
            secret_key=_secret(self.secret_access_key),
            session_token=_secret(self.session_token),
            region=self.region,
            endpoint_override=self.endpoint_override,
            scheme="http" if (self.endpoint_override or "").startswith("http://") else "https",
        )
        return CheckpointStore(uri.split("://", 1)[1], filesystem=filesystem)


def open_store(output: str, storage: CheckpointStorage | None) -> CheckpointStore:
    """A job's output location: `output` itself, or a path under a storage block."""
    from prefect_vllm._store.checkpoint import CheckpointStore

    return storage.store(output) if storage is not None else CheckpointStore(output)


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
