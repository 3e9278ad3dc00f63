"""The sweep runner (experiments/sweep.py) on local Ray with synthetic data: each cell is the same
run main.py makes, a cell that died resumes to the same records, a failing cell is reported while
the others finish, a second invocation runs nothing again; the report's mean ± std by hand."""

import csv
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, SYNTHETIC, run_main

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import sweep  # noqa: E402


def strip_seconds(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def run_sweep(grid_path):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "sweep.py"), str(grid_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_grid_runs_resumes_reports_failures_and_continues(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({**SYNTHETIC, "epochs": 2, "synthetic_train_size": 600}))
    grid = {"params": str(base), "out": str(tmp_path / "sweep"), "fixed": {"epochs": 2},
            "axes": {"aggregation_methods": ["mean", "median"], "seed": [1, 2]},
            "cells": [{"aggregation_methods": "mean", "seed": 3, "lr": -1.0}], "resources": {"cpus": 1}}
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(grid))
    cells = tmp_path / "sweep" / "cells"
    # a cell that died after its first round: its folder holds round 1 and a checkpoint
    died = cells / "median__seed-2"
    assert run_main("--params", base, "--run-dir", died, "--set", "aggregation_methods=median", "--set", "seed=2",
                    "--set", "epochs=1").returncode == 0
    result = run_sweep(grid_path)
    assert result.returncode == 1, result.stderr[-3000:]
    log = (tmp_path / "sweep" / "sweep.log").read_text()
    assert "5 cells, 0 finished already, 5 to run" in log
    assert "failed: mean__lr--1.0__seed-3 (exit 2): config error: lr: must be > 0" in log
    # every other cell equals the same main.py run made alone
    for name, rule, seed in (("mean__seed-1", "mean", 1), ("median__seed-2", "median", 2)):
        alone = tmp_path / f"alone_{name}"
        assert run_main("--params", base, "--run-dir", alone, "--set", f"aggregation_methods={rule}",
                        "--set", f"seed={seed}", "--set", "epochs=2").returncode == 0
        assert strip_seconds(cells / name / "metrics.csv") == strip_seconds(alone / "metrics.csv"), name
    assert [int(s["first_round"]) for s in
            csv.DictReader(open(died / "segments.csv"))] == [1, 2]  # resumed, not restarted
    with open(tmp_path / "sweep" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2 and {r["cell"] for r in rows} == {"mean__seed-1", "mean__seed-2", "median__seed-1",
                                                                 "median__seed-2"}
    # again, without the failing cell: nothing left to run
    grid["cells"] = []
    grid_path.write_text(yaml.safe_dump(grid))
    again = run_sweep(grid_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 cells, 4 finished already, 0 to run" in again.stderr + again.stdout


def test_the_report_gives_mean_and_sample_std_over_seeds():
    grid = {"axes": {"aggregation_methods": ["mean"], "seed": [1, 2, 3]}, "cells": []}
    rows = []
    for seed, (ma, ba, peak) in zip((1, 2, 3), ((80.0, 10.0, 50.0), (82.0, 20.0, 40.0), (84.0, 30.0, 30.0))):
        rows += [{"cell": f"mean__seed-{seed}", "aggregation_methods": "mean", "seed": str(seed), "round": "1",
                  "main_acc": "70", "backdoor_acc": str(peak), "attackers_selected": "1", "attackers_rejected": "1",
                  "benign_selected": "9", "benign_rejected": str(seed), "seconds": "2.0"},
                 {"cell": f"mean__seed-{seed}", "aggregation_methods": "mean", "seed": str(seed), "round": "2",
                  "main_acc": str(ma), "backdoor_acc": str(ba), "attackers_selected": "0", "attackers_rejected": "0",
                  "benign_selected": "10", "benign_rejected": "0", "seconds": "3.0"}]
    text = sweep.report(grid, rows)
    row = text.splitlines()[2]
    # MA 80, 82, 84: mean 82, sample std 2; BA 10, 20, 30: 20 ± 10; peak 50, 40, 30: 40 ± 10
    assert "| mean | 1,2,3 | 82.00 ± 2.00 (80.00, 82.00, 84.00) | 20.00 ± 10.00 (10.00, 20.00, 30.00) |" in row
    assert "40.00 ± 10.00 (50.00, 40.00, 30.00)" in row
    # TPR 1/1 each: 100 ± 0; FPR 1/19, 2/19, 3/19: mean 2/19 = 10.53 %, std 1/19 = 5.26 %
    assert "100.00 ± 0.00" in row and "10.53 ± 5.26 (5.26, 10.53, 15.79)" in row
    assert "5.00 ± 0.00" in row  # 2 + 3 seconds a cell


def test_cells_and_overrides_from_a_grid(tmp_path):
    grid = {"params": "utils/fashion_mnist.yaml", "out": str(tmp_path), "fixed": {"invert": False, "epochs": 203},
            "axes": {"attack_mode": ["single_shot", "continuous"], "seed": [1, 2]},
            "when": {"attack_mode": {"continuous": {"0_poison_epochs": None}}}, "cells": [{"seed": 9}],
            "resources": {}}
    cells = sweep.expand(grid)
    assert [sweep.cell_name(c) for c in cells] == ["single_shot__seed-1", "single_shot__seed-2",
                                                   "continuous__seed-1", "continuous__seed-2", "seed-9"]
    assert sweep.overrides(grid, cells[2]) == ["invert=false", "epochs=203", "0_poison_epochs=null",
                                               "attack_mode=\"continuous\"", "seed=1"]
    assert sweep.last_epoch(grid, cells[0]) == 203
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"params": "x.yaml", "out": "o", "axes": {"seed": []}}))
    with pytest.raises(sweep.GridError, match="axis 'seed' must be a non-empty list"):
        sweep.load_grid(str(bad))


