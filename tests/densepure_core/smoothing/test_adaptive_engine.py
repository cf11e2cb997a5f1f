"""Adaptive sampling in the engine: the scheduler's looks (stub backend) and the facade (tiny model).

The rule is densepure_core.certification.sequential's: the engine's stop equals sequential_certify's on the same
label stream; with the rule off the counts are fixed CERTIFY's; copy j is copy j.
"""

import hashlib

import numpy as np
import pytest
import torch

from densepure_core.certification import sequential
from densepure_core.config import DEFAULT_RADII
from densepure_core.smoothing import AdaptivePlan, AdaptiveState, EngineOptions, SmoothedBaseClassifier
from densepure_core.smoothing.scheduler import ImageJob, VoteScheduler

C, K = 4, 3
N0, N_MAX, BATCH, ALPHA, SIGMA = 10, 400, 20, 0.05, 0.5
# how often an image's copies vote label 1 (per mille): abstains, middling, clear, unanimous
SKEW = {"a": 300, "b": 700, "c": 950, "d": 1000, "e": 850}


def vote(image_id: str, copy: int, k: int) -> int:
    h = int.from_bytes(hashlib.blake2b(f"{image_id}/{copy}/{k}".encode(), digest_size=4).digest(), "little")
    return 1 if h % 1000 < SKEW[image_id[0]] else (h >> 12) % C


def label(image_id: str, copy: int) -> int:
    seq = [vote(image_id, copy, k) for k in range(K)]
    counts = np.bincount(seq, minlength=C)
    return next(v for v in seq if counts[v] == counts.max())


class Stub:
    def __init__(self):
        self.slot = {}
        self.valid = []

    def use_shape(self, shape):
        pass

    def open(self, job, slots, copies):
        for s, j in zip(slots.tolist(), copies):
            self.slot[s] = (job.image_id, j)

    def labels(self, rows, ids):
        self.valid.append(sum(i is not None for i in ids))
        out = []
        for s, i in zip(rows.tolist(), ids):
            assert i is None or self.slot[s] == i[:2]
            out.append(0 if i is None else vote(*i))
        return np.array(out, dtype=np.int64)


def plan(stop=True, bound="staged", n_max=N_MAX, futility=0.0):
    params = sequential.default_bound_params(bound, BATCH, n_max)
    if bound == "staged" and not stop:
        params["looks"] = [n_max]
    schedule = sequential.default_schedule(bound, BATCH, n_max, params) if stop else (n_max,)
    return AdaptivePlan(N0, n_max, ALPHA, SIGMA, tuple(DEFAULT_RADII), bound, params, schedule, stop, futility)


def adaptive_jobs(names, p):
    for name in names:
        job = ImageJob.of(name, None, (1, 2, 2), p.first_copies())
        job.info = AdaptiveState()
        job.extend = lambda j, p=p: p.next_copies(j.labels, j.info)
        yield job


def reference(name, p):
    """sequential_certify on the same label stream (copy after copy)."""
    pos = [0]

    def sample(m):
        out = [label(name, j) for j in range(pos[0], pos[0] + m)]
        pos[0] += m
        return np.array(out, dtype=np.int64)

    kw = dict(p.params)
    return sequential.sequential_certify(sample, N0, p.n_max, ALPHA, SIGMA, DEFAULT_RADII, BATCH,
                                         bound=p.bound, stop=p.stop, futility=p.futility, num_classes=C, **kw)


NAMES = ["a1", "b1", "c1", "d1", "e1", "a2", "c2", "e2"]


@pytest.mark.parametrize("bound,futility", [("staged", 0.0), ("betabin", 0.0), ("onesided", 0.1),
                                             ("hybrid", 0.0), ("hybrid", 0.1)])
@pytest.mark.parametrize("batch_size", [1, 16, 64])
def test_engine_stops_where_sequential_certify_stops(bound, futility, batch_size):
    p = plan(bound=bound, futility=futility)
    sched = VoteScheduler(batch_size, C, K, unet_calls_per_row=2)
    done = list(sched.run(adaptive_jobs(NAMES, p), Stub()))
    assert [j.image_id for j in done] == NAMES  # input order
    reasons = set()
    for job in done:
        ref = reference(job.image_id, p)
        st = job.info
        assert job.copies == list(range(N0 + st.n_used))  # copy j is copy j, no gaps
        assert job.labels.tolist() == [label(job.image_id, j) for j in job.copies]
        assert st.n_used == ref.n_used and st.n_a == ref.n_a and st.stop_reason == ref.stop_reason
        assert st.lower == ref.p_a_lower and st.upper == ref.p_a_upper
        assert tuple(st.looks) == ref.looks
        np.testing.assert_array_equal(np.bincount(job.labels[N0:], minlength=C), ref.counts)
        reasons.add(st.stop_reason)
    assert len(reasons) >= 2 and any(j.info.n_used < N_MAX for j in done)


