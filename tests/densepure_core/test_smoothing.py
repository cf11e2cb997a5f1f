"""The smoothed base classifier: votes, ties, exact early exit, batch/order invariance."""

import itertools

import numpy as np
import pytest
import torch

from densepure_core.smoothing import (
    _UNSEEN,
    NonFiniteOutputError,
    SmoothedBaseClassifier,
    VoteStats,
    majority_decided,
)


class NoisyPurifier:
    """A stand-in stochastic purifier: adds reverse-process noise drawn from RowNoise."""

    stochastic = True
    unet_calls_per_purification = 3

    def __call__(self, x, noise):
        return x + 0.6 * noise.draw()


class Identity:
    stochastic = False
    unet_calls_per_purification = 0

    def __call__(self, x, noise):
        assert noise is None
        return x


def tiny_classifier(num_classes=4, channels=1, size=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * size * size, num_classes))
    return model.eval()


def image(size=4):
    g = torch.Generator().manual_seed(1)
    return torch.rand((1, size, size), generator=g)


def make(votes=5, batch_size=16, early_exit=True, purifier=None, **kw):
    return SmoothedBaseClassifier(tiny_classifier(), purifier or NoisyPurifier(), sigma=0.5, votes=votes,
                                  num_classes=4, batch_size=batch_size, early_exit=early_exit, run_seed=7, **kw)


def brute_majority(seq, num_classes):
    """Majority of a full vote sequence, ties to the label seen first."""
    counts = np.bincount(seq, minlength=num_classes)
    best = counts.max()
    for label in seq:  # first-seen order
        if counts[label] == best:
            return label


def test_majority_decided_matches_brute_force_on_all_sequences():
    # K = 4 votes over 3 labels: for every prefix, "decided" must mean every continuation
    # gives the same final majority, and "undecided" must mean some continuation differs.
    K, C = 4, 3
    for seq in itertools.product(range(C), repeat=K):
        for m in range(1, K + 1):
            prefix = seq[:m]
            counts = np.bincount(prefix, minlength=C)[None].astype(np.int64)
            first = np.full((1, C), _UNSEEN, dtype=np.int64)
            for i, lab in enumerate(prefix):
                first[0, lab] = min(first[0, lab], i)
            leader, decided = majority_decided(counts, first, np.array([m]), K, early_exit=True)
            finals = {brute_majority(list(prefix) + list(rest), C)
                      for rest in itertools.product(range(C), repeat=K - m)}
            assert decided[0] == (len(finals) == 1), (prefix, finals)
            if decided[0]:
                assert finals == {leader[0]}


def test_tie_goes_to_earliest_vote():
    counts = np.array([[2, 2, 0]], dtype=np.int64)
    first = np.array([[1, 0, _UNSEEN]], dtype=np.int64)  # label 1 seen first
    leader, decided = majority_decided(counts, first, np.array([4]), 4, early_exit=False)
    assert leader[0] == 1 and decided[0]


def test_early_exit_is_exact_and_saves_calls():
    x = image()
    full = make(early_exit=False)
    fast = make(early_exit=True)
    s_full, s_fast = VoteStats(), VoteStats()
    c_full = full.counts(x, "img-a", range(200), s_full)
    c_fast = fast.counts(x, "img-a", range(200), s_fast)
    np.testing.assert_array_equal(c_full, c_fast)
    assert s_full.classifier_calls == 200 * 5 and s_full.unet_calls == 200 * 5 * 3
    assert s_fast.classifier_calls < s_full.classifier_calls
    assert s_fast.classifier_calls + s_fast.votes_skipped == 200 * 5


@pytest.mark.parametrize("batch_size", [1, 7, 64, 500])
def test_counts_do_not_depend_on_batch_size(batch_size):
    x = image()
    ref = make(batch_size=16).labels(x, "img-b", range(120))
    got = make(batch_size=batch_size).labels(x, "img-b", range(120))
    np.testing.assert_array_equal(ref, got)


def test_labels_do_not_depend_on_order_or_padding():
    x = image()
    sbc = make()
    fwd = sbc.labels(x, "img-c", range(50))
    rev = sbc.labels(x, "img-c", list(reversed(range(50))))
    np.testing.assert_array_equal(fwd, rev[::-1])
    padded = make(pad_batches=True, batch_size=32).labels(x, "img-c", range(50))
    np.testing.assert_array_equal(fwd, padded)


def test_pinned_counts_and_ids_matter():
    x = image()
    sbc = make()
    counts0, counts, stats = sbc.selection_and_estimation(x, "img-d", n0=20, n=100)
    assert counts0.sum() == 20 and counts.sum() == 100
    # Pinned: any change to seeding, noise or the vote rule changes these.
    assert counts0.tolist() == PINNED_COUNTS0
    assert counts.tolist() == PINNED_COUNTS
    other = make().counts(x, "img-e", range(20, 120))
    assert other.tolist() != counts.tolist()  # a different image id draws different noise


PINNED_COUNTS0 = [1, 13, 0, 6]
PINNED_COUNTS = [1, 54, 0, 45]


def test_plain_rs_has_no_unet_calls():
    stats = VoteStats()
    sbc = make(votes=1, purifier=Identity())
    counts = sbc.counts(image(), "img-f", range(30), stats)
    assert counts.sum() == 30 and stats.unet_calls == 0 and stats.classifier_calls == 30


def test_votes_need_a_stochastic_purifier():
    with pytest.raises(ValueError, match="stochastic"):
        make(votes=3, purifier=Identity())


def test_nan_logits_name_the_image():
    class NaNClassifier(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 4), float("nan"))

    sbc = SmoothedBaseClassifier(NaNClassifier(), Identity(), 0.5, num_classes=4, model_name="clf")
    with pytest.raises(NonFiniteOutputError, match="img-nan"):
        sbc.counts(image(), "img-nan", range(3))
