"""Filesystems for local paths and ``s3://`` URIs, configured in one place.

S3 endpoint, credentials and region come from the standard AWS environment/config chain
(``AWS_ENDPOINT_URL_S3`` for a MinIO or moto server). An unreachable endpoint fails within
seconds instead of after botocore's long default retries. Used by the dataset sources here
and by the pipeline's result storage (tasks/storage.py).
"""

from __future__ import annotations

import os

import fsspec

__all__ = ["filesystem_for"]


def filesystem_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a local path or an ``s3://`` URI."""
    if uri.startswith("s3://"):
        # skip_instance_cache: a cached instance would keep the endpoint it was first made with.
        fs = fsspec.filesystem("s3", skip_instance_cache=True,
                               config_kwargs={"connect_timeout": 5, "read_timeout": 30,
                                              "retries": {"max_attempts": 3, "mode": "standard"}})
        return fs, uri[len("s3://"):]
    return fsspec.filesystem("file"), os.path.abspath(uri)
