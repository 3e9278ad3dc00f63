"""Run folders stay whole: one process per folder, no silent empty run, no non-finite start model,
no unusable output path, a resume that extends a continuous attack poisons to the new end. Each
case runs main.py as a user would and checks the exit code, the message and the records."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import run_folder
from conftest import ROOT, run_main
from test_bad_inputs import assert_one_clear_line

RECORDS = ("metrics.csv", "clients.csv", "params.yaml", "log.txt", "segments.csv", "checkpoint_full.pt")


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in RECORDS if (folder / name).exists()}


def rounds_of(folder):
    with open(folder / "metrics.csv") as f:
        return [int(r["round"]) for r in csv.DictReader(f)]


def finished_run(tmp_path, synthetic_yaml, overrides=None, name="run"):
    run_dir = tmp_path / name
    result = run_main("--params", synthetic_yaml({"epochs": 2, **(overrides or {})}), "--run-dir", run_dir,
                      "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def wait_for(condition, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


# --- one process per folder --------------------------------------------------------------------

@pytest.mark.slow
def test_a_folder_held_by_another_process_is_refused_and_left_unchanged(tmp_path, synthetic_yaml):
    run_dir = finished_run(tmp_path, synthetic_yaml)
    before = snapshot(run_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, run_folder; "
                               "run_folder.FolderLock(sys.argv[1]).acquire(); print('held', flush=True); "
                               "time.sleep(120)", str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (("--resume", run_dir, "--set", "epochs=3"),
                     ("--params", synthetic_yaml({"epochs": 3}), "--run-dir", run_dir)):
            line = assert_one_clear_line(run_main(*args, "--device", "cpu"), 2, str(run_dir),
                                         f"process {holder.pid}", "in use")
            assert "is in use by" in line
            assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    result = run_main("--resume", run_dir, "--set", "epochs=3", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert rounds_of(run_dir) == [1, 2, 3]


@pytest.mark.slow
def test_two_runs_on_one_folder_and_a_killed_holder_leaves_no_stale_lock(tmp_path, synthetic_yaml):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), "--params",
                              synthetic_yaml({"epochs": 400}), "--run-dir", str(run_dir), "--device", "cpu"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (run_dir / "checkpoint_full.pt").exists())
        second = run_main("--params", synthetic_yaml({"epochs": 3}), "--run-dir", run_dir, "--device", "cpu")
        assert_one_clear_line(second, 2, str(run_dir), f"process {first.pid}")
        params = yaml.safe_load((run_dir / "params.yaml").read_text())
        assert params["epochs"] == 400  # the second run wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = rounds_of(run_dir)
    result = run_main("--resume", run_dir, "--set", f"epochs={max(done) + 1}", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    rounds = rounds_of(run_dir)
    assert rounds == list(range(1, max(done) + 2)) and len(set(rounds)) == len(rounds)


@pytest.mark.slow
def test_the_pretraining_folder_is_locked_too(tmp_path, synthetic_yaml):
    folder = tmp_path / "pretrain"
    folder.mkdir()
    with run_folder.FolderLock(str(folder), "pretraining folder"):
        result = run_main("--params", synthetic_yaml({"epochs": 4, "resumed_model": True,
                                                      "resumed_model_name": str(folder / "model.epoch_2")}),
                          "--run-dir", tmp_path / "run", "--device", "cpu")
    assert_one_clear_line(result, 2, "pretraining folder", str(folder), f"process {os.getpid()}")
    assert os.listdir(folder) == [".lock"]
    assert not (tmp_path / "run").exists()


# --- rounds to run -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_new_run_with_no_round_to_run_says_so_and_leaves_nothing(tmp_path, synthetic_yaml):
    start = finished_run(tmp_path, synthetic_yaml, {"is_poison": False}, "start") / "model_last.pt.tar.epoch_2"
    for epochs in (1, 2):
        result = run_main("--params", synthetic_yaml({"epochs": epochs, "resumed_model": True,
                                                      "resumed_model_name": str(start)}),
                          "--run-dir", tmp_path / "new", "--device", "cpu")
        assert_one_clear_line(result, 2, "epochs", f"({epochs})", "(2,", "no round to run")
        assert not (tmp_path / "new").exists()


def test_resuming_a_finished_run_says_it_is_finished(tmp_path, synthetic_yaml):
    run_dir = finished_run(tmp_path, synthetic_yaml)
    before = snapshot(run_dir)
    result = run_main("--resume", run_dir, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "is finished: it ran to round 2 (epochs: 2)" in result.stdout
    assert snapshot(run_dir) == before


# --- non-finite models -------------------------------------------------------------------------

@pytest.mark.slow
def test_a_start_model_with_nan_weights_is_refused(tmp_path, synthetic_yaml):
    good = finished_run(tmp_path, synthetic_yaml, {"is_poison": False}, "start") / "model_last.pt.tar.epoch_2"
    ckpt = torch.load(good, weights_only=True)
    key = list(ckpt["state_dict"])[1]
    ckpt["state_dict"][key][0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(ckpt, bad)
    result = run_main("--params", synthetic_yaml({"epochs": 3, "resumed_model": True, "resumed_model_name": str(bad)}),
                      "--run-dir", tmp_path / "run", "--device", "cpu")
    assert_one_clear_line(result, 2, str(bad), f"'{key}'", "non-finite")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_resume_checkpoint_with_inf_weights_is_refused(tmp_path, synthetic_yaml):
    run_dir = finished_run(tmp_path, synthetic_yaml)
    path = run_dir / "checkpoint_full.pt"
    ckpt = torch.load(path, weights_only=True)
    key = next(k for k, v in ckpt["global_state"].items() if v.is_floating_point())
    ckpt["global_state"][key].view(-1)[3] = float("inf")
    torch.save(ckpt, path)
    before = snapshot(run_dir)
    assert_one_clear_line(run_main("--resume", run_dir, "--set", "epochs=3", "--device", "cpu"), 2,
                          str(path), f"'{key}'", "non-finite")
    assert snapshot(run_dir) == before


# --- damaged resume checkpoints ----------------------------------------------------------------

@pytest.mark.slow
def test_both_resume_checkpoints_damaged_suggests_no_fallback(tmp_path, synthetic_yaml):
    run_dir = finished_run(tmp_path, synthetic_yaml)
    for name in ("checkpoint_full.pt", "checkpoint_full.prev.pt"):
        data = (run_dir / name).read_bytes()
        (run_dir / name).write_bytes(data[: len(data) // 2])
    line = assert_one_clear_line(run_main("--resume", run_dir, "--set", "epochs=3", "--device", "cpu"), 2,
                                 "does not read either", "start the run again")
    assert "move it to" not in line


# --- output paths ------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["file", "under_file"])
def test_a_run_dir_that_cannot_be_a_folder(tmp_path, synthetic_yaml, where):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    target = afile if where == "file" else afile / "run"
    result = run_main("--params", synthetic_yaml(), "--run-dir", target, "--device", "cpu")
    assert_one_clear_line(result, 2, "--run-dir", str(target))
    assert afile.read_text() == "keep me"


def test_an_unwritable_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere
    with pytest.raises(run_folder.RunFolderError, match="not writable"):
        run_folder.usable_folder(str(tmp_path), "--run-dir")


# --- a continuous attack extended by --resume --------------------------------------------------

CONTINUOUS = {"attack_mode": "continuous", "0_poison_epochs": None, "1_poison_epochs": None}


@pytest.mark.slow
def test_a_continuous_attack_extended_by_resume_poisons_as_in_one_go(tmp_path, synthetic_yaml):
    path = synthetic_yaml(CONTINUOUS)
    whole = tmp_path / "whole"
    assert run_main("--params", path, "--run-dir", whole, "--set", "epochs=4", "--device", "cpu").returncode == 0
    short = tmp_path / "short"
    assert run_main("--params", path, "--run-dir", short, "--set", "epochs=2", "--device", "cpu").returncode == 0
    old_style = tmp_path / "old_style"
    os.rename(finished_run(tmp_path, synthetic_yaml, CONTINUOUS, "tmp"), old_style)
    params = yaml.safe_load((old_style / "params.yaml").read_text())
    params.update({"0_poison_epochs": [1, 2], "1_poison_epochs": [1, 2]})  # as runs before the fix wrote it
    (old_style / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for run_dir in (short, old_style):
        result = run_main("--resume", run_dir, "--set", "epochs=4", "--device", "cpu")
        assert result.returncode == 0, result.stderr[-2000:]
        assert strip_seconds(run_dir) == strip_seconds(whole)
        assert (run_dir / "clients.csv").read_text() == (whole / "clients.csv").read_text()
        assert [r["attackers_selected"] for r in read_rows(run_dir)] == ["2"] * 4
        assert yaml.safe_load((run_dir / "params.yaml").read_text())["epochs"] == 4
    segments = run_folder.read_segments(short)
    assert [(int(s["first_round"]), int(s["last_round"])) for s in segments] == [(1, 2), (3, 4)]
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert {s["commit"] for s in segments} == {head.stdout.strip()}
        assert (short / "params.yaml").read_text().startswith(f"# written by commit {head.stdout.strip()}")


def read_rows(folder):
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


def strip_seconds(folder):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_rows(folder)]


def test_a_run_killed_while_saving_its_checkpoint_still_has_one(tmp_path, monkeypatch):
    """The newest resume checkpoint is written aside and swapped in: a kill during the write
    leaves the previous round's checkpoint at checkpoint_full.pt, never no checkpoint."""
    import helper

    path = str(tmp_path / "checkpoint_full.pt")
    helper.save_full_checkpoint({"round": 1}, path)
    helper.save_full_checkpoint({"round": 2}, path)
    assert helper.load_full_checkpoint(path)["round"] == 2
    assert helper.load_full_checkpoint(helper.previous_checkpoint(path))["round"] == 1

    def killed(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half a checkpo")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        helper.save_full_checkpoint({"round": 3}, path)
    monkeypatch.undo()
    assert helper.load_full_checkpoint(path)["round"] == 2
    assert helper.load_full_checkpoint(helper.previous_checkpoint(path))["round"] == 1


def test_a_run_in_progress_elsewhere_does_not_mark_the_code_changed(tmp_path):
    """Tracked run records (a resumable run's metrics.csv being appended to) are not code: only a
    change outside the record folders makes the segment 'dirty'."""
    import importlib.util
    import shutil

    repo = tmp_path / "repo"
    (repo / "experiments" / "sweeps" / "cell").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "run_folder.py"), repo / "run_folder.py")
    (repo / "experiments" / "sweeps" / "cell" / "metrics.csv").write_text("round\n1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "start"], check=True)
    spec = importlib.util.spec_from_file_location("copied_run_folder", repo / "run_folder.py")
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    assert copied.code_version()["dirty"] is False
    (repo / "experiments" / "sweeps" / "cell" / "metrics.csv").write_text("round\n1\n2\n")
    assert copied.code_version()["dirty"] is False
    with open(repo / "run_folder.py", "a") as f:
        f.write("\n# changed\n")
    assert copied.code_version()["dirty"] is True


def test_repeatability_changes_name_what_differs_from_the_segment_before():
    before = {"threads": "1", "torch": "2.14.1", "device": "cpu", "cpu": "", "gpu": "", "commit": "abc"}
    same = {**before, "cpu": "Intel(R) Xeon(R) Processor, torch AVX512", "commit": "def"}
    assert run_folder.repeatability_changes([before]) == []
    assert run_folder.repeatability_changes([before, same]) == []  # a blank earlier value is not compared
    moved = {**same, "threads": 2, "device": "cuda", "gpu": "NVIDIA H200"}
    assert run_folder.repeatability_changes([before, same, moved]) == ["threads: 1 -> 2", "device: cpu -> cuda"]
    assert run_folder.repeatability_changes([moved, {**moved, "torch": "2.15.0"}]) == ["torch: 2.14.1 -> 2.15.0"]


@pytest.mark.slow
def test_a_resume_at_another_thread_count_warns_once(tmp_path, synthetic_yaml):
    run_dir = tmp_path / "run"
    path = synthetic_yaml({"epochs": 1})
    assert run_main("--params", path, "--run-dir", run_dir, "--device", "cpu", "--threads", "1").returncode == 0
    for epochs, warned in ((2, True), (3, False)):
        result = run_main("--resume", run_dir, "--set", f"epochs={epochs}", "--device", "cpu", "--threads", "2")
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("threads: 1 -> 2" in result.stderr) is warned
    assert [s["threads"] for s in run_folder.read_segments(run_dir)] == ["1", "2", "2"]
    assert "threads: 1 -> 2" in (run_dir / "log.txt").read_text()


def test_segments_name_the_cpu_and_keep_the_rows_of_a_file_written_before_that_column(tmp_path):
    old_header = "started,first_round,last_round,commit,dirty,torch,device,threads\n"
    (tmp_path / "segments.csv").write_text(old_header + "2026-11-21 07:20:54,201,218,abc123,False,2.14.1,cpu,1\n")
    returned = run_folder.record_segment(str(tmp_path), 219, 300, "cpu")
    assert [(r["first_round"], r["last_round"]) for r in returned] == [("201", "218"), (219, 300)]
    with open(tmp_path / "segments.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == old_header.strip().split(",") + ["cpu", "gpu"]
    assert rows[0] == ["2026-11-21 07:20:54", "201", "218", "abc123", "False", "2.14.1", "cpu", "1", "", ""]
    assert rows[1][1:3] == ["219", "300"] and rows[1][6:8] == ["cpu", str(torch.get_num_threads())]
    assert rows[1][8].endswith(f", torch {torch.backends.cpu.get_cpu_capability()}") and rows[1][9] == ""
    if os.path.exists("/proc/cpuinfo"):
        models = [line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        if models:
            assert rows[1][8].startswith(models[0] + ",")
    assert not (tmp_path / "segments.csv.tmp").exists()
