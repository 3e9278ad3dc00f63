"""experiments/horizon.py on hand-made run folders with known answers: the recovery round, the mean
BA after the last attack, the MA cost, the FLIP table's norm shares."""

import csv
import os
import sys

import pytest
import yaml

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import horizon  # noqa: E402

ROUNDS = list(range(201, 213))
BA = {("single_shot", "none"): [1.0, 50, 40, 90, 80, 99, 98, 99.5, 99, 98, 97, 96],
      ("single_shot", "flip"): [1.5, 50, 40, 80, 60, 90, 70, 95, 40, 3.4, 4.0, 3.0],
      ("continuous", "none"): [5, 9, 12, 15, 18, 20, 22, 25, 27, 30, 33, 35],
      ("continuous", "flip"): [2, 3, 3.6, 3.5, 3.0, 2.0, 1.0, 3.5, 3.5, 3.4, 3.2, 3.1]}
MA = {"none": 80.0, "flip": 77.5}
MA_RAW = {"none": 81.0, "flip": 80.25}


def write_cell(folder, attack, defense):
    os.makedirs(folder)
    params = {"attack_mode": attack}
    if attack == "single_shot":
        params.update({"0_poison_epochs": [202], "1_poison_epochs": [204], "2_poison_epochs": [206],
                       "3_poison_epochs": [208], "internal_poison_epochs": 20})
    with open(os.path.join(folder, "params.yaml"), "w") as f:
        yaml.safe_dump(params, f)
    columns = ["round", "main_acc", "main_acc_raw", "backdoor_acc", "backdoor_acc_raw", "ba_trigger_0",
               "attackers_selected", "flip_stamped_to_target", "seconds"]
    with open(os.path.join(folder, "metrics.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r, ba in zip(ROUNDS, BA[attack, defense]):
            writer.writerow([r, MA[defense], MA_RAW[defense], ba, ba, ba, 1, 3, 1.0])
    with open(os.path.join(folder, "clients.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", "client_id", "is_attacker", "update_norm"])
        for r in ROUNDS:
            writer.writerows([[r, 1, 1, 3.0], [r, 2, 0, 1.0], [r, 3, 0, 2.0]])


@pytest.fixture
def grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "params": "utils/fashion_mnist.yaml", "out": str(tmp_path / "sweep"), "fixed": {"epochs": 212},
        "axes": {"attack_mode": ["single_shot", "continuous"], "_defense": ["none", "flip"]}}, sort_keys=False))
    for attack in ("single_shot", "continuous"):
        for defense in ("none", "flip"):
            write_cell(tmp_path / "sweep" / "cells" / f"{attack}__{defense}", attack, defense)
    return path


def summary_rows(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 11 and cells[0] in ("single_shot", "continuous"):
            rows[cells[0], cells[1]] = cells
    return rows


def test_recovery_round_and_mean_ba_have_their_hand_worked_values(grid, tmp_path):
    horizon.main([str(grid)])
    text = (tmp_path / "sweep" / "horizon.md").read_text()
    rows = summary_rows(text)
    assert "mean BA from 209" in text  # one after the last single-shot attack, 208
    # single-shot FLIP: clean 1.5, so at most 3.5; after 208: 40, 3.4, 4.0 (above), 3.0 -> 212
    assert rows["single_shot", "flip"][3:6] == ["1.50", "212", f"{(40 + 3.4 + 4.0 + 3.0) / 4:.2f}"]
    assert rows["single_shot", "none"][3:5] == ["1.00", "never"]
    # continuous FLIP against its defense's clean level 1.5: 3.6 at 203 is above, then all <= 3.5
    assert rows["continuous", "flip"][4] == "204"
    assert rows["continuous", "none"][4] == "never"
    assert rows["single_shot", "flip"][8:] == [f"{77.5 - 80.0:+.2f}", "80.25", f"{80.25 - 81.0:+.2f}"]
    assert (tmp_path / "sweep" / "horizon_single_shot.png").exists()
    table = text[text.index("## single_shot: FLIP"):]
    assert "| 212 | 1 | 77.50 | 80.00 | 3.00 | 3.00 | 96.00 | 3.00 | 3 | 50.0 % |" in table  # norm share 3 / (3+1+2)


def test_a_run_short_of_the_horizon_says_so(grid, tmp_path):
    path = tmp_path / "sweep" / "cells" / "single_shot__flip" / "metrics.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-2]) + "\n")  # rounds to 210: 40, 3.4
    horizon.main([str(grid)])
    rows = summary_rows((tmp_path / "sweep" / "horizon.md").read_text())
    assert rows["single_shot", "flip"][4] == "210 so far"
    assert rows["single_shot", "flip"][5] == f"{(40 + 3.4) / 2:.2f} so far"


@pytest.mark.parametrize("params, fixed, name", [("utils/fashion_mnist.yaml", {}, "Fashion-MNIST"),
                                                 ("utils/mnist.yaml", {}, "MNIST"),
                                                 ("utils/fashion_mnist.yaml", {"type": "mnist"}, "MNIST")])
def test_the_report_names_the_grids_dataset(grid, params, fixed, name):
    spec = yaml.safe_load(grid.read_text())
    spec["params"] = params
    spec["fixed"].update(fixed)
    grid.write_text(yaml.safe_dump(spec))
    horizon.main([str(grid)])
    heading = (grid.parent / "sweep" / "horizon.md").read_text().splitlines()[0]
    assert heading == f"# sweep: {name}, every defense to round 212"
