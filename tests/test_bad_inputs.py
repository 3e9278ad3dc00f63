"""Hostile and broken inputs, run through main.py as a user would: each ends in one clear line
(naming the key, option or file) and a documented exit code, never a traceback; a client that
sends NaN or Inf is rejected and the run goes on with a finite global model."""

import csv
import os
import pickle

import numpy as np
import pytest
import torch

import config
import defense
import defenses
import helper
from conftest import run_main
from models import build_model


def assert_one_clear_line(result, code, *words):
    out = result.stdout + result.stderr
    assert result.returncode == code, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    errors = [line for line in out.splitlines() if "ERROR" in line or "error:" in line]
    assert len(errors) == 1, out[-2000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def global_model_is_finite(path):
    state = torch.load(path, weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# --- non-finite client updates ------------------------------------------------------------------

def hand_made_updates(n=6, bad=2, value=float("nan")):
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.zeros(20), "b": torch.zeros(3)}
    updates = [{"w": 0.1 * torch.randn(20, generator=g) + 0.5, "b": 0.1 * torch.randn(3, generator=g)}
               for _ in range(n)]
    updates[bad]["w"][4] = value
    return state, updates


@pytest.mark.parametrize("rule", sorted(defenses.SERVER_RULES))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_update_is_rejected_and_the_rest_aggregated(rule, value, caplog):
    state, updates = hand_made_updates(value=value)
    params = {k: f.default for k, f in config.all_fields().items()}
    params.update({"aggregation_methods": rule, "lr_para": 1.0, "no_models": 6, "flame_lambda": 0.0,
                   "dp_sigma": 0.0, "clip_norm": 100.0})
    ctx = defense.RoundContext(params, ["w", "b"], torch.Generator().manual_seed(0), [10, 11, 12, 13, 14, 15])
    ctx.root_update = {k: v.clone() for k, v in updates[0].items()}  # FLTrust's server update
    result = defense.aggregate(state, updates, [50] * 6, ctx)
    assert result.admitted[2] is False
    assert "client 12 sent a non-finite update" in caplog.text
    assert all(torch.isfinite(v).all() for v in result.state.values())
    if rule != "foolsgold":  # FoolsGold rightly reads six near-identical updates as sybils
        assert float(result.state["w"].mean()) > 0.2  # the finite updates moved the model


def test_every_update_rejected_leaves_the_global_model_unchanged(caplog):
    state, updates = hand_made_updates(n=3, bad=0)
    for u in updates:
        u["b"][0] = float("nan")
    params = {"aggregation_methods": "mean", "lr_para": 1.0, "no_models": 3}
    result = defense.aggregate(state, updates, [1, 1, 1], defense.RoundContext(params, ["w", "b"], None))
    assert result.admitted == [False, False, False]
    assert all(torch.equal(result.state[k], state[k]) for k in state)
    assert "global model is unchanged" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["mean", "flame"])
