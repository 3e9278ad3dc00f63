"""Run bookkeeping: logging, seeding, timing, checkpoints, the CSV/JSON records and the plot."""

import contextlib
import csv
import json
import logging
import os
import time

import numpy as np
import torch
import yaml

FULL_CHECKPOINT = "checkpoint_full.pt"
# Independent random streams of a round, keyed by (seed, round, stream[, client]).
STREAM_SELECTION, STREAM_CLIENT, STREAM_SERVER = 0, 1, 2


def setup_logging(run_dir, level=logging.INFO):
    """Log to ``run_dir``/log.txt and to the console; returns the root logger."""
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        if getattr(h, "_flip_run", False):
            root.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in (logging.FileHandler(os.path.join(run_dir, "log.txt")), logging.StreamHandler()):
        handler.setFormatter(fmt)
        handler._flip_run = True
        root.addHandler(handler)
    return root


def derived_seed(*keys):
    """A 63-bit seed derived from integers (e.g. seed, round, client): streams that do not
    depend on what ran before, so a resumed run draws the same numbers."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def generator(device, *keys):
    return torch.Generator(device=device).manual_seed(derived_seed(*keys))


class PhaseTimer:
    """Accumulates wall seconds per named phase (synchronising CUDA so that GPU work counts)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, phase):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def save_reference_checkpoint(path, state_dict, epoch, lr):
    """The reference code's checkpoint format: a dict with state_dict, epoch and lr."""
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
                "epoch": epoch, "lr": lr}, path)


def load_reference_checkpoint(path, model):
    """Load a reference-format checkpoint into ``model``; returns its round (epoch)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    model.load_state_dict(state)
    return int(ckpt.get("epoch", 0)) if isinstance(ckpt, dict) else 0


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_params(run_dir, params):
    with open(os.path.join(run_dir, "params.yaml"), "w") as f:
        yaml.safe_dump(params, f, sort_keys=False)


class CsvLog:
    """An append-only CSV with a fixed header. On resume, rows after ``keep_rounds`` are dropped
    so that the file continues exactly where the checkpoint left off."""

    def __init__(self, path, columns, keep_rounds=None):
        self.path, self.columns = path, columns
        if keep_rounds is None or not os.path.exists(path):
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(columns)
            return
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["round"]) <= keep_rounds]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, rows):
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writerows(rows)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_metrics(metrics_path, out_path, title=""):
    """MA and BA (thresholded, and raw dashed) per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(metrics_path)
    if not rows:
        return
    rounds = [int(r["round"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in [("main_acc", "MA", "-"), ("backdoor_acc", "BA", "-"),
                              ("main_acc_raw", "MA raw", "--"), ("backdoor_acc_raw", "BA raw", "--")]:
        ax.plot(rounds, [float(r[key]) for r in rows], style, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def write_summary(run_dir, metrics_path, extra):
    """summary.json: the last round's metrics, peak BA and run facts."""
    rows = read_csv(metrics_path)
    summary = dict(extra)
    if rows:
        last = rows[-1]
        summary["last_round"] = {k: float(v) for k, v in last.items()}
        summary["peak_backdoor_acc"] = max(float(r["backdoor_acc"]) for r in rows)
        summary["peak_backdoor_acc_raw"] = max(float(r["backdoor_acc_raw"]) for r in rows)
        summary["total_seconds"] = round(sum(float(r["seconds"]) for r in rows), 2)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
