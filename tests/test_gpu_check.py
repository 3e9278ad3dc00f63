"""The prepared GPU check rehearses on the CPU (synthetic data, tiny budget), so it cannot rot
before a GPU runs it; and without CUDA the real check stops at once with one line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real check would run")
def test_without_cuda_the_check_stops_at_once_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--out", tmp_path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device here; nothing to check (--rehearse runs the steps on the CPU)"]
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_rehearsal_gives_every_number(tmp_path, monkeypatch):
    import gpu_check

    kept = {}
    original = gpu_check.read_rows

    def keep_rows(run_dir):  # the run folders live in a temporary folder: keep what the report read
        rows = original(run_dir)
        kept[os.path.basename(run_dir)] = rows
        return rows

    monkeypatch.setattr(gpu_check, "read_rows", keep_rows)
    assert gpu_check.main(["--rehearse", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["solver", "solver_cudnn_benchmark", "solver_per_request", "round", "agreement_device",
                           "agreement", "smoke", "cifar"]
    assert all(s["exit"] == 0 for s in steps.values())
    assert steps["smoke"]["result"] == {"passed": 1}
    variants = [(x["path"], x["cudnn_benchmark"]) for name in list(steps)[:3] for x in steps[name]["result"]]
    assert variants == [("vmapped", False), ("vmapped", True), ("per_request", False)]
    (solver,) = steps["solver"]["result"]
    assert solver["steps"] == 5 and solver["images"] == [4, 4]
    assert solver["ms_per_step"] == pytest.approx(1000 * solver["seconds"] / 5, abs=0.11)  # seconds: 3 decimals
    assert solver["aten_calls_per_step"] > 0 and "kernels_per_step" not in solver  # no CUDA, no kernel counts
    modes = [(x["mode"], x["adaptive_budget"]) for x in steps["round"]["result"] if "mode" in x]
    assert modes == [("batched", False), ("batched", True)]
    for x in steps["round"]["result"]:
        assert x["round_seconds"] > 0 and 0 <= x["main_acc"] <= 100 and x["budget_scale"] == 0.01
        assert x["full_budget_estimate"] == pytest.approx(x["round_seconds"] + 99 * x["phases"]["inversion"], abs=0.06)
    assert [x["mode"] for x in steps["cifar"]["result"]] == ["batched"]
    agreement = steps["agreement"]["result"]
    cpu, dev = kept["agree_cpu"], kept["agree_device"]
    assert agreement["rounds"] == [1, 2] and agreement["agree"]
    assert agreement["max_abs_diff"] == {"main_acc": 0.0, "backdoor_acc": 0.0}  # both ran on the CPU
    assert agreement["cpu"] == [[float(r["main_acc"]), float(r["backdoor_acc"])] for r in cpu]
    assert agreement["device"] == [[float(r["main_acc"]), float(r["backdoor_acc"])] for r in dev]
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "rehearsal" in text and f"{solver['ms_per_step']} ms/step (vmapped)" in text and ": agree" in text
    assert "full budget ~" in text


def test_agreement_is_judged_by_the_largest_difference(tmp_path, monkeypatch):
    """A device run 1.5 BA points off in one round is within tolerance; 2.5 points is not."""
    import gpu_check

    base = [{"round": "1", "main_acc": "50.0", "backdoor_acc": "10.0"},
            {"round": "2", "main_acc": "60.0", "backdoor_acc": "20.0"}]
    for off, agree in ((1.5, True), (2.5, False)):
        shifted = [dict(base[0]), {**base[1], "backdoor_acc": str(20.0 + off)}]
        monkeypatch.setattr(gpu_check, "read_rows", lambda d, s=shifted: base if d.endswith("agree_cpu") else s)
        parse = dict((name, fn) for name, _, _, fn in gpu_check.plan(
            type("A", (), {"rehearse": True})(), "cuda", str(tmp_path)))["agreement"]
        result = parse("")
        assert result["max_abs_diff"] == {"main_acc": 0.0, "backdoor_acc": pytest.approx(off)}
        assert result["agree"] is agree
