"""Artifact storage: a local folder or an S3-compatible bucket, with atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from store.settings import Settings


class ArtifactNotFound(KeyError):
    """No artifact at that key."""


class StorageUnavailable(Exception):
    """The store failed to read, write or delete an artifact. The message names the operation and the error's
    class, never a path or an endpoint (clients see it); the original error is its `__cause__`, for the log."""

    @classmethod
    def of(cls, operation: str, exc: BaseException) -> StorageUnavailable:
        return cls(f"could not {operation} an artifact ({type(exc).__name__})")


class ArtifactStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid artifact key {key!r}")
    return key


class LocalArtifactStore:
    """Files under a root folder; a write lands under a temporary name and is renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except OSError as exc:
            raise StorageUnavailable.of("write", exc) from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StorageUnavailable.of("write", exc) from exc
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ArtifactNotFound(key) from exc
        except OSError as exc:
            raise StorageUnavailable.of("read", exc) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageUnavailable.of("delete", exc) from exc


class S3ArtifactStore:
    """Objects in an S3-compatible bucket (a PUT is atomic there)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        import boto3

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url)

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        name = self._key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=name, Body=data, ContentType=content_type)
        except Exception as exc:  # botocore's errors name the bucket and the endpoint
            raise StorageUnavailable.of("write", exc) from exc

    def get(self, key: str) -> bytes:
        name = self._key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=name)
            return bytes(response["Body"].read())
        except self.client.exceptions.NoSuchKey as exc:
            raise ArtifactNotFound(key) from exc
        except Exception as exc:
            raise StorageUnavailable.of("read", exc) from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception:
            return False
        return True

    def delete(self, key: str) -> None:
        name = self._key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=name)
        except Exception as exc:
            raise StorageUnavailable.of("delete", exc) from exc


def artifact_store(settings: Settings) -> ArtifactStore:
    """The store the settings name."""
    if settings.artifact_store == "s3":
        if not settings.s3_bucket:
            raise ValueError("ATELIER_S3_BUCKET is required when ATELIER_ARTIFACT_STORE=s3")
        return S3ArtifactStore(settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url)
    return LocalArtifactStore(settings.artifacts_dir)
