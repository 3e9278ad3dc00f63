"""Claims the documentation makes that no other test covered: FLTrust's root set held out from the
clients, `max_pair_images`, `init_mask_region`, a client with NaN counted in the detection columns,
and the same seed giving the same records with FLIP and with FLAME through main.py."""

import numpy as np
import pytest
import torch

import config
import defense
import flip_client
import inversion
import train
from conftest import DEVICE, run_main
from defenses import SERVER_RULES
from image_helper import load_federated_data


def test_fltrusts_root_set_is_held_out_from_every_client():
    params = config.resolve({"type": "synthetic", "synthetic_train_size": 500, "number_of_total_participants": 7,
                             "no_models": 5, "aggregation_methods": "fltrust", "fltrust_root_size": 60,
                             "is_poison": False})
    data = load_federated_data(params, "cpu", SERVER_RULES["fltrust"].root_set_size(params))
    root = set(data.root_indices.tolist())
    clients = [set(c.tolist()) for c in data.client_indices]
    assert len(root) == 60
    assert all(not (root & c) for c in clients)
    assert set().union(*clients) | root == set(range(500))
    assert sum(map(len, clients)) == 440  # every other sample to exactly one client


def test_max_pair_images_caps_a_pair_evenly_between_its_directions():
    rng = np.random.default_rng(0)
    idx_s, idx_t = np.arange(0, 40), np.arange(100, 110)
    s, t = flip_client.capped(idx_s, idx_t, 32, rng)
    assert (len(s), len(t)) == (22, 10)               # t has only 10: s takes the rest of the 32
    s, t = flip_client.capped(np.arange(40), np.arange(100, 140), 32, rng)
    assert (len(s), len(t)) == (16, 16) and list(s) == sorted(s) and set(s) <= set(range(40))
    s, t = flip_client.capped(np.arange(10), np.arange(100, 105), 32, rng)
    assert (len(s), len(t)) == (10, 5)               # under the cap: unchanged
    s, t = flip_client.capped(np.arange(50), np.arange(0), None, rng)
    assert len(s) == 50 and len(t) == 0               # no cap


def test_init_mask_region_sets_new_masks_to_one_there_and_leaves_stored_ones():
    stored = (torch.full((6, 8), 0.25), torch.full((1, 6, 8), 0.5))
    masks, patterns = inversion.initial_trigger([None, stored], 2, (1, 6, 8), [0, 2, 1, 4],
                                                torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(masks[0, 0:2, 1:4], torch.ones(2, 3))
    outside = masks[0].clone()
    outside[0:2, 1:4] = -1
    assert bool(((outside == -1) | ((outside >= 0) & (outside < 1))).all())  # random elsewhere
    assert torch.equal(masks[1], stored[0]) and torch.equal(patterns[1], stored[1])
    plain, _ = inversion.initial_trigger([None], 1, (1, 6, 8), [], torch.Generator().manual_seed(0), "cpu")
    assert float(plain[0, 0:2, 1:4].min()) < 1  # off by default: no region


def test_a_client_sending_nan_counts_as_rejected_in_the_detection_columns():
    g = {"w": torch.zeros(3)}
    updates = [{"w": torch.ones(3)}, {"w": torch.tensor([1.0, float("nan"), 1.0])}, {"w": torch.ones(3)},
               {"w": torch.full((3,), 5.0)}]
    ctx = defense.RoundContext({"lr_para": 1.0, "no_models": 4, "aggregation_methods": "mean"}, ["w"],
                               torch.Generator().manual_seed(0), [10, 11, 12, 13], {})
    result = defense.aggregate(g, updates, [1] * 4, ctx)
    assert result.admitted == [True, False, True, True]
    counts = train.detection_counts([False, False, False, True], result.admitted)
    assert counts == {"attackers_selected": 1, "attackers_rejected": 0, "benign_selected": 3,
                      "benign_rejected": 1, "tpr": 0.0, "fpr": round(1 / 3, 4)}
    assert result.state["w"].tolist() == pytest.approx([7 / 4] * 3)  # the rule saw the finite three


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["--set", "invert=true", "--set", "flip.warmup_steps=3", "--set", "flip.pair_steps=3",
     "--set", "flip.max_batch_steps=12", "--set", "flip.local_passes=1"],
    ["--set", "aggregation_methods=flame"],
], ids=["flip", "flame"])
def test_the_same_seed_gives_the_same_records_with_flip_and_flame(tmp_path, synthetic_yaml, overrides):
    path = synthetic_yaml({"epochs": 2})
    for name in ("a", "b"):
        result = run_main("--params", path, "--run-dir", tmp_path / name, "--device", DEVICE, *overrides)
        assert result.returncode == 0, result.stderr[-2000:]
    for name in ("metrics.csv", "clients.csv"):
        a, b = ((tmp_path / d / name).read_text().splitlines() for d in ("a", "b"))
        if name == "metrics.csv":  # but the wall time, the last column
            a, b = ([line.rsplit(",", 1)[0] for line in rows] for rows in (a, b))
        assert a == b, name
