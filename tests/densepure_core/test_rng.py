"""Seeds and noise streams: derive_seed, per-row CPU generators, counter-based Philox noise."""

import numpy as np
import pytest
import torch

from densepure_core import rng
from densepure_core.rng import (REVERSE, SMOOTH, CounterNoise, RowNoise, StagedNoise, counter_normal, derive_seed,
                                gaussian_rows, make_noise, philox4x32)

# Random123 tests/kat_vectors, the three `philox4x32 10` lines: (counter, key, output).
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_scalar(ctr, key, rounds=10):
    """Philox4x32-R in plain Python integers (Random123's philox4x32_R), the reference."""
    m = 0xFFFFFFFF
    c, k = list(ctr), list(key)
    for r in range(rounds):
        if r:
            k = [(k[0] + 0x9E3779B9) & m, (k[1] + 0xBB67AE85) & m]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & m, p1 & m, ((p0 >> 32) ^ c[3] ^ k[1]) & m, p0 & m]
    return tuple(c)


def as_words(values):
    return [torch.tensor([v], dtype=torch.int64) for v in values]


def test_derive_seed_is_pinned_63_bit_and_sensitive_to_every_id():
    s = derive_seed(0, "img", 3, 1, REVERSE)
    assert s == derive_seed(0, "img", 3, 1, REVERSE) and 0 <= s < 2 ** 63
    others = {derive_seed(1, "img", 3, 1, REVERSE), derive_seed(0, "img2", 3, 1, REVERSE),
              derive_seed(0, "img", 4, 1, REVERSE), derive_seed(0, "img", 3, 2, REVERSE),
              derive_seed(0, "img", 3, 1, SMOOTH)}
    assert s not in others and len(others) == 5
    assert derive_seed(0, "img", 3, 1, REVERSE) == PINNED_SEED


PINNED_SEED = 3629962638681433451


@pytest.mark.parametrize("ctr,key,want", PHILOX_KAT)
def test_philox_matches_random123_known_answers(ctr, key, want):
    assert philox_scalar(ctr, key) == want
    got = philox4x32(as_words(ctr), as_words(key))
    assert tuple(int(w) for w in got) == want


def test_philox_vectorized_matches_scalar_reference():
    g = np.random.default_rng(0)
    words = g.integers(0, 2 ** 32, size=(64, 6), dtype=np.int64)
    t = torch.from_numpy(words)
    out = torch.stack(philox4x32([t[:, i] for i in range(4)], [t[:, 4], t[:, 5]]), dim=1)
    for row, got in zip(words.tolist(), out.tolist()):
        assert tuple(got) == philox_scalar(row[:4], row[4:])


def test_counter_normal_moments_and_pinned_values():
    keys = torch.tensor([derive_seed(0, "img", 0, 0, REVERSE), 2 ** 62 + 5], dtype=torch.int64)
    z = counter_normal(keys, 0, 200_001)
    assert z.shape == (2, 200_001) and z.dtype == torch.float32
    assert z.mean(dim=1).abs().max() < 0.01
    assert (z.std(dim=1) - 1).abs().max() < 0.01
    assert torch.isfinite(z).all() and z.abs().max() < 6.0  # 24-bit uniforms: |z| <= 5.77
    # Pinned: the counter stream is a fixed function of (seed, draw, element).
    torch.testing.assert_close(z[0, :4], torch.tensor(PINNED_COUNTER), rtol=0, atol=1e-6)


PINNED_COUNTER = [-1.2688108682632446, -2.2435693740844727, 0.7397509217262268, -0.24605301022529602]


def test_counter_normal_rows_do_not_depend_on_the_batch():
    seeds = [derive_seed(3, "x", j, 2, REVERSE) for j in range(7)]
    keys = torch.tensor(seeds, dtype=torch.int64)
    batch = counter_normal(keys, 4, 50)
    for i in range(7):
        assert torch.equal(batch[i:i + 1], counter_normal(keys[i:i + 1], 4, 50))
    rev = counter_normal(keys.flip(0), 4, 50)
    assert torch.equal(rev.flip(0), batch)
    # a prefix of a longer draw; another draw index is another stream
    assert torch.equal(counter_normal(keys, 4, 13), batch[:, :13])
    assert not torch.equal(counter_normal(keys, 5, 50), batch)


