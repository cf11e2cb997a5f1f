"""Live progress of a shard stage (vote, attack) on stderr: done/total, rate, ETA.

Shards found complete on a resume are counted, not listed: they arrive first (the stages check
them before any worker starts), and one line says how many there were, however many (a resumed
50,000-image run used to print 3,150 "skipped" lines). Each computed shard gets a line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ShardProgress"]


@dataclass
class ShardProgress:
    """Call it with each shard result (``images``, ``quarantined``, ``skipped``, ``seconds``);
    :meth:`finish` when the stage returns.

    Args:
        total: items the stage handles (images x partitions).
        stage: the line's tag (``vote``, ``attack``).
        unit: what ``total`` counts (``images``, ``image-partitions``).
        describe: the result's partition and shard, for its line.
    """

    total: int
    stage: str
    unit: str
    describe: Callable[[Any], str]
    done: int = 0
    computed: int = 0
    skipped_shards: int = 0
    skipped_reported: bool = False
    start: float = field(default_factory=time.perf_counter)
    stream: object = field(default_factory=lambda: sys.stderr)

    def __call__(self, res) -> None:
        handled = res.images + res.quarantined  # quarantined items are done too
        self.done += handled
        if res.skipped:
            self.skipped_shards += 1
            return
        self._report_skipped()
        self.computed += handled
        elapsed = time.perf_counter() - self.start
        rate = self.computed / elapsed if elapsed > 0 else 0.0
        remaining = self.total - self.done
        # No rate before the first computed shard: the ETA is unknown then, not "nan".
        eta = f"{remaining / rate:.0f}s" if rate > 0 else ("0s" if remaining <= 0 else "-")
        self._line(f"{rate:.2f} {self.unit}/s  ETA {eta}  | {self.describe(res)} {res.seconds:.1f}s")

    def finish(self) -> None:
        """Report complete shards that no computed shard followed (a run that had nothing left)."""
        self._report_skipped()

    def _report_skipped(self) -> None:
        if self.skipped_shards and not self.skipped_reported:
            self.skipped_reported = True
            self._line(f"{self.skipped_shards} shard(s) already complete, skipped (complete)")

    def _line(self, text: str) -> None:
        print(f"  [{self.stage}] {self.done}/{self.total} {self.unit} ({100 * self.done / max(1, self.total):.0f}%)  "
              f"{text}", file=self.stream, flush=True)
