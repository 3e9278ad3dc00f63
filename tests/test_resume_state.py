"""A run killed and resumed gives the records of one that never stopped, also when rounds carry
state: FLIP's per-client matrices and triggers (clients chosen again skip their warm-up) and
FoolsGold's update histories (the server state)."""

import os

import numpy as np
import pytest
import torch

import config
import helper
import train
from conftest import DEVICE, run_main

SHORT_FLIP = {"warmup_steps": 3, "pair_steps": 3, "refine_steps": 2, "retry_steps": 2, "single_refine_steps": 2,
              "single_retry_steps": 2, "max_batch_steps": 12, "batch_size": 32, "local_passes": 1}


def kill_in_round(params, run_dir, round_no, monkeypatch):
    """Run ``params`` in ``run_dir`` in this process and stop it as a kill would, as round
    ``round_no`` starts."""
    original = train.Federation.run_round

    def dies(self, r):
        if r == round_no:
            raise KeyboardInterrupt
        return original(self, r)

    monkeypatch.setattr(train.Federation, "run_round", dies)
    with pytest.raises(KeyboardInterrupt):
        train.run(params, str(run_dir), "cpu")
    monkeypatch.undo()


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {"invert": True, "flip": SHORT_FLIP},
    {"aggregation_methods": "foolsgold", "foolsgold_features": "all"},
], ids=["flip", "foolsgold"])
def test_a_killed_run_with_state_resumes_to_the_same_records(tmp_path, synthetic_yaml, monkeypatch, overrides):
    # 6 clients, 4 a round: rounds 2-4 choose clients that took part before
    path = synthetic_yaml({"epochs": 4, "number_of_total_participants": 6, "no_models": 4, "adversary_list": [5],
                           "0_poison_epochs": [2], "1_poison_pattern": None, "1_poison_epochs": None,
                           "synthetic_train_size": 600, **overrides})
    whole = tmp_path / "whole"
    assert run_main("--params", path, "--run-dir", whole, "--device", DEVICE).returncode == 0
    killed = tmp_path / "killed"
    os.makedirs(killed)
    kill_in_round(config.load_config(path), killed, 3, monkeypatch)
    result = run_main("--resume", killed, "--device", DEVICE)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("metrics.csv", "clients.csv"):
        strip = (lambda text: [",".join(line.split(",")[:-1]) for line in text.splitlines()]) \
            if name == "metrics.csv" else str.splitlines  # metrics' last column is the wall time
        assert strip((killed / name).read_text()) == strip((whole / name).read_text()), name
    resumed, straight = (helper.load_full_checkpoint(str(d / "checkpoint_full.pt")) for d in (killed, whole))
    assert same_values(resumed["client_states"], straight["client_states"])
    assert bool(resumed["client_states"]) == bool(overrides.get("invert"))
    assert same_values(resumed["server_state"], straight["server_state"])
    if overrides.get("aggregation_methods") == "foolsgold":
        assert len(straight["server_state"]["foolsgold_history"]) == 6  # every client took part
    if overrides.get("invert"):
        log = (whole / "log.txt").read_text()
        assert "round 3 FLIP inversions by kind" in log and "warmup" in log


def same_values(a, b):
    """Nested dicts/lists/tuples of tensors, arrays and plain values, equal element for element."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    return a == b


def test_a_resumed_csv_keeps_the_columns_it_was_started_with(tmp_path):
    """Runs started before a rule's columns changed (clients.csv once carried FLAME's two columns
    for every rule) resume with their header, new columns added at the end, rows kept to the
    checkpoint's round."""
    path = tmp_path / "clients.csv"
    path.write_text("round,client_id,outlier_score\n1,4,\n1,5,0.25\n2,4,\n")
    log = helper.CsvLog(str(path), ["round", "client_id", "fltrust_trust"], keep_rounds=1)
    log.append([{"round": 2, "client_id": 7, "fltrust_trust": 0.5}])
    assert path.read_text().splitlines() == ["round,client_id,outlier_score,fltrust_trust", "1,4,,", "1,5,0.25,",
                                             "2,7,,0.5"]
