"""The smoothed base classifier: votes, ties, exact early exit, batch/order invariance."""

import itertools

import numpy as np
import pytest
import torch

from densepure_core.smoothing import (
    EngineOptions,
    NonFiniteOutputError,
    SmoothedBaseClassifier,
    VoteStats,
    majority_decided,
)
from densepure_core.smoothing.scheduler import UNSEEN as _UNSEEN
from pins import assert_labels_near


def sbc_of(classifier, purifier, sigma, *, votes=1, num_classes, run_seed=0, **options):
    """A SmoothedBaseClassifier with ``options`` as its EngineOptions."""
    return SmoothedBaseClassifier(classifier, purifier, sigma, votes=votes, num_classes=num_classes,
                                  run_seed=run_seed, options=EngineOptions(**options))


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
    return sbc_of(tiny_classifier(), purifier or NoisyPurifier(), sigma=0.5, votes=votes,
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
    labels = sbc.labels(x, "img-d", range(120))  # copies 0-19 select, 20-119 estimate
    np.testing.assert_array_equal(counts0, np.bincount(labels[:20], minlength=4))
    np.testing.assert_array_equal(counts, np.bincount(labels[20:], minlength=4))
    # Pinned: any change to seeding, noise or the vote rule redraws these (tests/pins.py).
    assert_labels_near(labels, PINNED_LABELS)
    other = make().counts(x, "img-e", range(20, 120))
    assert other.tolist() != counts.tolist()  # a different image id draws different noise


# counts0 [2, 15, 1, 2], counts [7, 46, 5, 42] when made
PINNED_LABELS = ("11011311101111121131312110212333113313113331331001311303131331311311311313130032333311"
                 "1311133132110133311111311133111333")


class RangeRecorder(torch.nn.Module):
    """A classifier that records the range of every batch it is given."""

    def __init__(self):
        super().__init__()
        self.lo, self.hi = float("inf"), float("-inf")

    def forward(self, x):
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        return x.flatten(1)[:, :4]


def test_plain_rs_classifies_the_unclipped_noisy_copy():
    """Regression: Cohen et al. classify x + sigma e itself; only a purifier's output is clipped."""
    from densepure_core.diffusion.purify import make_purifier

    clf = RangeRecorder()
    sbc_of(clf, make_purifier("none", None, None, 1.0), 1.0, num_classes=4).counts(
        image(), "img-rs", range(64))
    assert clf.lo < -1.0 and clf.hi > 2.0  # sigma = 1 noise leaves [0, 1] by far


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

    sbc = sbc_of(NaNClassifier(), Identity(), 0.5, num_classes=4, model_name="clf")
    with pytest.raises(NonFiniteOutputError, match="img-nan"):
        sbc.counts(image(), "img-nan", range(3))


# --------------------------------------------------------------------------- the engine
# Everything below checks the engine's fast paths and switches against the default path.
import dataclasses  # noqa: E402

from model_factory import tiny_ddpm  # noqa: E402

from densepure_core.diffusion.purify import make_purifier, unet_denoiser  # noqa: E402
from densepure_core.rng import RowNoise  # noqa: E402
from densepure_core.smoothing import CertifiedImage, prefetch  # noqa: E402


@pytest.fixture(scope="module")
def ddpms(tmp_path_factory):
    """{learned_range: (unet, schedule)} for a tiny 3-channel 8x8 DDPM."""
    from densepure_core.models import load_diffusion
    from densepure_core.diffusion.schedule import DiffusionSchedule

    out = {}
    for lr in (False, True):
        dm = load_diffusion(str(tiny_ddpm(tmp_path_factory.mktemp(f"ddpm{int(lr)}"), learned_range=lr)))
        out[lr] = (dm.unet, DiffusionSchedule.from_scheduler(dm.scheduler))
    return out


class PoolClassifier(torch.nn.Module):
    """Any image size -> 4 logits (2x2 average pool, linear): for streams of mixed sizes."""

    def __init__(self, channels=3):
        super().__init__()
        torch.manual_seed(0)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.fc = torch.nn.Linear(channels * 4, 4)

    def forward(self, x):
        return self.fc(self.pool(x * 2 - 1).flatten(1) * 8)


class Wrapped:
    """A purify.Purifier hidden behind a plain callable: forces the generic path."""

    def __init__(self, p):
        self.p = p
        self.stochastic = p.stochastic
        self.unet_calls_per_purification = p.unet_calls_per_purification

    def __call__(self, x, noise):
        return self.p(x, noise)


def densepure(ddpms, lr=False, kind="densepure", sigma=0.5, steps=3):
    unet, schedule = ddpms[lr]
    return make_purifier(kind, unet_denoiser(unet), schedule, sigma, steps=steps)


def x3(size=8, seed=2):
    return torch.rand((3, size, size), generator=torch.Generator().manual_seed(seed))


def test_engine_fast_path_equals_generic_path_and_reference_loop(ddpms):
    p = densepure(ddpms)
    clf = PoolClassifier()
    fast = sbc_of(clf, p, 0.5, votes=5, num_classes=4, batch_size=16, run_seed=3)
    slow = sbc_of(clf, Wrapped(p), 0.5, votes=5, num_classes=4, batch_size=7, run_seed=3,
                                  early_exit=False)
    x = x3()
    s_fast = VoteStats()
    got = fast.labels(x, "img-g", range(40), s_fast)
    np.testing.assert_array_equal(got, slow.labels(x, "img-g", range(40)))
    assert s_fast.unet_calls == 3 * s_fast.classifier_calls
    assert s_fast.classifier_calls + s_fast.votes_skipped == 40 * 5
    # Pinned: the tiny DDPM's labels (the fast path, cpu noise; tests/pins.py).
    assert_labels_near(got, PINNED_DDPM_LABELS)


PINNED_DDPM_LABELS = "1112131131303313331333331113231111132133"  # counts [1, 18, 3, 18] when made


def test_certify_many_equals_per_image_counts_and_keeps_order():
    images = [(f"img-{i}", image()) for i in range(4)]
    sbc = make(batch_size=24)
    ref = [sbc.selection_and_estimation(x, i, n0=5, n=30) for i, x in images]
    for bs in (1, 24, 64):
        got = list(make(batch_size=bs).certify_many(iter(images), n0=5, n=30))
        assert [r.image_id for r in got] == [i for i, _ in images]
        for r, (c0, c, st) in zip(got, ref):
            assert isinstance(r, CertifiedImage) and r.seconds >= 0
            np.testing.assert_array_equal(r.counts0, c0)
            np.testing.assert_array_equal(r.counts, c)
            assert r.stats.classifier_calls == st.classifier_calls
            assert r.stats.votes_skipped == st.votes_skipped


def test_certify_many_handles_mixed_image_sizes_and_empty_streams():
    sbc = sbc_of(PoolClassifier(1), NoisyPurifier(), 0.5, votes=3, num_classes=4, batch_size=8)
    images = [("a", image(4)), ("b", image(6)), ("c", image(4))]
    got = {r.image_id: r for r in sbc.certify_many(images, n0=2, n=9)}
    for i, x in images:
        c0, c, _ = sbc.selection_and_estimation(x, i, n0=2, n=9)
        np.testing.assert_array_equal(got[i].counts0, c0)
        np.testing.assert_array_equal(got[i].counts, c)
    assert list(sbc.certify_many([], n0=2, n=9)) == []
    assert sbc.labels(image(), "none", []).shape == (0,)


def test_padded_batches_count_padding_separately():
    stats = VoteStats()
    sbc = make(batch_size=32, pad_batches=True)
    labels = sbc.labels(image(), "img-p", range(50), stats)
    np.testing.assert_array_equal(labels, make(batch_size=32).labels(image(), "img-p", range(50)))
    assert stats.rows_padded > 0
    assert stats.classifier_calls + stats.votes_skipped == 50 * 5
    assert stats.classifier_calls + stats.rows_padded == 32 * stats.batches


@pytest.mark.parametrize("batch_size", [1, 9, 64])
def test_device_noise_counts_do_not_depend_on_batch_size_or_order(batch_size):
    x = image()
    ref = make(batch_size=16, noise_device="device").labels(x, "img-b", range(60))
    got = make(batch_size=batch_size, noise_device="device").labels(x, "img-b", list(reversed(range(60))))
    np.testing.assert_array_equal(ref, got[::-1])


def test_device_noise_is_another_stream_and_pinned():
    x = image()
    device, cpu = make(noise_device="device"), make()
    counts0, counts, _ = device.selection_and_estimation(x, "img-d", n0=20, n=100)
    cpu0, cpu_counts, _ = cpu.selection_and_estimation(x, "img-d", n0=20, n=100)
    assert counts0.sum() == 20 and counts.sum() == 100
    assert (counts0.tolist(), counts.tolist()) != (cpu0.tolist(), cpu_counts.tolist())
    labels = device.labels(x, "img-d", range(120))
    np.testing.assert_array_equal(counts, np.bincount(labels[20:], minlength=4))
    # Pinned: a change to the counter stream (Philox, Box-Muller, key/counter layout) redraws these.
    assert_labels_near(labels, PINNED_DEVICE_LABELS)


# counts0 [0, 10, 0, 10], counts [6, 42, 4, 48] when made
PINNED_DEVICE_LABELS = ("13331133131311331113113033111133310311321131331331301111103131333321132132113313133333"
                        "3331311313133333113303313310331111")


def test_nan_in_a_stream_names_the_image():
    class NaNForB(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros((x.shape[0], 4))
            out[x.flatten(1).min(dim=1).values >= 1.0] = float("nan")  # "b" (+100) clamps to all ones
            return out

    sbc = sbc_of(NaNForB(), Identity(), 0.5, num_classes=4, batch_size=4)
    with pytest.raises(NonFiniteOutputError, match="'b'"):
        list(sbc.certify_many([("a", image()), ("b", image() + 100)], n0=2, n=3))


def test_certify_many_can_isolate_a_failing_image():
    class NaNForOnes(torch.nn.Module):
        def forward(self, x):
            out = torch.stack([x.mean((1, 2, 3)), 1 - x.mean((1, 2, 3)), x[:, 0, 0, 0], x[:, 0, 1, 1]], 1)
            out[x.flatten(1).min(dim=1).values >= 1.0] = float("nan")
            return out

    sbc = sbc_of(NaNForOnes(), NoisyPurifier(), 0.5, votes=3, num_classes=4, batch_size=16)
    images = [("a", image()), ("b", image() + 100), ("c", OSError("unreadable")), ("d", image())]
    got = list(sbc.certify_many(images, n0=4, n=20, errors="return"))
    assert [r.image_id for r in got] == ["a", "b", "c", "d"]
    assert isinstance(got[1].error, NonFiniteOutputError) and "'b'" in str(got[1].error)
    assert isinstance(got[2].error, OSError) and got[2].counts.sum() == 0
    for r in (got[0], got[3]):
        c0, c, _ = sbc.selection_and_estimation(image(), r.image_id, n0=4, n=20)
        assert r.error is None
        np.testing.assert_array_equal(r.counts0, c0)
        np.testing.assert_array_equal(r.counts, c)
    with pytest.raises(OSError, match="unreadable"):
        list(sbc.certify_many(images[2:], n0=4, n=20))
    with pytest.raises(ValueError, match="errors"):
        list(sbc.certify_many(images, n0=4, n=20, errors="skip"))


def test_bf16_autocast_stays_within_tolerance_of_fp32(ddpms):
    p = densepure(ddpms, lr=True)
    clf = PoolClassifier()
    x = torch.rand((6, 3, 8, 8), generator=torch.Generator().manual_seed(4))
    seeds = list(range(6))
    outs = {}
    for precision in ("fp32", "bf16"):
        sbc = sbc_of(clf, p, 0.5, votes=3, num_classes=4, precision=precision)
        with torch.no_grad(), sbc.executor._autocast():
            outs[precision] = sbc.purifier(x, RowNoise(seeds, (3, 8, 8))).float()
    ref = outs["fp32"]
    rel = ((outs["bf16"] - ref).norm() / ref.norm()).item()
    assert 0 < rel < 5e-2  # bf16 operands: ~1e-2; the same function, not another one


def test_channels_last_and_compile_switches_keep_labels(ddpms):
    import copy

    p = densepure(ddpms)
    x = x3(seed=5)
    base = sbc_of(PoolClassifier(), p, 0.5, votes=3, num_classes=4)
    ref = base.labels(x, "img-s", range(30))
    # A copy of the models: the switches modify modules in place.
    unet = copy.deepcopy(p.denoiser.unet)
    p2 = dataclasses.replace(p, denoiser=unet_denoiser(unet))
    sbc = sbc_of(PoolClassifier(), p2, 0.5, votes=3, num_classes=4, channels_last=True,
                                 compile=True, compile_options={"backend": "eager"})
    assert sbc.purifier.denoiser.unet is not unet  # the compiled wrapper around the same module
    conv_weight = next(w for w in unet.parameters() if w.ndim == 4)
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)
    # Same function: NHWC kernels may round differently, so outputs agree to float tolerance.
    xb = torch.rand((6, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = base.purifier(xb, RowNoise(list(range(6)), (3, 8, 8)))
        b = sbc.purifier(xb, RowNoise(list(range(6)), (3, 8, 8)))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert (sbc.labels(x, "img-s", range(30)) == ref).mean() >= 0.95


def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        make(cuda_graphs=True)
    with pytest.raises(ValueError, match="noise_device"):
        make(noise_device="gpu")


def test_prefetch_keeps_order_and_raises_where_the_loader_failed():
    assert list(prefetch(iter(range(10)), depth=3)) == list(range(10))
    assert list(prefetch(range(4), depth=0)) == [0, 1, 2, 3]

    def broken():
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(broken()):
            got.append(item)
    assert got == [1]


@pytest.mark.slow
def test_inductor_compile_matches_eager_to_tolerance(ddpms):
    # Real TorchInductor code generation (about a minute on the 2-core dev machine).
    p = densepure(ddpms)
    x = x3(seed=6)
    ref = sbc_of(PoolClassifier(), p, 0.5, votes=3, num_classes=4, pad_batches=True,
                                 batch_size=16).labels(x, "img-c", range(32))
    import copy

    p2 = dataclasses.replace(p, denoiser=unet_denoiser(copy.deepcopy(p.denoiser.unet)))
    sbc = sbc_of(PoolClassifier(), p2, 0.5, votes=3, num_classes=4, pad_batches=True,
                                 batch_size=16, compile=True)
    got = sbc.labels(x, "img-c", range(32))
    assert (got == ref).mean() >= 0.95  # float rounding may flip a near-tie copy, never more


# --------------------------------------------------------------------------- GPU
def _cuda_models(ddpms, lr=True):
    unet, schedule = ddpms[lr]
    import copy

    unet = copy.deepcopy(unet).cuda()
    p = make_purifier("densepure", unet_denoiser(unet), schedule, 0.5, steps=3)
    return p, PoolClassifier().cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("noise_device", ["cpu", "device"])
def test_cuda_graphs_replay_gives_the_eager_labels(ddpms, noise_device):
    p, clf = _cuda_models(ddpms)
    x = x3(seed=7)
    kw = dict(votes=5, num_classes=4, batch_size=32, noise_device=noise_device, pad_batches=True)
    eager = sbc_of(clf, p, 0.5, **kw).labels(x, "img-g", range(100))
    graphed = sbc_of(clf, p, 0.5, cuda_graphs=True, **kw)
    np.testing.assert_array_equal(graphed.labels(x, "img-g", range(100)), eager)
    # and again (replays of the same captured graph, other rows)
    eager2 = sbc_of(clf, p, 0.5, **kw).labels(x, "img-h", range(50))
    np.testing.assert_array_equal(graphed.labels(x, "img-h", range(50)), eager2)


@pytest.mark.gpu
def test_cuda_cpu_noise_counts_equal_cpu_device_counts_to_rounding(ddpms):
    p_gpu, clf_gpu = _cuda_models(ddpms, lr=False)
    unet, schedule = ddpms[False]
    p_cpu = make_purifier("densepure", unet_denoiser(unet), schedule, 0.5, steps=3)
    x = x3(seed=8)
    a = sbc_of(clf_gpu, p_gpu, 0.5, votes=3, num_classes=4).labels(x, "img-x", range(100))
    b = sbc_of(PoolClassifier(), p_cpu, 0.5, votes=3, num_classes=4).labels(x, "img-x", range(100))
    assert (a == b).mean() >= 0.97  # the same noise; only float rounding differs between devices


@pytest.mark.gpu
@pytest.mark.parametrize("batch_size", [7, 64])
def test_cuda_device_noise_is_batch_size_independent(ddpms, batch_size):
    p, clf = _cuda_models(ddpms)
    x = x3(seed=9)
    ref = sbc_of(clf, p, 0.5, votes=3, num_classes=4, batch_size=16,
                                 noise_device="device").labels(x, "img-n", range(80))
    got = sbc_of(clf, p, 0.5, votes=3, num_classes=4, batch_size=batch_size,
                                 noise_device="device").labels(x, "img-n", range(80))
    assert (got == ref).mean() >= 0.97  # cuDNN may pick another algorithm per batch size


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_low_precision_within_tolerance(ddpms, precision):
    p, clf = _cuda_models(ddpms)
    x = torch.rand((16, 3, 8, 8), generator=torch.Generator().manual_seed(4)).cuda()
    outs = {}
    for prec in ("fp32", precision):
        sbc = sbc_of(clf, p, 0.5, votes=3, num_classes=4, precision=prec)
        with torch.no_grad(), sbc.executor._autocast():
            outs[prec] = sbc.purifier(x, RowNoise(list(range(16)), (3, 8, 8), device="cuda")).float()
    rel = ((outs[precision] - outs["fp32"]).norm() / outs["fp32"].norm()).item()
    assert rel < 5e-2


def test_attributed_seconds_add_up_to_the_stream_time():
    """VoteStats.seconds splits each batch's time by rows: the sum never exceeds the wall time."""
    import time

    sbc = make(batch_size=16)
    images = [(f"img-{i}", image()) for i in range(3)]
    t0 = time.perf_counter()
    results = list(sbc.certify_many(iter(images), n0=10, n=30))
    elapsed = time.perf_counter() - t0
    total = sum(r.stats.seconds for r in results)
    assert all(r.stats.seconds > 0 for r in results)
    assert 0 < total <= elapsed
