"""Known answers, worked out by hand, for what a rule can get subtly wrong: Bulyan's selection and
trimming, RFA's sample weights, FoolsGold's history over two rounds, FLAME's buffers over the
admitted clients only, and the fallbacks (everyone labelled noise, an aggregate that overflows)."""

import logging

import numpy as np
import pytest
import torch

import defense
from defenses import reweighting
from test_baselines import call, ctx, matrix


def test_bulyan_selects_by_repeated_krum_then_averages_the_values_nearest_the_median():
    """n = 7, f = 1: repeated Krum keeps the n − 2f = 5 clustered rows (the two far rows are the
    worst every time); per coordinate the β = 5 − 2 = 3 values nearest the median are averaged.
    Coordinate 0: {0, 1, 2, 3, 10}, median 2, nearest {1, 2, 3} → 2 (their plain mean is 3.2).
    Coordinate 1: {5, −1, 0, 1, 2}, median 1, nearest {1, 0, 2} → 1 (plain mean 1.4)."""
    U = matrix([[0, 5], [1, -1], [2, 0], [3, 1], [10, 2], [100, 0], [-100, 50]])
    result = call("bulyan", U, [1] * 7, ctx(7))
    assert result.admitted.tolist() == [True] * 5 + [False, False]
    assert result.update.tolist() == pytest.approx([2.0, 1.0])


def test_rfa_weighs_the_points_by_sample_counts():
    """A point holding at least half the total weight is the weighted geometric median: (0, 0)
    with 3 of 5 samples. With equal counts the answer is the triangle's Fermat point, away from
    every corner (all its angles are under 120°)."""
    U = matrix([[0, 0], [1, 0], [0, 1]])
    weighted = call("rfa", U, [3, 1, 1], ctx(3))
    assert weighted.update.norm().item() < 1e-3
    equal = call("rfa", U, [1, 1, 1], ctx(3))
    fermat = (3 - 3 ** 0.5) / 6  # the Fermat point of this right triangle lies on the diagonal
    assert equal.update.tolist() == pytest.approx([fermat, fermat], abs=1e-4)


def test_foolsgold_sums_each_clients_updates_over_rounds():
    """Clients 0 and 1 send the same update in round 2: alone they look like sybils (weight 0),
    but with their round-1 updates summed in they point different ways and keep their weight."""
    state = {}
    first = ctx(3, foolsgold_features="all")
    first.client_ids, first.server_state, first.layout = [0, 1, 2], state, [("w", 3)]
    call("foolsgold", matrix([[10, 0, 0], [0, 10, 0], [0, 0, 10]]), [1] * 3, first)
    second = ctx(3, foolsgold_features="all")
    second.client_ids, second.server_state, second.layout = [0, 1, 3], state, [("w", 3)]
    U2 = matrix([[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    result = call("foolsgold", U2, [1] * 3, second)
    history = {cid: v.tolist() for cid, v in state["foolsgold_history"].items()}
    assert history == {0: [11, 1, 0], 1: [1, 11, 0], 2: [0, 0, 10], 3: [0, 0, 1]}
    expected = reweighting.foolsgold_weights(torch.tensor([[11.0, 1, 0], [1, 11, 0], [0, 0, 1]], dtype=torch.float64))
    assert result.client_stats["foolsgold_weight"] == pytest.approx(expected.tolist())
    assert result.admitted.tolist() == [True, True, True]
    memoryless = ctx(3, foolsgold_features="all", foolsgold_memory=False)
    memoryless.client_ids, memoryless.layout = [0, 1, 3], [("w", 3)]
    alone = call("foolsgold", U2, [1] * 3, memoryless)
    assert alone.admitted.tolist()[:2] == [False, False]


def flame_round(buffer_updates):
    """Five clients: four alike, one flipped; trainable "w", a float buffer "bn" and an integer
    buffer "count"."""
    g = {"w": torch.zeros(4), "bn": torch.zeros(2), "count": torch.tensor(7)}
    directions = [[1, 1, 1, 1], [1, 1, 1, 0.9], [1, 0.9, 1, 1], [0.9, 1, 1, 1], [-1, -1, -1, -1]]
    updates = [{"w": torch.tensor(d), "bn": torch.tensor(b), "count": torch.tensor(3)}
               for d, b in zip(directions, buffer_updates)]
    params = {"lr_para": 0.1, "no_models": 5, "flame_lambda": 0.0, "flame_whole_state_dict": False,
              "flame_admission": "outlier_score", "flame_outlier_max": 0.5, "flame_apply_lr_para": False,
              "aggregation_methods": "flame"}
    context = defense.RoundContext(params, ["w"], torch.Generator().manual_seed(0), list(range(5)), {})
    return g, defense.aggregate(g, updates, [1] * 5, context)


def test_flame_averages_float_buffers_over_the_admitted_clients_only():
    g, result = flame_round([[1, 2], [3, 4], [5, 6], [7, 8], [1000, -1000]])
    assert result.admitted == [True, True, True, True, False]
    assert result.state["bn"].tolist() == pytest.approx([(1 + 3 + 5 + 7) / 4, (2 + 4 + 6 + 8) / 4])
    assert int(result.state["count"]) == 7


def test_flame_admits_everyone_when_hdbscan_labels_every_client_noise(monkeypatch, caplog):
    import hdbscan

    class AllNoise:
        def __init__(self, **kwargs):
            pass

        def fit_predict(self, distances):
            self.outlier_scores_ = np.zeros(len(distances))
            return np.full(len(distances), -1)

    monkeypatch.setattr(hdbscan, "HDBSCAN", AllNoise)
    with caplog.at_level(logging.WARNING):
        _, result = flame_round([[0, 0]] * 5)
    assert result.admitted == [True] * 5
    assert "every client as noise" in caplog.text


def test_an_aggregate_that_overflows_leaves_the_global_model_unchanged(caplog):
    """Two finite float32 updates of 3e38 sum to infinity under FedAvg with lr_para 1."""
    g = {"w": torch.full((3,), 2.0)}
    updates = [{"w": torch.full((3,), 3e38)}, {"w": torch.full((3,), 3e38)}]
    context = defense.RoundContext({"lr_para": 1.0, "no_models": 1, "aggregation_methods": "mean"}, ["w"],
                                   torch.Generator().manual_seed(0), [0, 1], {})
    with caplog.at_level(logging.WARNING):
        result = defense.aggregate(g, updates, [1, 1], context)
    assert result.state["w"].tolist() == [2.0, 2.0, 2.0]
    assert result.admitted == [True, True]
    assert "not finite" in caplog.text
