"""One run's directory, OUT: its file system, its layout, its metadata.

A :class:`RunDir` is made once at the edge (the CLI, a flow, a deployment) from the user's
``--out`` and passed down to every stage. It holds:

- the root (a local path as given, or ``s3://bucket/prefix``) and one file system for it, so a
  whole run reads and writes through one S3 session instead of opening one per call;
- the layout of OUT (docs/schema.md): every path of every job is a method here and nowhere else
  (``run.shard_uri(0.25, "dds", 3)`` is ``OUT/votes/sigma=0.25/method=dds/shard=00003.parquet``);
- atomic reads and writes under it (:mod:`tasks.common.storage` with this file system);
- the run's metadata: ``config.yaml`` (the resolved config, whose ``job:`` says which job wrote
  OUT) and ``run.json``;
- the lease a running job holds on it (``run.lease(holder)``, :mod:`tasks.common.lease`).

It pickles without its file system (a Ray worker that receives one opens its own), so it travels
in shard tasks and Prefect task parameters::

    run = RunDir("results/run1")
    run.write_text(run.config_uri, cfg.to_yaml())
    for uri in run.vote_files():
        ...

The layout::

    OUT/
      config.yaml, manifest.parquet, run.json          the plan (every job)
      lease.json                                       the lease of the run writing OUT (while it runs)
      votes/sigma=<s>/method=<m>/shard=<id>.parquet    VOTES_SCHEMA, one row per image
      errors/sigma=<s>/method=<m>/shard=<id>.parquet   ERRORS_SCHEMA, quarantined images
      tables/certificates.parquet, accuracy.parquet, summary.json
      report.md, certified_accuracy.png
      tsv/sigma=<s>_method=<m>.tsv
      attacks/defense=<d>/threat=<t>/attack=<a>/shard=<id>.parquet         (densepure attack)
      attack_errors/defense=<d>/threat=<t>/attack=<a>/shard=<id>.parquet
      tables/attack_summary.parquet
      train/step-<N>/, metrics/steps=<a>-<b>.parquet, model/              (densepure train-addt)
      logs/error-<time>.log                                                 (unexpected failures)

``<s>`` is :func:`tasks.common.layout.format_sigma`, ``<m>`` the method's name verbatim, ``<id>``
the shard number zero-padded to 5 digits. The schemas are in :mod:`tasks.common.layout`.
"""

from __future__ import annotations

import contextlib
import json
import os
import types
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

import fsspec
import pyarrow as pa
import yaml

from tasks.common import storage
from tasks.common.layout import LayoutError, format_sigma, names, parse_vote_path

__all__ = ["RunDir"]


