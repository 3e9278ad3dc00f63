"""Run a grid of experiments (datasets × attacks × defenses × seeds × ...) as Ray tasks, on this
machine or on a Ray cluster, and gather their results.

    python experiments/sweep.py experiments/grids/fmnist_defenses.yaml             # local Ray
    python experiments/sweep.py GRID --address ray-head:6379                         # a cluster
    python experiments/sweep.py GRID --report                                        # tables only
    python experiments/sweep.py GRID --only _defense=none,flame --cpus 1             # some cells, one core

A grid file (YAML):

    params: utils/fashion_mnist.yaml      # the base experiment
    out: experiments/sweeps/fmnist        # the sweep folder: one run folder per cell in cells/
    fixed: {invert: false, epochs: 218}   # overrides for every cell (any config key)
    axes:                                 # every combination of these values
      attack_mode: [single_shot, continuous]
      aggregation_methods: [mean, flame]
      seed: [1, 2, 3]
    cells: []                             # or (also) explicit cells: a list of {key: value}
                                          # (a key starting with _ is a label: not passed to main.py,
                                          # it only selects `when` overrides, e.g. _defense: flip)
    when:                                 # extra overrides a value brings with it
      attack_mode:
        continuous: {0_poison_epochs: null, 1_poison_epochs: null, 2_poison_epochs: null, 3_poison_epochs: null}
    resources: {cpus: 1, gpus: 0}         # per cell: CPU threads, GPU fraction (0.25: four share a GPU)

Each cell is an ordinary `main.py` run in `<out>/cells/<cell>/`. Running the same command again
continues the sweep: finished cells are skipped, a cell with a resume checkpoint continues from
it, a failed cell is reported with its error and does not stop the others. Ctrl-C (or SIGTERM)
stops every cell (each keeps its last checkpoint); SIGUSR1 to a cell's main.py
(`pkill -USR1 -f "main.py.*<out>/cells"`) stops it after its round in progress (the sweep then
exits 3). `<out>/sweep.log` has the progress; `results.csv` (a row per cell and round) and
`report.md` (mean ± std over seeds) are written at the end.
"""

import argparse
import ctypes
import csv
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import helper  # noqa: E402
from main import STOPPED  # noqa: E402
logger = logging.getLogger("sweep")


class GridError(ValueError):
    """A grid file that cannot be used; the message names the key."""


def load_grid(path):
    if not os.path.isfile(path):
        raise GridError(f"grid file '{path}' not found")
    with open(path) as f:
        grid = yaml.safe_load(f) or {}
    unknown = set(grid) - {"params", "out", "fixed", "axes", "cells", "when", "resources"}
    if unknown:
        raise GridError(f"unknown key(s) in {path}: {', '.join(sorted(unknown))}")
    for key in ("params", "out"):
        if not isinstance(grid.get(key), str):
            raise GridError(f"{path}: '{key}' must name a file or folder")
    for key in ("fixed", "axes", "when", "resources"):
        if not isinstance(grid.setdefault(key, {}), dict):
            raise GridError(f"{path}: '{key}' must be a mapping")
    if not isinstance(grid.setdefault("cells", []), list):
        raise GridError(f"{path}: 'cells' must be a list of mappings")
    for key, values in grid["axes"].items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{path}: axis '{key}' must be a non-empty list")
    grid["out"] = os.path.abspath(grid["out"])
    if not os.path.isabs(grid["params"]) and os.path.isfile(grid["params"]):
        grid["params"] = os.path.abspath(grid["params"])
    return grid


def expand(grid):
    """The cells: {key: value} of the axes' combinations, then the explicit cells."""
    keys = list(grid["axes"])
    cells = [dict(zip(keys, combo)) for combo in itertools.product(*(grid["axes"][k] for k in keys))] if keys else []
    return cells + [dict(c) for c in grid["cells"]]


def cell_name(cell):
    """A folder name from a cell's values: `attack_mode=continuous,seed=2` -> continuous__seed-2."""
    parts = []
    for key, value in cell.items():
        text = str(value).replace("/", "-").replace(" ", "")
        named = key.startswith("_") or key in ("attack_mode", "aggregation_methods", "type")
        parts.append(text if named else f"{key}-{text}")
    return "__".join(parts) or "base"