def test_a_cell_with_rounds_but_no_checkpoint_is_reported_not_restarted(tmp_path):
    grid = {"params": "utils/fashion_mnist.yaml", "out": str(tmp_path), "fixed": {"epochs": 203},
            "axes": {"seed": [1]}, "cells": [], "when": {}, "resources": {}}
    folder = tmp_path / "cells" / "seed-1"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("round,main_acc\n201,80\n")
    outcome = sweep.run_sweep(grid)
    assert outcome["seed-1"][0] == 2 and "has rounds up to 201 but no resume checkpoint" in outcome["seed-1"][1]
    assert (folder / "metrics.csv").read_text() == "round,main_acc\n201,80\n"


def test_only_selects_cells_by_their_values_and_names_a_wrong_key(tmp_path):
    grid = {"params": "utils/fashion_mnist.yaml", "out": str(tmp_path), "fixed": {"epochs": 203},
            "axes": {"attack_mode": ["single_shot", "continuous"], "_defense": ["none", "flip", "flame"]},
            "cells": [{"seed": 4}], "when": {}, "resources": {}}
    only = sweep.parse_only(grid, ["_defense=none,flame", "attack_mode=continuous"])
    assert only == {"_defense": {"none", "flame"}, "attack_mode": {"continuous"}}
    names = [sweep.cell_name(c) for c in sweep.expand(grid) if sweep.selected(c, only)]
    assert names == ["continuous__none", "continuous__flame"]
    assert [sweep.cell_name(c) for c in sweep.expand(grid) if sweep.selected(c, sweep.parse_only(grid, ["seed=4"]))] \
        == ["seed-4"]
    with pytest.raises(sweep.GridError, match="'defense' is not a key of the grid's cells"):
        sweep.parse_only(grid, ["defense=none"])
    with pytest.raises(sweep.GridError, match="expected KEY=VALUE"):
        sweep.parse_only(grid, ["_defense"])
    # a selection with no cell is an error before anything runs
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(grid))
    assert sweep.main([str(grid_path), "--only", "_defense=krum"]) == 2
    assert not (tmp_path / "sweep.log").exists()


class RayStop(Exception):
    pass


def test_cpus_caps_the_local_ray_and_its_default_is_every_core(tmp_path, monkeypatch):
    """`--cpus` reaches ray.init (not the per-cell `resources: cpus`, which is another number)."""
    seen = []

    def init(**kwargs):
        seen.append(kwargs.get("num_cpus"))
        raise RayStop

    monkeypatch.setitem(sys.modules, "ray", type(sys)("ray"))
    sys.modules["ray"].init = init
    grid = {"params": "utils/fashion_mnist.yaml", "out": str(tmp_path), "fixed": {"epochs": 203},
            "axes": {"seed": [1]}, "cells": [], "when": {}, "resources": {"cpus": 1}}
    for max_cpus in (3, None):
        with pytest.raises(RayStop):
            sweep.run_sweep(grid, max_cpus=max_cpus)
    assert seen == [3, os.cpu_count()]


def fake_ray():
    """A stand-in for ray that runs each task at once, in this process."""
    ray = type(sys)("ray")
    ray.init = lambda **kwargs: None
    ray.shutdown = lambda: None
    ray.cluster_resources = lambda: {"CPU": 2}
    ray.get = lambda ref: ref[1]
    ray.wait = lambda refs, num_returns, timeout: (refs[:num_returns], refs[num_returns:])

    def remote(fn):
        task = type(sys)("task")
        task.options = lambda **kwargs: task
        task.remote = lambda *args: (len(calls), calls.append(args) or fn(*args))
        return task

    calls = []
    ray.remote = remote
    return ray


def test_a_cell_stopped_on_request_is_reported_resumable_not_failed(tmp_path, monkeypatch, caplog):
    grid = {"params": "utils/fashion_mnist.yaml", "out": str(tmp_path), "fixed": {"epochs": 203},
            "axes": {"seed": [1, 2, 3]}, "cells": [], "when": {}, "resources": {"cpus": 1}}
    (tmp_path / "cells" / "seed-2").mkdir(parents=True)
    (tmp_path / "cells" / "seed-2" / "metrics.csv").write_text("round,main_acc\n201,80\n202,81\n")
    (tmp_path / "cells" / "seed-2" / "checkpoint_full.pt").write_text("")
    codes = {"seed-1": (0, "", 5.0), "seed-2": (sweep.STOPPED, "", 3.0), "seed-3": (1, "error: boom", 4.0)}
    monkeypatch.setitem(sys.modules, "ray", fake_ray())
    monkeypatch.setattr(sweep, "run_cell", lambda command, run_dir: codes[os.path.basename(run_dir)])
    caplog.set_level("INFO", logger="sweep")
    outcome = sweep.run_sweep(grid)
    assert outcome == codes
    assert "cell seed-2 stopped on request after round 202; run the same command to continue" in caplog.text
    assert "cell seed-3 failed (exit 1): error: boom" in caplog.text
    assert "cells: 1 done, 0 running, 1 failed, 1 stopped, 0 waiting" in caplog.text
    # stopped cells alone end with the stop's exit code, a failure outranks them
    monkeypatch.setattr(sweep, "run_sweep", lambda *args: {"seed-1": codes["seed-1"], "seed-2": codes["seed-2"]})
    monkeypatch.setattr(sweep, "finish", lambda grid: None)
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(grid))
    assert sweep.main([str(grid_path)]) == sweep.STOPPED
    monkeypatch.setattr(sweep, "run_sweep", lambda *args: codes)
    assert sweep.main([str(grid_path)]) == 1
