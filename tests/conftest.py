import os
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The device of the runs the tests start through main.py (bench/gpu_check.py sets it to cuda); the
# in-process tests build their tensors on the CPU, and the bitwise thread-determinism tests are
# about the CPU's kernels, so they stay there.
DEVICE = os.environ.get("FLIP_TEST_DEVICE", "cpu")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
torch.set_num_threads(min(2, torch.get_num_threads()))  # OMP_NUM_THREADS=1 leaves a core to a background run

SYNTHETIC = {
    "type": "synthetic",
    "synthetic_shape": [1, 28, 28],
    "synthetic_train_size": 1200,
    "synthetic_test_size": 300,
    "number_of_total_participants": 12,
    "no_models": 4,
    "epochs": 3,
    "lr_para": 1.0,
    "adversary_list": [5, 7],
    "internal_poison_epochs": 2,
    "0_poison_pattern": [[0, 0], [0, 1], [0, 2], [0, 3]],
    "1_poison_pattern": [[3, 0], [3, 1], [3, 2], [3, 3]],
    "0_poison_epochs": [2],
    "1_poison_epochs": [3],
    "save_on_epochs": [2],
}


def write_yaml(path, overrides=None, base=SYNTHETIC):
    """Write ``base`` updated with ``overrides`` (a None value removes the key)."""
    cfg = dict(base)
    cfg.update(overrides or {})
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def run_main(*args, cwd=ROOT, env=None):
    """Run main.py as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture
def synthetic_yaml(tmp_path):
    return lambda overrides=None: write_yaml(tmp_path / "cfg.yaml", overrides)