def overrides(grid, cell):
    """The `--set` list of a cell: fixed, then what each value brings (`when`), then the cell's."""
    out = dict(grid["fixed"])
    for key, value in cell.items():
        out.update((grid["when"].get(key) or {}).get(value) or {})
    out.update(cell)
    return [f"{k}={json.dumps(v)}" for k, v in out.items() if not k.startswith("_")]


def setting(grid, cell, key, default=None):
    """A config key as the cell's run gets it: the cell's own value, else the grid's fixed one,
    else the base YAML's (``default`` when none has it)."""
    for source in (cell, grid["fixed"]):
        if key in source:
            return source[key]
    with open(os.path.join(ROOT, grid["params"])) as f:
        return (yaml.safe_load(f) or {}).get(key, default)


def last_epoch(grid, cell):
    """The cell's last round: its `epochs` override, else the base YAML's."""
    return int(setting(grid, cell, "epochs", 300))


def rounds_done(run_dir):
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return max((int(r["round"]) for r in csv.DictReader(f)), default=0)


def cell_command(grid, cell, run_dir, threads):
    """main.py for a new cell, or --resume for one with a checkpoint."""
    sets = sum((["--set", s] for s in overrides(grid, cell)), [])
    if os.path.isfile(os.path.join(run_dir, "checkpoint_full.pt")):
        return [sys.executable, "main.py", "--resume", run_dir, "--set", f"epochs={last_epoch(grid, cell)}",
                "--threads", str(threads)]
    return [sys.executable, "main.py", "--params", grid["params"], "--run-dir", run_dir, *sets, "--threads", str(threads)]


def _die_with_parent():
    """In the child: get SIGTERM when the Ray worker that started it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
    except OSError:
        pass


def run_cell(command, run_dir):
    """Run one cell's main.py; returns (exit code, its last error line, seconds). Its output goes
    to `<run_dir>.out`."""
    start = time.time()
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    with open(run_dir + ".out", "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.call(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    error = ""
    if code != 0:
        with open(run_dir + ".out") as f:
            lines = [line.strip() for line in f if line.strip()]
        error = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
    return code, error, round(time.time() - start, 1)


def parse_only(grid, specs):
    """`--only KEY=V1,V2` (repeatable) -> {KEY: {"V1", "V2"}}; the key must be one of the grid's."""
    known = list(dict.fromkeys(list(grid["axes"]) + [k for c in grid["cells"] for k in c]))
    only = {}
    for spec in specs or []:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise GridError(f"--only {spec}: expected KEY=VALUE[,VALUE...]")
        if key not in known:
            raise GridError(f"--only {spec}: '{key}' is not a key of the grid's cells ({', '.join(known)})")
        only.setdefault(key, set()).update(values.split(","))
    return only


def selected(cell, only):
    """Whether a cell has, for every key of `only`, one of its values."""
    return all(key in cell and str(cell[key]) in values for key, values in only.items())


def plan(grid):
    """[(name, cell, run folder, finished)] for every cell of the grid."""
    out = []
    for cell in expand(grid):
        name = cell_name(cell)
        run_dir = os.path.join(grid["out"], "cells", name)
        out.append((name, cell, run_dir, rounds_done(run_dir) >= last_epoch(grid, cell)
                    and os.path.isfile(os.path.join(run_dir, "summary.json"))))
    names = [p[0] for p in out]
    if len(set(names)) != len(names):
        raise GridError("two cells have the same values: " + ", ".join(sorted({n for n in names if names.count(n) > 1})))
    return out


def progress_line(done, running, failed, left, durations, slots, stopped=0):
    eta = ""
    if durations and (running or left):
        eta = f", about {sum(durations) / len(durations) * (running + left) / max(slots, 1):.0f} s left"
    return (f"cells: {done} done, {running} running, {failed} failed, "
            f"{f'{stopped} stopped, ' if stopped else ''}{left} waiting{eta}")


