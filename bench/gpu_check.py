"""The prepared GPU check: proves the CUDA path and measures it, in under ten minutes, unattended.

    python bench/gpu_check.py --prepare              # here: bundle Fashion-MNIST and hdbscan's wheel
    python bench/gpu_check.py --out DIR              # on the CUDA machine (bench/gpu_bundle carried)
    python bench/gpu_check.py --rehearse --out DIR   # on the CPU, tiny budget, synthetic data

Steps, each a subprocess with its own time limit, skipped once the deadline is near. A full-budget
FLIP round takes minutes on a GPU too (docs/performance.md), so the rounds here run at a fraction
of the reference budget, and the first step asks why a round costs that much:
  solver      one batched inversion call (ten requests of 17 images, 200 Adam steps), profiled:
              milliseconds per step against the GPU kernels' own time per step, kernel launches
              and host synchronisations (bench/solver_time.py --profile); then the same with
              cuDNN's algorithm search on, and with the per-request pass instead of the vmapped one
              (20 steps)
  round       one Fashion-MNIST FLIP round (201, ten first-time clients, the shipped model) at 10 %
              of the reference budget, batched, reference and adaptive budget, MA/BA and a
              full-budget estimate
  agreement   the same seed on the CPU and on the device: MA/BA per round, within a tolerance
  smoke       the tests that run main.py, on the device (FLIP_TEST_DEVICE)
  cifar       the CIFAR-10 synthetic bench round (ten clients) at 5 % of the budget
Writes DIR/gpu_check.json and DIR/gpu_check.txt. Without CUDA (and without --rehearse) it exits
at once with one line.
"""

import argparse
import csv
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import offline_data  # noqa: E402

BUNDLE = os.path.join(ROOT, "bench", "gpu_bundle")
HDBSCAN = "hdbscan==0.8.44"
STEP_KEYS = ["warmup_steps", "pair_steps", "refine_steps", "retry_steps", "single_refine_steps", "single_retry_steps"]
# CPU and device runs of one seed differ in float rounding, which a federated run amplifies; these
# are the largest differences in percentage points that still count as agreement.
TOLERANCE = {"main_acc": 1.0, "backdoor_acc": 2.0}


def prepare():
    """Put what the check needs and the device machine lacks into bench/gpu_bundle (git-ignored):
    Debian's Fashion-MNIST files and hdbscan's wheel for the device's Python 3.12."""
    os.makedirs(os.path.join(BUNDLE, "wheels"), exist_ok=True)
    fm = os.path.join(BUNDLE, "fashion-mnist")
    os.makedirs(fm, exist_ok=True)
    for path in glob.glob(os.path.join(offline_data.DEBIAN_FASHION_MNIST, "*.gz")):
        subprocess.run(["cp", path, fm], check=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "-d", os.path.join(BUNDLE, "wheels"), HDBSCAN], check=True)
    print(f"bundle ready in {BUNDLE}: carry bench/gpu_bundle")
    return 0


def install_bundle(env):
    """On the device machine: Fashion-MNIST into data/, the wheels onto PYTHONPATH."""
    fm = os.path.join(BUNDLE, "fashion-mnist")
    if not os.path.isdir(os.path.join(ROOT, "data", "FashionMNIST", "raw")) and os.path.isdir(fm):
        offline_data.copy_debian_fashion_mnist(os.path.join(ROOT, "data"), fm)
    wheels = glob.glob(os.path.join(BUNDLE, "wheels", "*.whl"))
    if wheels:
        target = os.path.join(tempfile.gettempdir(), "gpu_check_site")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        target, *wheels], check=False)
        env["PYTHONPATH"] = target + os.pathsep + env.get("PYTHONPATH", "")


def run_step(cmd, env, timeout):
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        out, code = (e.stdout or "") + (e.stderr or "") if isinstance(e.stdout, str) else "", "timeout"
    return {"exit": code, "seconds": round(time.perf_counter() - start, 1), "tail": out[-1500:]}, out


