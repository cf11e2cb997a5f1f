"""Named fault-injection points, for the reliability tests (docs/reliability.md).

A test sets ``DENSEPURE_FAULT=<point>`` (optionally ``<point>@<n>``: on the n-th time the point
is reached in a process) and ``DENSEPURE_FAULT_ONCE=<file>``; the first process to reach the
point creates the file and kills its whole process group with SIGKILL: the certify driver, the
local Ray cluster and its actors, as a power cut or an OOM kill would. Later processes (a
restarted actor, the rerun) see the file and go on. Points:

- ``plan:after-config``: config.yaml written, manifest and run.json not yet;
- ``vote:mid-shard``: an actor has certified an image of a shard, nothing of the shard written;
- ``vote:during-write``: a shard's bytes are in a temporary file, not yet under the final name;
- ``aggregate:after-certificates``: certificates.parquet published, accuracy and summary not;
- ``attack:mid-shard``: an attack actor has attacked a shard in memory, nothing of it written.
- ``train:after-step``: a Ray Train worker of ``densepure train-addt`` has finished a step (counted
  per worker process; checkpoints are reported every ``checkpoint_every`` steps).

With ``DENSEPURE_FAULT_SIGNAL=self`` only the reaching process is killed (an actor crash).
Without ``DENSEPURE_FAULT`` every call is a dictionary lookup and returns.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

__all__ = ["fault_point", "record_driver_process_group"]

_hits: Counter[str] = Counter()


def record_driver_process_group() -> None:
    """Record the driver's process group in the environment, for the processes it starts.

    Called by the driver (the CLI entry point, and before it starts a local Ray) so that a
    fault reached inside a Ray actor (which runs in a process group of its own, but inherits
    the environment) kills the whole run, driver included. Without ``DENSEPURE_FAULT`` it does
    nothing; a group recorded earlier (by the driver, seen from a child) is kept.
    """
    if os.environ.get("DENSEPURE_FAULT"):
        os.environ.setdefault("DENSEPURE_FAULT_PGID", str(os.getpgid(0)))


def fault_point(name: str) -> None:
    spec = os.environ.get("DENSEPURE_FAULT")
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] < int(nth or 1):
        return
    once = os.environ.get("DENSEPURE_FAULT_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if os.environ.get("DENSEPURE_FAULT_SIGNAL") == "self":
        os.kill(os.getpid(), signal.SIGKILL)
    driver = int(os.environ.get("DENSEPURE_FAULT_PGID", os.getpgid(0)))
    if driver != os.getpgid(0):
        os.killpg(driver, signal.SIGKILL)
    os.killpg(os.getpgid(0), signal.SIGKILL)