def test_counter_normal_refuses_bad_keys():
    with pytest.raises(ValueError, match="int64"):
        counter_normal(torch.zeros(3, dtype=torch.int32), 0, 4)


def test_counter_noise_draws_advance_and_padding_is_zero():
    seeds = [11, None, 13]
    noise = CounterNoise(seeds, (1, 3, 3))
    assert len(noise) == 3 and noise.shape == (1, 3, 3)
    d0, d1 = noise.draw(), noise.draw()
    keys = torch.tensor([11, 0, 13], dtype=torch.int64)
    assert torch.equal(d0[0].flatten(), counter_normal(keys, 0, 9)[0])
    assert torch.equal(d1[2].flatten(), counter_normal(keys, 1, 9)[2])
    assert torch.equal(d0[1], torch.zeros(1, 3, 3)) and not torch.equal(d0, d1)
    same = CounterNoise.from_tensors(keys, torch.tensor([True, False, True]), (1, 3, 3))
    assert torch.equal(same.draw(), d0)


def test_gaussian_rows_cpu_is_one_generator_per_row():
    seeds = [derive_seed(0, "img", j, -1, SMOOTH) for j in range(4)]
    rows = gaussian_rows(seeds, (2, 3))
    for i, s in enumerate(seeds):
        ref = np.random.Generator(np.random.Philox(key=s)).standard_normal((2, 3), dtype=np.float32)
        assert torch.equal(rows[i], torch.from_numpy(ref))
    dev = gaussian_rows(seeds, (2, 3), noise_device="device")
    assert dev.shape == rows.shape and not torch.equal(dev, rows)
    assert torch.equal(dev, CounterNoise(seeds, (2, 3)).draw())
    with pytest.raises(ValueError, match="noise_device"):
        gaussian_rows(seeds, (2, 3), noise_device="gpu")


def test_row_noise_draw_into_matches_draw_and_zeroes_padding():
    seeds = [5, None, 7]
    a, b = RowNoise(seeds, (4,)), RowNoise(seeds, (4,))
    out = torch.full((3, 4), 9.0)
    for _ in range(2):
        b.draw_into(out)
        assert torch.equal(out, a.draw())
    assert torch.equal(out[1], torch.zeros(4))
    with pytest.raises(ValueError, match="float32 CPU"):
        b.draw_into(torch.zeros(3, 5))


def test_threaded_row_fill_equals_serial(monkeypatch):
    gens = [rng._generator(s) for s in (1, 2, 3)]
    serial = torch.zeros(3, 64)
    rng._fill_rows(gens, (64,), serial, parallel=False)
    monkeypatch.setattr(rng, "_PARALLEL_MIN_ELEMENTS", 0)
    gens = [rng._generator(s) for s in (1, 2, 3)]
    threaded = torch.zeros(3, 64)
    rng._fill_rows(gens, (64,), threaded, parallel=True)
    assert torch.equal(serial, threaded)


def test_make_noise_picks_the_mode():
    assert isinstance(make_noise([1], (2,), "cpu"), RowNoise)
    assert isinstance(make_noise([1], (2,), "cpu", noise_device="device"), CounterNoise)
    with pytest.raises(ValueError, match="noise_device"):
        make_noise([1], (2,), "cpu", noise_device="cuda")


@pytest.mark.gpu
def test_counter_noise_on_cuda_matches_cpu_to_rounding():
    keys = torch.tensor([derive_seed(0, "img", j, 0, REVERSE) for j in range(16)], dtype=torch.int64)
    cpu = counter_normal(keys, 2, 3 * 64 * 64)
    gpu = counter_normal(keys.cuda(), 2, 3 * 64 * 64).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)  # integers exact; transcendental ulps