def json_lines(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def budget_overrides(scale):
    """`--set flip.<steps>=...` scaling the reference's Fashion-MNIST inversion budget."""
    from defenses import flip

    return [f"flip.{k}={max(1, round(flip.SETTINGS[k].default * scale))}" for k in STEP_KEYS]


def plan(args, device, work):
    """(name, command, time limit, parser) of every step, for the device or the CPU rehearsal."""
    py, r = sys.executable, args.rehearse
    data = (["--set", "type=synthetic", "--set", "synthetic_train_size=600", "--set", "synthetic_test_size=200",
             "--set", "resumed_model=false"] if r else [])
    bench_data = ["--synthetic", "--set", "synthetic_train_size=600", "--set", "synthetic_test_size=200"] if r else []
    scale = ["--budget-scale", "0.01", "--clients", "2"] if r else ["--budget-scale", "0.1"]
    tests = (["tests/test_defense.py", "-k", "flame_run"] if r else
             ["tests/test_run.py", "tests/test_datasets_e2e.py", "tests/test_defense.py", "tests/test_baselines.py"])
    first = 1 if r else 201
    flip_small = budget_overrides(0.01 if r else 0.1)

    agree = ["--set", "invert=true", *sum((["--set", o] for o in flip_small), [])]

    def main_run(name, dev, last, extra):
        return [py, "main.py", "--params", "utils/fashion_mnist.yaml", "--run-dir", os.path.join(work, name),
                "--device", dev, "--set", f"epochs={last}", *data, *extra]

    def agreement(_out):
        rows = {name: read_rows(os.path.join(work, f"agree_{name}")) for name in ("cpu", "device")}
        diffs = {k: max(abs(float(a[k]) - float(b[k])) for a, b in zip(rows["cpu"], rows["device"])) for k in TOLERANCE}
        return {"rounds": [int(x["round"]) for x in rows["device"]], "max_abs_diff": diffs, "tolerance": TOLERANCE,
                "cpu": [[float(x[k]) for k in TOLERANCE] for x in rows["cpu"]],
                "device": [[float(x[k]) for k in TOLERANCE] for x in rows["device"]],
                "agree": all(diffs[k] <= TOLERANCE[k] for k in TOLERANCE)}

    # The per-request path launches each request's kernels apart: on an H200 its 200 steps did not
    # finish in the step's 90 s, so it times 20.
    return [
        *[(name, [py, "bench/solver_time.py", "--device", device, "--profile", *flags,
                  *(["--images", "4", "--requests", "2", "--steps", "5", "--repeats", "1"] if r else
                    ["--images", "17", "--requests", "10", "--steps", steps])], 90, json_lines)
          for name, flags, steps in (("solver", ["--path", "vmapped"], "200"),
                                     ("solver_cudnn_benchmark", ["--path", "vmapped", "--cudnn-benchmark"], "200"),
                                     ("solver_per_request", ["--path", "per_request"], "20"))],
        ("round", [py, "bench/round_time.py", "--device", device, "--adaptive", *bench_data, *scale],
         180, json_lines),
        ("agreement_device", main_run("agree_device", device, first + 1, agree), 120, None),
        ("agreement", main_run("agree_cpu", "cpu", first + 1, agree), 240, agreement),
        ("smoke", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], 240, smoke_counts),
        ("cifar", [py, "bench/round_time.py", "--params", "utils/cifar.yaml", "--synthetic", "--device", device,
                   *(["--set", "synthetic_train_size=200", "--budget-scale", "0.005", "--clients", "1"] if r else
                     ["--budget-scale", "0.05"])], 180, json_lines),
    ]


def smoke_counts(out):
    found = re.findall(r"(\d+) (passed|failed|skipped|error)", out.strip().splitlines()[-1] if out.strip() else "")
    return {word: int(n) for n, word in found}


def summary_text(report):
    lines = [f"gpu_check on {report['device']} ({report['device_name']}), torch {report['torch']}, "
             f"{'rehearsal' if report['rehearse'] else 'full budget'}, {report['seconds']} s"]
    for name, step in report["steps"].items():
        head = f"{name}: exit {step.get('exit')} in {step.get('seconds')} s"
        result = step.get("result")
        if name == "smoke" and result:
            head += f"; {result}"
        elif name.startswith("solver") and result:
            x = result[-1]
            head += (f"; {x.get('ms_per_step')} ms/step ({x.get('path')}), {x.get('aten_calls_per_step')} operator "
                     f"calls/step" + (f", {x['kernels_per_step']} kernels/step, {x['kernel_ms_per_step']} kernel "
                                      f"ms/step, {x['host_syncs']} host syncs" if "kernels_per_step" in x else ""))
        elif name in ("round", "cifar") and result:
            head += "; " + "; ".join(f"{x.get('mode')}{' adaptive' if x.get('adaptive_budget') else ''} "
                                     f"{x.get('round_seconds')} s (full budget ~ {x.get('full_budget_estimate')} s) "
                                     f"MA {x.get('main_acc')} BA {x.get('backdoor_acc')}"
                                     for x in result if "round_seconds" in x)
        elif name == "agreement" and result:
            head += f"; max |diff| {result['max_abs_diff']} (tolerance {result['tolerance']}): " \
                    f"{'agree' if result['agree'] else 'DISAGREE'}"
        if step.get("skipped"):
            head = f"{name}: skipped ({step['skipped']})"
        lines.append(head)
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="bundle the data and wheels the device lacks, then stop")
    p.add_argument("--rehearse", action="store_true", help="every step on the CPU, synthetic data, tiny budget")
    p.add_argument("--out", default=".", help="folder for gpu_check.json and gpu_check.txt")
    p.add_argument("--deadline", type=float, default=540, help="seconds for all steps together (default 540)")
    args = p.parse_args(argv)
    if args.prepare:
        return prepare()
    import torch

    if not args.rehearse and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (--rehearse runs the steps on the CPU)")
        return 1
    device = "cpu" if args.rehearse else "cuda"
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLIP_TEST_DEVICE=device)
    install_bundle(env)
    report = {"device": device, "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
              "torch": torch.__version__, "rehearse": args.rehearse, "cpus": os.cpu_count(), "steps": {}}
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for name, cmd, limit, parse in plan(args, device, work):
            left = args.deadline - (time.perf_counter() - start)
            if left < 20:
                report["steps"][name] = {"skipped": f"deadline of {args.deadline:.0f} s reached"}
                continue
            step, out = run_step(cmd, env, min(limit, left))
            if parse is not None:
                try:
                    step["result"] = parse(out)
                except (OSError, ValueError, KeyError, ZeroDivisionError, IndexError) as e:
                    step["result"] = None
                    step["parse_error"] = f"{type(e).__name__}: {e}"
            report["steps"][name] = step
            print(f"{name}: exit {step['exit']} in {step['seconds']} s", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = summary_text(report)
    with open(os.path.join(args.out, "gpu_check.txt"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0 if all(s.get("exit") == 0 for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
