"""Overlapped image loading for the engine: :func:`prefetch`."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["prefetch"]

T = TypeVar("T")


_END = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate over ``items`` in a background thread, up to ``depth`` items ahead.

    Overlapped data loading: while the device certifies one image, the next ones are read and
    decoded (file and S3 reads, PIL and torch release the GIL). Order is kept; an exception in
    the loader is raised here, at the item where it happened. ``depth=0`` iterates inline.

    Example:
        >>> images = prefetch((rec.image_id, load_image(rec, ds)) for rec in records)
        >>> for res in sbc.certify_many(images, n0, n): ...
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, _END))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put((False, exc))

    thread = threading.Thread(target=work, name="densepure-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if ok:
                yield item
            elif item is _END:
                return
            else:
                raise item
    finally:
        stop.set()