def test_diverging_clients_do_not_stop_the_run(tmp_path, synthetic_yaml, rule):
    """lr=1e6 makes benign training diverge to NaN; the run finishes, those clients are marked
    rejected, and every saved global model is finite."""
    run_dir = tmp_path / "run"
    result = run_main("--params", synthetic_yaml({"epochs": 2, "save_on_epochs": [1, 2]}), "--run-dir", run_dir,
                      "--device", "cpu", "--set", "lr=1000000", "--set", f"aggregation_methods={rule}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    with open(run_dir / "clients.csv") as f:
        clients = list(csv.DictReader(f))
    non_finite = [c for c in clients if not np.isfinite(float(c["update_norm"]))]
    assert non_finite and all(c["admitted"] == "0" for c in non_finite)
    assert "sent a non-finite update" in (run_dir / "log.txt").read_text()
    for r in (1, 2):
        assert global_model_is_finite(run_dir / f"model_last.pt.tar.epoch_{r}")


# --- checkpoints --------------------------------------------------------------------------------

def resumed(synthetic_yaml, path, **overrides):
    return synthetic_yaml({"resumed_model": True, "resumed_model_name": str(path), "epochs": 2,
                           "0_poison_epochs": [2], "1_poison_epochs": [2], **overrides})


def test_a_file_that_is_not_a_checkpoint(tmp_path, synthetic_yaml):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a checkpoint\n")
    result = run_main("--params", resumed(synthetic_yaml, bogus), "--run-dir", tmp_path / "run", "--device", "cpu")
    assert_one_clear_line(result, 2, "resumed_model_name", str(bogus))


def test_a_checkpoint_of_another_architecture(tmp_path, synthetic_yaml):
    path = tmp_path / "mnistnet.pt"
    helper.save_reference_checkpoint(path, build_model("MnistNet", (3, 32, 32), 10).state_dict(), 1, 0.1)
    cfg = resumed(synthetic_yaml, path, model="ResNet18", synthetic_shape=[3, 32, 32])
    result = run_main("--params", cfg, "--run-dir", tmp_path / "run", "--device", "cpu")
    assert_one_clear_line(result, 2, "resumed_model_name", str(path), "does not fit model")


class RunsCode:
    """Unpickling this object runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, synthetic_yaml):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "epoch": RunsCode(marker), "lr": 0.1}, path)
    result = run_main("--params", resumed(synthetic_yaml, path), "--run-dir", tmp_path / "run", "--device", "cpu")
    assert_one_clear_line(result, 2, "resumed_model_name", str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # without the guard, loading it does run the command
    assert marker.exists()


@pytest.mark.slow
def test_a_corrupt_resume_checkpoint_points_to_the_previous_one(tmp_path, synthetic_yaml):
    run_dir = tmp_path / "run"
    assert run_main("--params", synthetic_yaml({"epochs": 2}), "--run-dir", run_dir, "--device", "cpu").returncode == 0
    full, prev = run_dir / "checkpoint_full.pt", run_dir / "checkpoint_full.prev.pt"
    assert prev.exists()
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    result = run_main("--resume", run_dir, "--set", "epochs=3")
    line = assert_one_clear_line(result, 2, "--resume", str(full), str(prev))
    assert "move it to" in line
    os.replace(prev, full)
    result = run_main("--resume", run_dir, "--set", "epochs=3")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(run_dir / "metrics.csv") as f:
        assert [int(r["round"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_a_resume_checkpoint_holds_only_safe_types(tmp_path):
    """The resume checkpoint, FLIP's numpy matrices included, loads with weights_only=True."""
    state = {"round": 4, "client_states": {3: {"flip": {"mat_warm": np.eye(3), "triggers": {(0, 1): (torch.ones(2),)}}}}}
    path = str(tmp_path / "checkpoint_full.pt")
    helper.save_full_checkpoint(state, path)
    torch.load(path, weights_only=True)
    back = helper.load_full_checkpoint(path)
    assert np.array_equal(back["client_states"][3]["flip"]["mat_warm"], np.eye(3))
    assert torch.equal(back["client_states"][3]["flip"]["triggers"][(0, 1)][0], torch.ones(2))
    raw = tmp_path / "raw.pt"
    torch.save(state, raw)
    with pytest.raises(pickle.UnpicklingError):  # numpy arrays as they are would not load
        torch.load(raw, weights_only=True)


# --- data files ---------------------------------------------------------------------------------

def write_idx(path, array):
    dims = array.shape
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, len(dims)]))
        f.write(np.asarray(dims, dtype=">u4").tobytes())
        f.write(array.astype(np.uint8).tobytes())


def test_a_truncated_dataset_file(tmp_path, synthetic_yaml):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 600), ("t10k", 100)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    bad = raw / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:5000])
    cfg = synthetic_yaml({"type": "mnist", "data_dir": str(tmp_path / "data")})
    result = run_main("--params", cfg, "--run-dir", tmp_path / "run", "--device", "cpu")
    assert_one_clear_line(result, 1, str(bad), "truncated or corrupt", "downloads it again")
