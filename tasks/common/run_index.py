"""Finding the runs under one or more locations, with their files and metadata, in few reads.

A location is an OUT (a folder holding ``config.yaml``) or a *run store*: a prefix holding many
OUTs at any depth (``store/<deployment>/<UTC time>-<name>/``, see :mod:`tasks.common.store`).
:func:`index_runs` lists each location once, recursively (one listing per location, not one per
run), groups the files by the OUT they belong to, and reads every run's ``run.json`` and
``config.yaml`` in one batch. The SQL views of every job are built from the result
(:mod:`tasks.common.sql`), so ``densepure sql STORE`` over 1,000 runs costs one listing and 2,000
small reads before the first query, and the Parquet itself is scanned lazily.

A run's *status*:

- ``complete``: its flow finished (run.json ``status``), or, for runs recorded before the status
  existed, its results are published (certify: ``tables/summary.json`` without missing images;
  attack: ``tables/attack_summary.parquet``; train-addt: the exported model);
- ``failed``: its flow ended with an error (run.json ``status: failed`` and ``error``);
- ``partial``: anything else: running, stopped (killed, Ctrl-C) or published with missing images.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field

import yaml

from tasks.common import storage
from tasks.common.run_dir import RunDir

__all__ = ["RunFiles", "index_runs", "RunIndexError", "STATUSES"]

STATUSES = ("complete", "partial", "failed")

# the folders of an OUT whose Parquet files the views read, by kind
_KINDS = {"votes": "votes", "errors": "errors", "attacks": "attacks", "attack_errors": "attack_errors",
          "metrics": "metrics", "tables": "tables"}


class RunIndexError(ValueError):
    """A location holds no run; the message names it."""


@dataclass
class RunFiles:
    """One run: its handle, metadata and files by kind (``votes``, ``errors``, ``attacks``,
    ``attack_errors``, ``metrics``, ``tables``: sorted URIs; ``other``: everything else)."""

    run: RunDir
    meta: dict | None
    config: dict
    files: dict[str, list[str]] = field(default_factory=dict)
    other: set[str] = field(default_factory=set)

    @property
    def job(self) -> str:
        return (self.meta or {}).get("job") or self.config.get("job") or "certify"

    @property
    def run_id(self) -> str | None:
        return (self.meta or {}).get("run_id")

    def of(self, kind: str) -> list[str]:
        return self.files.get(kind, [])

    @property
    def status(self) -> str:
        recorded = (self.meta or {}).get("status")
        if recorded in ("complete", "failed"):
            return recorded
        if recorded is None and self.meta is not None:  # recorded before the status existed
            if self.job == "attack" and self.run.tables_uri("attack_summary.parquet") in self.of("tables"):
                return "complete"
            if self.job == "train-addt" and self.meta.get("model"):
                return "complete"
            if self.job == "certify" and self.run.tables_uri("certificates.parquet") in self.of("tables"):
                tables = self.meta.get("tables")
                return "complete" if tables else "partial"
        return "partial"


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _list(location: str) -> list[str]:
    """Every file under ``location`` as a URI (one recursive listing)."""
    return storage.list_files(location)


def index_runs(locations: list[str]) -> list[RunFiles]:
    """The runs under ``locations`` (each an OUT or a store), sorted by start time then path.

    Raises:
        RunIndexError: a location holds no run (no ``config.yaml`` anywhere under it).
    """
    runs: dict[str, RunFiles] = {}
    for location in locations:
        location = location.rstrip("/") if len(location) > 1 else location
        files = _list(location)
        roots = sorted({posixpath.dirname(f) for f in files if posixpath.basename(f) == "config.yaml"}, key=len)
        # an OUT is the folder of a config.yaml that is not inside another OUT
        outs: list[str] = []
        for root in roots:
            if not any(root.startswith(o + "/") for o in outs):
                outs.append(root)
        if not outs:
            top = _abs(location)
            if not any(f[len(top) + 1:].split("/", 1)[0] in _KINDS for f in files):
                raise RunIndexError(f"nothing to query under {location}: it holds no densepure run (no config.yaml, "
                                    f"votes, attack rows, training metrics or tables under it); check the path: "
                                    f"pass an OUT or a store of runs (a folder or s3:// prefix holding OUTs)")
            outs = [top]  # results without a plan (written by hand or by a test): one OUT
        by_len = sorted(outs, key=len, reverse=True)
        grouped: dict[str, list[str]] = {o: [] for o in outs}
        for f in files:
            owner = next((o for o in by_len if f.startswith(o + "/")), None)
            if owner is not None:
                grouped[owner].append(f)
        for root, owned in grouped.items():
            if root in runs:
                continue
            # the listing gives absolute local paths; keep the caller's form for a single OUT
            handle = RunDir(location if root.rstrip("/") == _abs(location) else root)
            entry = RunFiles(handle, None, {})
            for f in owned:
                rel = f[len(root) + 1:]
                kind = rel.split("/", 1)[0]
                if kind in _KINDS and f.endswith(".parquet") or (kind == "tables" and rel.endswith(".json")):
                    entry.files.setdefault(_KINDS[kind], []).append(_retarget(f, root, handle.root))
                else:
                    entry.other.add(_retarget(f, root, handle.root))
            for v in entry.files.values():
                v.sort()
            runs[root] = entry
    _read_metadata(list(runs.values()))
    return sorted(runs.values(), key=lambda r: ((r.meta or {}).get("created_at") or "", r.run.root))


def _abs(location: str) -> str:
    import os

    return location if _is_s3(location) else os.path.abspath(location)


def _retarget(uri: str, root: str, new_root: str) -> str:
    return new_root + uri[len(root):] if root != new_root else uri


def _read_metadata(runs: list[RunFiles]) -> None:
    """run.json and config.yaml of every run: one batched read per file system (concurrent on S3)."""
    wanted = {}
    for r in runs:
        for name in ("run.json", "config.yaml"):
            uri = r.run.path(name)
            if uri in r.other:
                wanted[uri] = (r, name)
    if not wanted:
        return
    by_fs: dict[bool, list[str]] = {}
    for uri in wanted:
        by_fs.setdefault(_is_s3(uri), []).append(uri)
    for s3, uris in by_fs.items():
        fs, _ = storage.split_uri(uris[0])
        paths = [u[len("s3://"):] if s3 else u for u in uris]
        contents = fs.cat(paths, on_error="omit") if s3 else {p: open(p, "rb").read() for p in paths}
        for uri, path in zip(uris, paths):
            data = contents.get(path)
            if data is None:
                continue
            r, name = wanted[uri]
            text = data.decode("utf-8")
            if name == "run.json":
                r.meta = json.loads(text)
            else:
                loaded = yaml.safe_load(text)
                r.config = loaded if isinstance(loaded, dict) else {}
