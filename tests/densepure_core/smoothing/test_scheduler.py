"""The engine's host side with a stub backend: no models, no device, just ids -> labels."""

import hashlib

import numpy as np
import pytest

from densepure_core.smoothing.scheduler import ImageJob, NonFiniteOutputError, VoteScheduler

K, C = 5, 4


def vote(image_id: str, copy: int, k: int) -> int:
    """A fixed pseudo-random label per (image, copy, vote), skewed so early exit has work."""
    h = hashlib.blake2b(f"{image_id}/{copy}/{k}".encode(), digest_size=2).digest()[0]
    return 1 if h < 110 else h % C


def brute_label(image_id: str, copy: int) -> int:
    """The majority of all K votes, ties to the label seen first."""
    seq = [vote(image_id, copy, k) for k in range(K)]
    counts = np.bincount(seq, minlength=C)
    return next(label for label in seq if counts[label] == counts.max())


class StubBackend:
    """Records what the scheduler asks for; labels come from ``vote``."""

    def __init__(self, size: int, bad: str | None = None):
        self.size = size
        self.slot_copy: dict[int, tuple[str, int]] = {}
        self.batches: list[int] = []
        self.valid: list[int] = []  # rows per batch that are not padding
        self.shapes: list[tuple[int, ...]] = []
        self.bad = bad

    def use_shape(self, shape):
        self.shapes.append(shape)

    def open(self, job, slots, copies):
        assert len(slots) == len(copies)
        for s, j in zip(slots.tolist(), copies):
            self.slot_copy[s] = (job.image_id, j)

    def labels(self, rows, ids):
        self.batches.append(len(rows))
        self.valid.append(sum(i is not None for i in ids))
        out = []
        for s, i in zip(rows.tolist(), ids):
            if i is None:
                out.append(0)  # padding: computed and discarded
                continue
            image_id, copy, k = i
            assert self.slot_copy[s] == (image_id, copy)  # the row holds the copy it claims
            out.append(-1 if image_id == self.bad else vote(image_id, copy, k))
        return np.array(out, dtype=np.int64)


def jobs(names, copies=30, shape=(1, 2, 2)):
    return (ImageJob.of(name, None, shape if not isinstance(shape, dict) else shape[name], range(copies))
            for name in names)


@pytest.mark.parametrize("batch_size", [1, 7, 16, 64])
@pytest.mark.parametrize("early_exit", [True, False])
def test_labels_are_the_brute_force_majority_for_any_batch_size(batch_size, early_exit):
    sched = VoteScheduler(batch_size, C, K, early_exit=early_exit, unet_calls_per_row=3)
    done = list(sched.run(jobs(["a", "b", "c"]), StubBackend(batch_size)))
    assert [j.image_id for j in done] == ["a", "b", "c"]  # input order
    for job in done:
        assert job.labels.tolist() == [brute_label(job.image_id, j) for j in range(30)]
        st = job.stats
        assert st.classifier_calls + st.votes_skipped == 30 * K
        assert st.unet_calls == 3 * st.classifier_calls
        assert (st.votes_skipped > 0) == early_exit


def test_batches_stay_full_across_image_boundaries():
    backend = StubBackend(16)
    list(VoteScheduler(16, C, K).run(jobs(["a", "b", "c", "d"], copies=40), backend))
    full = sum(b == 16 for b in backend.batches)
    assert full >= len(backend.batches) - K  # only the last copies' tail runs short
    assert sum(backend.batches) < 4 * 40 * K  # early exit skipped votes


def test_fixed_shape_pads_every_batch_and_counts_padding():
    backend = StubBackend(16)
    done = list(VoteScheduler(16, C, K, fixed_shape=True).run(jobs(["a"], copies=5), backend))
    assert set(backend.batches) == {16}
    assert done[0].stats.rows_padded == sum(16 - v for v in backend.valid) >= 11 * len(backend.batches)
    assert done[0].stats.classifier_calls == sum(backend.valid)  # padding is never a call
    assert done[0].labels.tolist() == [brute_label("a", j) for j in range(5)]


def test_a_new_image_size_waits_for_open_rows_to_drain():
    backend = StubBackend(8)
    shapes = {"a": (1, 2, 2), "b": (1, 2, 2), "c": (3, 4, 4)}
    done = list(VoteScheduler(8, C, K).run(jobs(["a", "b", "c"], copies=10, shape=shapes), backend))
    assert backend.shapes == [(1, 2, 2), (3, 4, 4)]
    assert [j.labels.tolist() for j in done] == [[brute_label(n, j) for j in range(10)] for n in "abc"]


def test_failed_and_empty_jobs_pass_through_in_order():
    stream = [ImageJob.failed("x", OSError("unreadable")), *jobs(["a"], copies=3),
              ImageJob.of("empty", None, (1, 2, 2), [])]
    done = list(VoteScheduler(4, C, K).run(iter(stream), StubBackend(4)))
    assert [j.image_id for j in done] == ["x", "a", "empty"]
    assert isinstance(done[0].error, OSError) and done[2].labels.size == 0


def test_non_finite_rows_raise_or_isolate_the_image():
    with pytest.raises(NonFiniteOutputError, match="'b'.*clf"):
        list(VoteScheduler(8, C, K, model_name="clf").run(jobs(["a", "b"], copies=6), StubBackend(8, bad="b")))
    done = list(VoteScheduler(8, C, K).run(jobs(["a", "b", "c"], copies=6), StubBackend(8, bad="b"), isolate=True))
    assert [j.error is None for j in done] == [True, False, True]
    assert isinstance(done[1].error, NonFiniteOutputError)
    for job in (done[0], done[2]):
        assert job.labels.tolist() == [brute_label(job.image_id, j) for j in range(6)]
