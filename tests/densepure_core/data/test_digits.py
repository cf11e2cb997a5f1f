"""The bundled digits data: split sizes, shapes, ids, stratification, determinism, pinned pixels.

Run: .venv/bin/python -m pytest -q tests/densepure_core/data/test_digits.py
"""

import hashlib

import numpy as np
import pytest
import torch

from densepure_core.data import DIGITS_NUM_CLASSES, load_digits_split
from densepure_core.data.digits import digits_split_indices


@pytest.mark.parametrize("split, n", [("train", 1347), ("test", 450), ("all", 1797)])
def test_split_sizes_shapes_and_ranges(split, n):
    s = load_digits_split(split)
    assert len(s) == n
    assert s.images.shape == (n, 1, 16, 16) and s.images.dtype == torch.float32
    assert s.labels.shape == (n,) and s.labels.dtype == torch.int64
    assert float(s.images.min()) == 0.0 and float(s.images.max()) == 1.0
    assert set(s.labels.tolist()) == set(range(DIGITS_NUM_CLASSES))
    assert all(i.startswith("digits-") for i in s.ids)
    idx = [int(i.split("-")[1]) for i in s.ids]
    assert idx == sorted(idx) and len(set(idx)) == n


def test_split_is_a_stratified_partition():
    ix = digits_split_indices()
    assert not set(ix["train"]) & set(ix["test"])
    assert sorted([*ix["train"], *ix["test"]]) == list(range(1797))
    counts = np.bincount(load_digits_split("test").labels.numpy())
    all_counts = np.bincount(load_digits_split("all").labels.numpy())
    assert np.array_equal(counts, np.round(0.25 * all_counts).astype(int))


def test_ids_and_labels_match_sklearn_rows():
    from sklearn.datasets import load_digits

    raw = load_digits()
    s = load_digits_split("test", image_size=8)
    for k in (0, 17, 449):
        i = int(s.ids[k].split("-")[1])
        assert int(s.labels[k]) == int(raw.target[i])
        assert torch.equal(s.images[k, 0], torch.from_numpy(raw.images[i] / 16.0).float())


def test_deterministic_and_pinned():
    a, b = load_digits_split("test"), load_digits_split("test")
    assert torch.equal(a.images, b.images) and a.ids == b.ids
    a.images[0] = 5.0  # callers get fresh tensors: the cache is not corrupted
    assert float(load_digits_split("test").images.max()) == 1.0
    # The split (ids) and the interpolation are part of the published figures: pin them.
    # Bilinear 2x upsampling of k/16 values is exact in float32, so these are exact everywhere.
    assert b.ids[:5] == ["digits-7", "digits-15", "digits-32", "digits-33", "digits-35"]
    assert b.labels[:12].tolist() == [7, 5, 5, 5, 5, 0, 7, 0, 0, 2, 2, 3]
    assert (hashlib.sha256(",".join(b.ids).encode()).hexdigest()
            == "e1422183bd77fe94e72058930514cfd18d34498c8b843586e2768b7e20211525")
    assert b.images[0, 0, 6, 4:10].tolist() == [0.328125, 0.375, 0.375, 0.48828125, 0.71484375,
                                                0.84765625]
    assert float(b.images.double().sum()) == 35198.0
    assert float(load_digits_split("train").images.double().sum()) == 105231.5


def test_other_sizes_and_bad_arguments():
    assert load_digits_split("all", image_size=32).images.shape == (1797, 1, 32, 32)
    with pytest.raises(ValueError, match="unknown digits split"):
        load_digits_split("val")
    with pytest.raises(ValueError, match="image_size"):
        load_digits_split("test", image_size=4)
