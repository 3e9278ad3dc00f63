"""experiments/trigger_scan.py: the per-checkpoint summary from hand-made inversion results, and
the pair requests it builds."""

import os
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import trigger_scan  # noqa: E402


def mask_with(pixels, value=1.0):
    mask = torch.zeros(4, 4)
    for r, c in pixels:
        mask[r, c] = value
    return mask


def test_summary_of_hand_made_results():
    near_trigger = torch.zeros(4, 4, dtype=torch.bool)
    near_trigger[0, :2] = True
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    found = [(9.0, 0.95, True, mask_with([(3, 3)])),
             (3.0, 0.97, True, mask_with([(0, 0), (0, 1), (2, 2)])),   # 2 of 3 on the trigger
             (7.0, 0.93, True, mask_with([(1, 1)])),
             (5.0, 0.91, True, mask_with([(0, 0), (3, 0), (3, 1), (3, 2)])),  # 1 of 4
             (12.0, 0.92, True, mask_with([(2, 2)])),
             (0.0, 0.40, False, torch.zeros(4, 4))]
    records = trigger_scan.pair_records(pairs, found, near_trigger, width=4)
    summary = trigger_scan.summarize(records, target=2, cap=10.0)
    assert summary["median_size_per_target"] == {0: 9.5, 1: 9.0, 2: 4.0}
    assert summary["target_median_share_near_trigger"] == pytest.approx((2 / 3 + 1 / 4) / 2)
    assert summary["target_pairs_found"] == 2
    # pairs with label 2: (0,2) 3, (1,2) 5, (2,0) 12 > cap, (2,1) failed
    assert summary["pairs_with_target_over_cap"] == 2
    assert summary["pairs_with_target"] == 4


def test_near_grows_the_trigger_by_one_pixel_all_round():
    pixels = torch.zeros(5, 6, dtype=torch.bool)
    pixels[0, 0] = pixels[3, 4] = True
    expected = torch.zeros(5, 6, dtype=torch.bool)
    expected[0:2, 0:2] = True
    expected[2:5, 3:6] = True
    assert torch.equal(trigger_scan.near(pixels), expected)


def test_pair_requests_take_each_source_class_first_images():
    test_y = torch.tensor([1, 0, 2, 0, 1, 0, 2, 2])
    test_x = torch.arange(8.0).view(8, 1, 1, 1)
    fp = {"pair_steps": 7, "init_cost": 0.5}
    pairs, requests = trigger_scan.pair_requests(test_x, test_y, 3, 2, fp)
    assert pairs == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    assert requests[1].x.flatten().tolist() == [1.0, 3.0]
    assert requests[1].labels.tolist() == [2, 2]
    assert requests[4].x.flatten().tolist() == [2.0, 6.0]
    assert requests[4].labels.tolist() == [0, 0]
    assert (requests[0].steps, requests[0].cost, requests[0].n_triggers) == (7, 0.5, 1)