# --------------------------------------------------------------------------- full 63-bit keys
def test_seeds_differing_only_above_bit_31_give_different_draws():
    """Regression: torch.Generator.manual_seed keeps the low 32 bits, so these collided."""
    low = 0x1234_5678
    seeds = [low, low | (1 << 32), low | (1 << 45), low | (1 << 62)]
    rows = gaussian_rows(seeds, (16,))
    for a in range(len(seeds)):
        for b in range(a + 1, len(seeds)):
            assert not torch.equal(rows[a], rows[b]), (hex(seeds[a]), hex(seeds[b]))
    noise = RowNoise(seeds, (16,))
    noise.draw()
    second = noise.draw()
    assert len({tuple(r.tolist()) for r in second}) == len(seeds)
    # What the stream fixes: torch's CPU engine gives all four seeds one stream.
    torch_rows = [torch.randn(16, generator=torch.Generator().manual_seed(s)) for s in seeds]
    assert all(torch.equal(torch_rows[0], r) for r in torch_rows[1:])


def test_all_streams_of_one_image_are_pairwise_distinct():
    """ImageNet DensePure setting: K = 10 votes over n0 + n = 10,100 copies, one image.

    Every smoothing stream (copy j) and reverse stream (copy j, vote k) has its own seed, and
    their first draws differ pairwise (so no selection copy shares noise with an estimation
    copy, and no two votes of a copy share their reverse noise).
    """
    copies, votes = 10_100, 10
    seeds = [derive_seed(0, "n01440764/ILSVRC2012_val_00000293.JPEG", j, -1, SMOOTH) for j in range(copies)]
    seeds += [derive_seed(0, "n01440764/ILSVRC2012_val_00000293.JPEG", j, k, REVERSE)
              for j in range(copies) for k in range(votes)]
    assert len(set(seeds)) == len(seeds) == copies * (votes + 1)
    first = np.stack([rng._generator(s).standard_normal(2, dtype=np.float32) for s in seeds])
    assert len(np.unique(first, axis=0)) == len(seeds)


def test_stream_version_is_the_full_seed_version():
    assert rng.STREAM_VERSION == 2


# --------------------------------------------------------------------------- the NoiseSource contract
def _staged(seeds, shape):
    rows = RowNoise(seeds, shape)
    z = torch.zeros((3, len(seeds), *shape))
    for t in range(3):
        rows.draw_into(z[t])
    return StagedNoise(z)


@pytest.mark.parametrize("make", [RowNoise, CounterNoise, _staged], ids=["RowNoise", "CounterNoise", "StagedNoise"])
def test_noise_source_contract(make):
    """Every NoiseSource: [B, *shape] draws; row i's t-th draw depends only on its own seed
    (not on the other rows, their order or the batch size); padding rows are zero."""
    shape = (2, 3, 3)
    seeds = [derive_seed(0, "img", j, k, REVERSE) for j, k in ((0, 0), (0, 1), (5, 0), (9, 3))]
    src = make(seeds, shape)
    assert isinstance(src, rng.NoiseSource) and len(src) == 4 and tuple(src.shape) == shape
    draws = [src.draw() for _ in range(3)]
    assert all(d.shape == (4, *shape) and d.dtype == torch.float32 for d in draws)
    assert not torch.equal(draws[0], draws[1])  # a stream moves on
    assert len({tuple(r.flatten().tolist()) for r in draws[0]}) == 4  # rows are distinct streams
    # Another batch: reversed, with padding, one row alone.
    other = make([None, seeds[3], seeds[1], None], shape)
    again = [other.draw() for _ in range(3)]
    alone = make([seeds[1]], shape)
    for t in range(3):
        assert torch.equal(again[t][1], draws[t][3]) and torch.equal(again[t][2], draws[t][1])
        assert torch.equal(again[t][0], torch.zeros(shape)) and torch.equal(again[t][3], torch.zeros(shape))
        assert torch.equal(alone.draw()[0], draws[t][1])