def run_sweep(grid, address=None, only=None, max_cpus=None):
    """Run the grid's unfinished cells (those `only` selects) as Ray tasks, on at most `max_cpus` CPUs of
    this machine (default: all); returns {name: (code, error, seconds)}."""
    import ray

    cells = [p for p in plan(grid) if selected(p[1], only or {})]
    todo = [(n, c, d) for n, c, d, finished in cells if not finished]
    logger.info("%d cells%s, %d finished already, %d to run", len(cells), " selected" if only else "",
                len(cells) - len(todo), len(todo))
    outcome = {}
    for name, cell, run_dir in list(todo):
        if rounds_done(run_dir) and not os.path.isfile(os.path.join(run_dir, "checkpoint_full.pt")):
            outcome[name] = (2, f"{run_dir} has rounds up to {rounds_done(run_dir)} but no resume checkpoint: "
                                "move the folder away to run the cell again", 0.0)
            logger.error("cell %s not run: %s", name, outcome[name][1])
            todo.remove((name, cell, run_dir))
    if not todo:
        return outcome
    res = grid["resources"]
    cpus, gpus = int(res.get("cpus", 1)), float(res.get("gpus", 0))
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             **({} if address else {"num_cpus": max_cpus or os.cpu_count()}))
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # ray.init installed its own
    task = ray.remote(run_cell).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
    folders = {n: d for n, c, d in todo}
    refs = {task.remote(cell_command(grid, c, d, cpus), os.path.abspath(d)): n for n, c, d in todo}
    durations, last_report = [], 0.0
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=10)
            for ref in ready:
                name = refs.pop(ref)
                outcome[name] = ray.get(ref)
                code, error, seconds = outcome[name]
                if code == STOPPED:  # a part of a cell's time: not a duration for the estimate
                    logger.warning("cell %s stopped on request after round %d; run the same command to continue",
                                   name, rounds_done(folders[name]))
                    continue
                durations.append(seconds)
                if code == 0:
                    logger.info("cell %s done in %.0f s", name, seconds)
                else:
                    logger.error("cell %s failed (exit %s): %s", name, code, error)
            if ready or time.time() - last_report > 60:
                stopped = sum(1 for c, _, _ in outcome.values() if c == STOPPED)
                failed = sum(1 for c, _, _ in outcome.values() if c not in (0, STOPPED))
                running = min(len(refs), slots)
                logger.info(progress_line(len(outcome) - failed - stopped, running, failed, len(refs) - running,
                                          durations, slots, stopped))
                last_report = time.time()
    except KeyboardInterrupt:
        logger.warning("interrupted: stopping %d cell(s); each keeps its last checkpoint, run the same "
                       "command to continue", len(refs))
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.shutdown()
    return outcome


def gather(grid):
    """Rows of results.csv: the cell's values, then each round's metrics."""
    rows = []
    for name, cell, run_dir, _ in plan(grid):
        path = os.path.join(run_dir, "metrics.csv")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            for r in csv.DictReader(f):
                rows.append({"cell": name, **{k: str(v) for k, v in cell.items()}, **r})
    return rows


