"""Result storage on a local disk or S3, with atomic writes.

Every file the pipeline publishes under OUT goes through :func:`write_bytes_atomic`, so a
reader never sees a half-written file under its final name:

- local: write ``<name>.tmp-<uuid>`` in the same directory, fsync, then ``os.replace``
  (atomic on POSIX within one file system);
- S3: one ``PutObject`` of the whole body. S3 makes an object visible only when the upload
  completes, so a killed writer leaves either the old object or none. (A multipart upload is
  equally all-or-nothing, but a single put keeps it simple; vote shards are small.)

The S3 endpoint, credentials and region come from the standard AWS environment/config chain
(``AWS_ENDPOINT_URL_S3`` for a MinIO or moto server). Credentials are
never logged, never put in error messages, and never written into OUT.

Every function takes the file system as ``fs`` when the caller holds one (a
:class:`tasks.common.run_dir.RunDir` does: one S3 session for a whole run); without it, one is
made for the URI (:func:`densepure_core.remote.filesystem_for`, a new S3 session each time).
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from densepure_core.remote import filesystem_for
from tasks.common.faults import fault_point

__all__ = [
    "is_s3",
    "split_uri",
    "join",
    "exists",
    "read_bytes",
    "read_text",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_parquet_atomic",
    "list_files",
    "remove",
    "StorageError",
    "wrap_error",
]


class StorageError(OSError):
    """A storage operation failed; the message names the URI and what to check."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_uri(uri: str, fs: fsspec.AbstractFileSystem | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem (``fs`` when given) and the path inside it for a local path or an ``s3://`` URI."""
    if fs is None:
        return filesystem_for(uri)
    return fs, (uri[len("s3://"):] if is_s3(uri) else os.path.abspath(uri))


def join(uri: str, *parts: str) -> str:
    """Join path components; keeps the ``s3://`` scheme."""
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://"):], *parts)
    return os.path.join(uri, *parts)


def wrap_error(uri: str, action: str, exc: Exception) -> StorageError:
    hint = ""
    if is_s3(uri):
        hint = (" Check that the bucket exists, the credentials in the AWS environment allow it, "
                "and AWS_ENDPOINT_URL_S3 points at a reachable endpoint if you use one.")
    elif isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        hint = " The disk is full: free space or choose another --out; finished files are kept."
    # str(exc) of botocore errors never contains the secret key; keep only the type and text.
    return StorageError(f"could not {action} {uri}: {type(exc).__name__}: {exc}.{hint}")


def exists(uri: str, fs: fsspec.AbstractFileSystem | None = None) -> bool:
    fs, path = split_uri(uri, fs)
    try:
        return fs.exists(path)
    except Exception as exc:  # unreachable endpoint etc.
        raise wrap_error(uri, "check", exc) from exc


def read_bytes(uri: str, fs: fsspec.AbstractFileSystem | None = None) -> bytes:
    fs, path = split_uri(uri, fs)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise wrap_error(uri, "read", exc) from exc


def read_text(uri: str, fs: fsspec.AbstractFileSystem | None = None) -> str:
    return read_bytes(uri, fs).decode("utf-8")


def write_bytes_atomic(uri: str, data: bytes, fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Publish ``data`` under ``uri`` all at once (see the module docstring)."""
    fs, path = split_uri(uri, fs)
    try:
        if is_s3(uri):
            fs.pipe_file(path, data)
            return
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if "/votes/" in path:
                fault_point("vote:during-write")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except StorageError:
        raise
    except Exception as exc:
        raise wrap_error(uri, "write", exc) from exc


def write_text_atomic(uri: str, text: str, fs: fsspec.AbstractFileSystem | None = None) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"), fs)


def write_parquet_atomic(uri: str, table: pa.Table, fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Serialize ``table`` to Parquet in memory, then publish it atomically."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes_atomic(uri, buf.getvalue(), fs)


def remove(uri: str, fs: fsspec.AbstractFileSystem | None = None) -> bool:
    """Delete the file ``uri`` if it exists; True when something was deleted.

    A delete is atomic on both backends: a reader sees the whole file or none.
    """
    fs, path = split_uri(uri, fs)
    try:
        if not fs.exists(path):
            return False
        fs.rm_file(path)
    except FileNotFoundError:  # removed in between
        return False
    except Exception as exc:
        raise wrap_error(uri, "delete", exc) from exc
    return True


def list_files(uri: str, suffix: str = "", fs: fsspec.AbstractFileSystem | None = None) -> list[str]:
    """All files under ``uri`` (recursive) ending with ``suffix``, as URIs; [] if absent.

    Hidden temporary files (``.name.tmp-*``) are never listed.
    """
    fs, path = split_uri(uri, fs)
    try:
        if not fs.exists(path):
            return []
        found = fs.find(path)
    except Exception as exc:
        raise wrap_error(uri, "list", exc) from exc
    out = []
    for p in sorted(found):
        if not p.endswith(suffix) or posixpath.basename(p).startswith("."):
            continue
        out.append("s3://" + p if is_s3(uri) else p)
    return out