@pytest.mark.parametrize("bound", sequential.BOUNDS)
def test_rule_off_draws_exactly_the_fixed_copies(bound):
    p = plan(stop=False, bound=bound)
    done = list(VoteScheduler(16, C, K).run(adaptive_jobs(NAMES, p), Stub()))
    fixed = list(VoteScheduler(16, C, K).run(
        (ImageJob.of(n, None, (1, 2, 2), range(N0 + N_MAX)) for n in NAMES), Stub()))
    for a, f in zip(done, fixed):
        assert a.info.n_used == N_MAX and a.info.stop_reason == "n_max" and a.info.looks == [N_MAX]
        np.testing.assert_array_equal(a.labels, f.labels)
        assert a.stats.classifier_calls == f.stats.classifier_calls
        assert a.stats.votes_skipped == f.stats.votes_skipped  # early exit stays exact, independent
    if bound == "staged":  # one look with all of alpha: fixed CERTIFY's Clopper-Pearson bound
        from densepure_core.certification.stats import clopper_pearson_lower
        for a in done:
            assert a.info.lower == float(clopper_pearson_lower(a.info.n_a, N_MAX, ALPHA))


def test_slots_never_wait_for_a_look():
    """While images wait for their looks, later images' copies fill the batch."""
    p = plan()
    stub = Stub()
    names = [f"{c}{i}" for i in range(6) for c in "abcde"]
    done = list(VoteScheduler(64, C, K).run(adaptive_jobs(names, p), stub))
    assert [j.image_id for j in done] == names
    full = [v for v in stub.valid if v == 64]
    assert len(full) >= 0.9 * len(stub.valid) - 20  # only the stream's tail runs below capacity
    assert sum(stub.valid) == sum(j.stats.classifier_calls for j in done)


def test_max_images_bounds_the_images_held():
    p = plan()
    names = [f"{c}{i}" for i in range(4) for c in "dbc"]  # d stops fast and waits behind b
    sched = VoteScheduler(16, C, K, max_images=3)
    done = list(sched.run(adaptive_jobs(names, p), Stub()))
    assert [j.image_id for j in done] == names
    for job in done:
        assert job.info.n_used == reference(job.image_id, p).n_used


# -- the facade, on a tiny real model ----------------------------------------------------------

class NoisyPurifier:
    stochastic = True
    unet_calls_per_purification = 3

    def __call__(self, x, noise):
        return x + 0.3 * noise.draw()


def make(batch_size=32):
    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, C)).eval()
    with torch.no_grad():  # a confident class 2 on bright images, so some images stop early
        clf[1].weight.zero_()
        clf[1].bias.copy_(torch.tensor([0.0, 0.5, 0.0, 0.0]))
        clf[1].weight[2] = 0.6
    return SmoothedBaseClassifier(clf, NoisyPurifier(), SIGMA, votes=K, num_classes=C, run_seed=3,
                                  options=EngineOptions(batch_size=batch_size))


def images():
    g = torch.Generator().manual_seed(5)
    return [(f"img-{i}", torch.rand((1, 4, 4), generator=g) * (i / 3)) for i in range(6)]


def test_facade_rule_off_equals_fixed_certify():
    sbc = make()
    ada = list(sbc.certify_many(images(), N0, 999, adaptive=plan(stop=False, n_max=120)))
    fixed = list(make(batch_size=7).certify_many(images(), N0, 120))
    for a, f in zip(ada, fixed):
        np.testing.assert_array_equal(a.counts0, f.counts0)
        np.testing.assert_array_equal(a.counts, f.counts)
        assert a.n_used == f.n_used == 120 and a.adaptive.stop_reason == "n_max" and f.adaptive is None


def test_facade_adaptive_counts_are_a_fixed_runs_first_copies():
    sbc = make()
    p = plan(n_max=300)
    got = list(sbc.certify_many(images(), N0, 0, adaptive=p))
    assert [r.image_id for r in got] == [i for i, _ in images()]
    assert any(r.n_used < 300 for r in got)
    for r, (i, x) in zip(got, images()):
        assert r.n_used == r.adaptive.n_used
        ref = make(batch_size=5).labels(x, i, range(N0 + r.n_used))
        np.testing.assert_array_equal(r.counts0, np.bincount(ref[:N0], minlength=C))
        np.testing.assert_array_equal(r.counts, np.bincount(ref[N0:], minlength=C))
        assert r.adaptive.lower == float(sequential.anytime_lower_bound(
            r.adaptive.n_a, r.n_used, ALPHA, p.bound, **p.params))


def test_plan_from_config_and_checks():
    from densepure_core.config import load_config

    cfg = load_config(data={"classifier": {"source": "x"}, "methods": [{"kind": "rs"}], "sigmas": [0.5],
                            "n": 1000, "sampling": "adaptive", "adaptive": {"batch": 100}})
    p = AdaptivePlan.from_config(cfg, 0.5)
    # the default rule: the hybrid bound, a look every batch, futility 0.1
    assert p.n_max == 1000 and p.schedule == tuple(range(100, 1001, 100)) and p.bound == "hybrid"
    assert p.params == {"a": 0.5, "b": 0.5, "final": 0.75, "n_max": 1000} and p.futility == 0.1
    assert p.rule.futility == 0.1 and p.rule.schedule == p.schedule
    assert p.first_copies() == range(cfg.n0 + 100)
    staged = AdaptivePlan.from_config(cfg.model_copy(update={"adaptive": cfg.adaptive.model_copy(
        update={"bound": "staged"})}), 0.5)
    assert staged.schedule == (100, 200, 300, 500, 800, 1000) and staged.params["looks"][-1] == 1000
    with pytest.raises(ValueError, match="n0"):
        next(make().certify_many(images(), N0 + 1, 10, adaptive=plan()))