def write_results(grid, rows):
    if not rows:
        return None
    columns = list(dict.fromkeys(k for r in rows for k in r))
    path = os.path.join(grid["out"], "results.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def mean_std(values):
    """Mean and sample standard deviation (n − 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std


def summarize(grid, rows, over="seed"):
    """Per group of cells that differ only in ``over``: mean ± std of the last round's MA and BA,
    peak BA, the detection totals (TPR, FPR) and wall time, with the per-seed values."""
    keys = [k for k in list(grid["axes"]) + [k for c in grid["cells"] for k in c] if k != over]
    keys = list(dict.fromkeys(keys))
    by_cell = {}
    for r in rows:
        by_cell.setdefault(r["cell"], []).append(r)
    groups = {}
    for cell_rows in by_cell.values():
        first, last = cell_rows[0], cell_rows[-1]
        group = tuple(first.get(k, "") for k in keys)
        detection = helper.detection_totals(cell_rows, digits=None)
        groups.setdefault(group, []).append({
            over: first.get(over, ""), "MA": float(last["main_acc"]), "BA": float(last["backdoor_acc"]),
            "peak BA": max(float(r["backdoor_acc"]) for r in cell_rows),
            "TPR": detection["tpr"], "FPR": detection["fpr"],
            "seconds": sum(float(r["seconds"]) for r in cell_rows)})
    return keys, groups


def report(grid, rows, over="seed"):
    """report.md: one table row per group, each metric as mean ± std (and the per-seed values)."""
    keys, groups = summarize(grid, rows, over)
    metrics = ["MA", "BA", "peak BA", "TPR", "FPR", "seconds"]
    lines = ["| " + " | ".join(keys + [f"{over}s"] + metrics) + " |", "|" + "---|" * (len(keys) + 1 + len(metrics))]
    for group, runs in sorted(groups.items()):
        cells = []
        for m in metrics:
            values = [r[m] for r in runs if r[m] is not None]
            if not values:
                cells.append("")
                continue
            mean, std = mean_std(values)
            scale = 100 if m in ("TPR", "FPR") else 1
            per = ", ".join(f"{v * scale:.2f}" for v in values)
            cells.append(f"{mean * scale:.2f} ± {std * scale:.2f} ({per})" if len(values) > 1 else f"{mean * scale:.2f}")
        lines.append("| " + " | ".join(list(group) + [",".join(str(r[over]) for r in runs)] + cells) + " |")
    return "\n".join(lines) + "\n"


def plot(grid, rows, path, over="seed"):
    """BA per round, one line per group (the mean over seeds) with a band of ± one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in grid["axes"] if k != over]
    series = {}
    for r in rows:
        group = " ".join(str(r.get(k, "")) for k in keys) or "all"
        series.setdefault(group, {}).setdefault(int(r["round"]), []).append(float(r["backdoor_acc"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for group, by_round in sorted(series.items()):
        rounds = sorted(by_round)
        stats = [mean_std(by_round[t]) for t in rounds]
        means = [m for m, _ in stats]
        ax.plot(rounds, means, label=group)
        ax.fill_between(rounds, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("BA (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(grid):
    rows = gather(grid)
    if not rows:
        logger.info("no results yet")
        return
    logger.info("wrote %s", write_results(grid, rows))
    text = report(grid, rows)
    with open(os.path.join(grid["out"], "report.md"), "w") as f:
        f.write(text)
    plot(grid, rows, os.path.join(grid["out"], "ba_rounds.png"))
    logger.info("wrote %s and ba_rounds.png:\n%s", os.path.join(grid["out"], "report.md"), text)


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    # Ctrl-C, and SIGTERM as a job scheduler sends it, stop the cells (also when started in the
    # background, where SIGINT is ignored by default)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="the grid file (YAML)")
    p.add_argument("--address", help="join this Ray cluster (default: start Ray on this machine)")
    p.add_argument("--report", action="store_true", help="only gather the results and write the report")
    p.add_argument("--only", action="append", metavar="KEY=V1,V2",
                   help="run only the cells with one of these values of KEY (repeatable: all must hold); "
                        "the report still covers every cell")
    p.add_argument("--cpus", type=int, help="use at most this many CPUs of this machine (default: all)")
    args = p.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        if args.cpus is not None and (args.cpus < 1 or args.address):
            raise GridError("--cpus must be at least 1, and is for this machine (not with --address)")
        only = parse_only(grid, args.only)
        os.makedirs(os.path.join(grid["out"], "cells"), exist_ok=True)
        if not any(selected(c, only) for c in expand(grid)):
            raise GridError("--only " + " ".join(args.only) + " selects no cell of the grid")
        plan(grid)
    except (GridError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(os.path.join(grid["out"], "sweep.log"))])
    outcome = {} if args.report else run_sweep(grid, args.address, only, args.cpus)
    finish(grid)
    failed = {n: o for n, o in outcome.items() if o[0] not in (0, STOPPED)}
    for name, (code, error, _) in failed.items():
        logger.error("failed: %s (exit %s): %s", name, code, error)
    stopped = [n for n, o in outcome.items() if o[0] == STOPPED]
    if stopped:
        logger.warning("stopped on request, resumable: %s", ", ".join(stopped))
    return 1 if failed else STOPPED if stopped else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