class RunDir:
    """One OUT: root, file system, layout and metadata (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        root = os.fspath(root)
        if not root:
            raise ValueError("an empty OUT: pass --out DIR or s3://bucket/prefix")
        self.root = root

    @classmethod
    def of(cls, out: "RunDir | str | os.PathLike") -> "RunDir":
        """``out`` itself when it is a RunDir, else a RunDir for that root."""
        return out if isinstance(out, RunDir) else cls(out)

    def __repr__(self) -> str:
        return f"RunDir({self.root!r})"

    def __str__(self) -> str:
        return self.root

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def __getstate__(self) -> dict[str, Any]:
        # Only the root travels: the file system (an S3 session) is opened again where it lands.
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root = state["root"]

    # -------------------------------------------------------------------- the file system
    @property
    def is_s3(self) -> bool:
        return storage.is_s3(self.root)

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The run's one file system (one S3 session for the whole run)."""
        return storage.split_uri(self.root)[0]

    def path(self, *parts: str) -> str:
        """``OUT/<parts...>`` (keeps the ``s3://`` scheme)."""
        return storage.join(self.root, *parts)

    def exists(self, uri: str) -> bool:
        return storage.exists(uri, self.fs)

    def read_bytes(self, uri: str) -> bytes:
        return storage.read_bytes(uri, self.fs)

    def read_text(self, uri: str) -> str:
        return storage.read_text(uri, self.fs)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Publish ``data`` under ``uri`` atomically (:func:`tasks.common.storage.write_bytes_atomic`)."""
        storage.write_bytes_atomic(uri, data, self.fs)

    def write_text(self, uri: str, text: str) -> None:
        storage.write_text_atomic(uri, text, self.fs)

    def write_parquet(self, uri: str, table: pa.Table) -> None:
        storage.write_parquet_atomic(uri, table, self.fs)

    def remove(self, uri: str) -> bool:
        return storage.remove(uri, self.fs)

    def list_files(self, uri: str, suffix: str = "") -> list[str]:
        return storage.list_files(uri, suffix, self.fs)

    # -------------------------------------------------------------------- the plan (every job)
    @property
    def config_uri(self) -> str:
        return self.path("config.yaml")

    @property
    def manifest_uri(self) -> str:
        return self.path("manifest.parquet")

    @property
    def run_uri(self) -> str:
        return self.path("run.json")

    @property
    def report_uri(self) -> str:
        return self.path("report.md")

    @property
    def logs_dir(self) -> str:
        """``OUT/logs``: the tracebacks of unexpected failures."""
        return self.path("logs")

    def read_config(self) -> dict | None:
        """The stored ``config.yaml`` as a mapping, or None when OUT has none."""
        if not self.exists(self.config_uri):
            return None
        data = yaml.safe_load(self.read_text(self.config_uri))
        return data if isinstance(data, dict) else {}

    def read_run(self) -> dict | None:
        """The stored ``run.json``, or None when OUT has none (no complete plan)."""
        if not self.exists(self.run_uri):
            return None
        return json.loads(self.read_text(self.run_uri))

    def write_run(self, run: dict) -> None:
        self.write_text(self.run_uri, json.dumps(run, indent=2))

    def record_status(self, status: str, error: str | None = None) -> None:
        """Say in run.json how the run's flow stands: ``running`` (from the plan on), then
        ``complete``, ``partial`` (published with missing images, or stopped) or ``failed`` (with
        the error's first line), with ``ended_at``. The ``runs`` view reads it."""
        meta = self.read_run()
        if meta is None:  # no complete plan: nothing ran
            return
        meta["status"] = status
        if status == "running":
            meta.pop("ended_at", None)
            meta.pop("error", None)
        else:
            meta["ended_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if error:
            meta["error"] = error.strip().splitlines()[0][:500] if error.strip() else error
        self.write_run(meta)

    @contextlib.contextmanager
    def running(self):
        """Record the run as ``running`` for the block, then ``complete`` (``partial`` if the block
        set ``.partial`` on what it yields, or on Ctrl-C) or ``failed`` with the error."""
        state = types.SimpleNamespace(partial=False)
        self.record_status("running")
        try:
            yield state
        except KeyboardInterrupt:
            self.record_status("partial", "interrupted")
            raise
        except Exception as exc:
            from tasks.common.workers import root_cause

            cause = root_cause(exc)  # the worker's error, not Ray's wrapper around it
            self.record_status("failed", f"{type(cause).__name__}: {cause}")
            raise
        self.record_status("partial" if state.partial else "complete")

    def lease(self, holder: str):
        """This run's exclusive lease on OUT (:class:`tasks.common.lease.Lease`), not yet taken:
        ``with run.lease("certify 'nightly'"):`` holds it for the block."""
        from tasks.common.lease import Lease

        return Lease(self, holder)

    def job(self) -> str | None:
        """The job that planned OUT (``certify``, ``attack``, ``train-addt``), None when it holds no plan."""
        config = self.read_config()
        if config is None:
            return None
        return config.get("job") or "certify"

    # -------------------------------------------------------------------- certification
    @property
    def votes_dir(self) -> str:
        return self.path("votes")

    @property
    def errors_dir(self) -> str:
        return self.path("errors")

    def shard_uri(self, sigma: float, method: str, shard: int) -> str:
        """``OUT/votes/sigma=<s>/method=<m>/shard=<id>.parquet``: one shard's votes."""
        return _partition(self.votes_dir, sigma, method, shard)

    def errors_uri(self, sigma: float, method: str, shard: int) -> str:
        """``OUT/errors/sigma=<s>/method=<m>/shard=<id>.parquet``: one shard's quarantined images."""
        return _partition(self.errors_dir, sigma, method, shard)

    def vote_files(self) -> list[str]:
        """Every vote shard under ``OUT/votes``, sorted ([] when there are none).

        Raises:
            LayoutError: a ``.parquet`` file under ``OUT/votes`` is outside the layout, so it
                would be silently ignored (or silently read) otherwise.
        """
        files = self.list_files(self.votes_dir, ".parquet")
        stray = [f for f in files if parse_vote_path(f) is None]
        if stray:
            raise LayoutError(
                f"{len(stray)} Parquet file(s) under {self.votes_dir} are not in the "
                f"layout votes/sigma=<s>/method=<m>/shard=<id>.parquet: {names(stray)}. Move them "
                "out of OUT/votes (aggregate reads every vote shard and nothing else).")
        return files

    def error_files(self) -> list[str]:
        """Every errors file under ``OUT/errors``, sorted ([] when no image was quarantined)."""
        return self.list_files(self.errors_dir, ".parquet")

    @property
    def tables_dir(self) -> str:
        return self.path("tables")

    def tables_uri(self, name: str) -> str:
        """``OUT/tables/<name>`` (``certificates.parquet``, ``accuracy.parquet``, ``summary.json``...)."""
        return storage.join(self.tables_dir, name)

    @property
    def plot_uri(self) -> str:
        return self.path("certified_accuracy.png")

    @property
    def tsv_dir(self) -> str:
        return self.path("tsv")

    # -------------------------------------------------------------------- attack evaluation
    @property
    def attacks_dir(self) -> str:
        return self.path("attacks")

    @property
    def attack_errors_dir(self) -> str:
        return self.path("attack_errors")

    def attack_shard_uri(self, defense: str, threat: str, attack: str, shard: int) -> str:
        """``OUT/attacks/defense=<d>/threat=<t>/attack=<a>/shard=<id>.parquet``: one shard's rows."""
        return _attack_partition(self.attacks_dir, defense, threat, attack, shard)

    def attack_errors_uri(self, defense: str, threat: str, attack: str, shard: int) -> str:
        """``OUT/attack_errors/defense=<d>/threat=<t>/attack=<a>/shard=<id>.parquet``: its quarantined images."""
        return _attack_partition(self.attack_errors_dir, defense, threat, attack, shard)

    def attack_files(self) -> list[str]:
        """Every attack shard under ``OUT/attacks``, sorted ([] when there are none)."""
        return self.list_files(self.attacks_dir, ".parquet")

    def attack_error_files(self) -> list[str]:
        """Every errors file under ``OUT/attack_errors``, sorted."""
        return self.list_files(self.attack_errors_dir, ".parquet")

    # -------------------------------------------------------------------- ADDT training
    @property
    def train_dir(self) -> str:
        """``OUT/train``: Ray Train's run folder (checkpoints ``step-<N>/``, its snapshot)."""
        return self.path("train")

    @property
    def model_dir(self) -> str:
        """``OUT/model``: the fine-tuned model (EMA weights), a diffusers DDPMPipeline folder."""
        return self.path("model")

    @property
    def metrics_dir(self) -> str:
        return self.path("metrics")

    def metrics_uri(self, first: int, last: int) -> str:
        """``OUT/metrics/steps=<first>-<last>.parquet``: the metrics of steps first..last."""
        return storage.join(self.metrics_dir, f"steps={first:06d}-{last:06d}.parquet")

    def metrics_files(self) -> list[str]:
        """Every training-metrics file under ``OUT/metrics``, sorted."""
        return self.list_files(self.metrics_dir, ".parquet")


def _partition(root: str, sigma: float, method: str, shard: int) -> str:
    return storage.join(root, f"sigma={format_sigma(sigma)}", f"method={method}", f"shard={int(shard):05d}.parquet")


def _attack_partition(root: str, defense: str, threat: str, attack: str, shard: int) -> str:
    return storage.join(root, f"defense={defense}", f"threat={threat}", f"attack={attack}",
                        f"shard={int(shard):05d}.parquet")
