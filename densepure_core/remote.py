"""Filesystems for local paths and ``s3://`` URIs, configured in one place.

S3 endpoint, credentials and region come from the standard AWS environment/config chain
(``AWS_ENDPOINT_URL_S3`` for a MinIO or moto server). An unreachable endpoint fails within
seconds instead of after botocore's long default retries. Used by the dataset sources here
by the pipeline's result storage (tasks/common/storage.py) and by the S3 model cache (models/diffusion.py).
"""

from __future__ import annotations

import copy
import os

import fsspec

__all__ = ["S3_CONFIG_KWARGS", "filesystem_for"]


#: botocore settings of every S3 filesystem: fail within seconds, not after long default retries.
S3_CONFIG_KWARGS = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 3, "mode": "standard"}}


def filesystem_for(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a local path or an ``s3://`` URI.

    ``storage_options`` (S3 only): extra s3fs arguments (``endpoint_url``, ``key``, ...); its
    ``config_kwargs`` are merged over :data:`S3_CONFIG_KWARGS`, so the timeouts stay unless
    overridden one by one.
    """
    if uri.startswith("s3://"):
        options = dict(storage_options or {})
        # a fresh copy per call: botocore rewrites the retries dict it is given in place
        config_kwargs = copy.deepcopy({**S3_CONFIG_KWARGS, **dict(options.pop("config_kwargs", None) or {})})
        options.pop("skip_instance_cache", None)
        # skip_instance_cache: a cached instance would keep the endpoint it was first made with.
        # use_listings_cache=False: one filesystem serves a whole run (tasks.common.run_dir) while
        # Ray workers in other processes rewrite its objects; a cached listing would carry stale
        # sizes and ETags (s3fs then fails with FileExpired on a shard rewritten meanwhile).
        options.setdefault("use_listings_cache", False)
        fs = fsspec.filesystem("s3", skip_instance_cache=True, config_kwargs=config_kwargs, **options)
        return fs, uri[len("s3://"):]
    return fsspec.filesystem("file"), os.path.abspath(uri)
