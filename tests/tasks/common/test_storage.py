"""Local storage: atomic publication, listing without temporaries, clear errors."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.common import storage


def test_write_is_atomic_and_leaves_no_temporaries(tmp_path):
    uri = str(tmp_path / "a" / "b.parquet")
    storage.write_parquet_atomic(uri, pa.table({"x": [1, 2, 3]}))
    assert pq.read_table(uri).column("x").to_pylist() == [1, 2, 3]
    assert os.listdir(tmp_path / "a") == ["b.parquet"]
    assert storage.list_files(str(tmp_path), ".parquet") == [uri]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    uri = str(tmp_path / "f.txt")
    storage.write_text_atomic(uri, "old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(storage.StorageError, match="disk is full"):
        storage.write_text_atomic(uri, "new")
    assert open(uri).read() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # the temporary was removed


def test_hidden_temporaries_are_not_listed(tmp_path):
    (tmp_path / ".x.parquet.tmp-123").write_bytes(b"partial")
    (tmp_path / "y.parquet").write_bytes(b"")
    assert storage.list_files(str(tmp_path), ".parquet") == [str(tmp_path / "y.parquet")]
    assert storage.list_files(str(tmp_path / "absent")) == []


def test_join_keeps_scheme():
    assert storage.join("s3://bucket/p", "votes", "x.parquet") == "s3://bucket/p/votes/x.parquet"
    assert storage.join("/tmp/o", "a") == "/tmp/o/a"
