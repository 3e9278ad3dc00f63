import numpy as np
import torch

from image_helper import (dirichlet_split, iid_split, make_synthetic, poison_batch, stamp,
                          trigger_mask, trigger_pixels)


def test_dirichlet_split_assigns_every_index_exactly_once():
    labels = np.random.default_rng(0).integers(0, 10, size=5000)
    parts = dirichlet_split(labels, 100, 0.5, np.random.default_rng(1))
    assert len(parts) == 100
    joined = np.concatenate(parts)
    assert len(joined) == 5000
    assert np.array_equal(np.sort(joined), np.arange(5000))


def test_dirichlet_split_is_non_iid_and_seeded():
    labels = np.repeat(np.arange(10), 500)
    a = dirichlet_split(labels, 20, 0.5, np.random.default_rng(3))
    b = dirichlet_split(labels, 20, 0.5, np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # With alpha 0.5 most clients are dominated by few classes: the largest class share of a
    # typical client is far above the IID 10 %.
    shares = [np.bincount(labels[p], minlength=10).max() / len(p) for p in a if len(p)]
    assert np.median(shares) > 0.3


def test_dirichlet_split_has_the_spread_of_dirichlet_alpha_drawn_per_class():
    # K clients, class shares ~ Dirichlet(alpha, ..., alpha): each share has mean 1/K and variance
    # (1/K)(1 - 1/K)/(K alpha + 1); classes draw independently, so a client's total share over C
    # classes has C times that variance (not C^2 times, as one draw for all classes would give).
    n_classes, per_class, k = 200, 1000, 20
    labels = np.repeat(np.arange(n_classes), per_class)
    for alpha in (0.1, 10.0):
        parts = dirichlet_split(labels, k, alpha, np.random.default_rng(4))
        shares = np.stack([np.bincount(labels[p], minlength=n_classes) for p in parts], axis=1) / per_class
        expected = (1 / k) * (1 - 1 / k) / (k * alpha + 1)
        assert abs(shares.var() / expected - 1) < 0.25, (alpha, shares.var(), expected)
        totals = shares.sum(axis=0)
        # from 20 clients a rough estimate (0.4-1.8 of it over 20 seeds); one draw would give 200x
        assert 0.3 < totals.var() / (n_classes * expected) < 3, (alpha, totals.var())


def test_iid_split_balanced():
    parts = iid_split(1000, 10, np.random.default_rng(0))
    assert sorted(len(p) for p in parts) == [100] * 10
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))


def test_stamp_sets_exactly_the_pattern_pixels_in_every_channel():
    params = {"trigger_num": 2, "0_poison_pattern": [[0, 0], [0, 1]], "1_poison_pattern": [[4, 9], [5, 9]]}
    mask = trigger_mask(trigger_pixels(params, -1), 32, 32)
    assert int(mask.sum()) == 4
    x = torch.rand(3, 3, 32, 32) * 0.5
    y = stamp(x, mask)
    changed = (y != x)
    assert changed.any(dim=(0, 1)).nonzero().tolist() == [[0, 0], [0, 1], [4, 9], [5, 9]]
    assert torch.all(y[:, :, mask] == 1.0)
    assert torch.equal(y[:, :, ~mask], x[:, :, ~mask])
    local = trigger_mask(trigger_pixels(params, 1), 32, 32)
    assert local.nonzero().tolist() == [[4, 9], [5, 9]]


def test_poison_batch_stamps_and_relabels_only_the_first_samples():
    mask = trigger_mask([[1, 1], [1, 2]], 8, 8)
    x, y = torch.zeros(6, 1, 8, 8), torch.tensor([0, 1, 3, 4, 5, 6])
    px, py = poison_batch(x, y, mask, 2, target=9)
    assert py.tolist() == [9, 9, 3, 4, 5, 6]
    assert px[:2].sum().item() == 4.0 and px[2:].sum().item() == 0.0
    assert x.sum().item() == 0.0  # the input batch is not modified


def test_synthetic_data_is_seeded_and_shaped():
    a = make_synthetic((3, 16, 20), 5, 50, 10, seed=4)
    b = make_synthetic((3, 16, 20), 5, 50, 10, seed=4)
    assert a[0].shape == (50, 3, 16, 20) and a[2].shape == (10, 3, 16, 20)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert 0.0 <= float(a[0].min()) and float(a[0].max()) <= 1.0
    assert set(a[1].tolist()) <= set(range(5))
