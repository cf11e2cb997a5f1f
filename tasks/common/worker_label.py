"""The ``worker`` value that vote and attack rows record: which actor, on which Ray node.

On a cluster a shard's row must say where it was computed (a slow or faulty node is found
with ``densepure sql OUT "SELECT worker, ... FROM votes GROUP BY worker"``). The actor's name
alone (``actor-0``) does not say that: Ray places actors on nodes after they are named.
A leaf: imports no other tasks module.
"""

from __future__ import annotations

import os
import socket

__all__ = ["worker_label"]


def worker_label(name: str | None) -> str:
    """``name@host/node`` inside a Ray worker (node: the first 8 hex digits of the Ray node id,
    which tells apart nodes that share a host name, e.g. two nodes on one machine); ``name``
    when not in Ray; ``host:pid`` when there is no name."""
    if not name:
        return f"{socket.gethostname()}:{os.getpid()}"
    try:
        import ray

        if not ray.is_initialized():
            return name
        node = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - no Ray, or not in a Ray process: the name is all there is
        return name
    return f"{name}@{socket.gethostname()}/{node[:8]}"
