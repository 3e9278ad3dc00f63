"""Run bookkeeping: logging, seeding, timing, checkpoints, the CSV/JSON records and the plot."""

import contextlib
import csv
import json
import logging
import os
import shutil
import time

import numpy as np
import torch

FULL_CHECKPOINT = "checkpoint_full.pt"
# Independent random streams of a round, keyed by (seed, round, stream[, client]).
STREAM_SELECTION, STREAM_CLIENT, STREAM_SERVER = 0, 1, 2


def close_logging():
    """Detach and close the run's log handlers (its log.txt)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_flip_run", False):
            root.removeHandler(h)
            h.close()


def setup_logging(run_dir, level=logging.INFO):
    """Log to ``run_dir``/log.txt and to the console; returns the root logger."""
    close_logging()
    root = logging.getLogger()
    root.setLevel(level)
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


def use_repeatable_kernels(device):
    """On CUDA, make the same seed give the same bits: cuDNN and PyTorch pick deterministic
    algorithms (an op without one warns) and cuBLAS a fixed workspace. The CPU is left as it is,
    where runs already repeat at a fixed thread count."""
    if torch.device(device).type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the option or key and the file."""


def _read_checkpoint(path, what):
    """torch.load with weights_only=True (tensors and plain Python types only: a checkpoint from
    an untrusted source cannot run code); any failure becomes one CheckpointError line."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: checkpoint '{path}' not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what}: '{path}' is not a readable checkpoint ({type(e).__name__}: "
                              f"{reason[:200]})") from None


def load_reference_checkpoint(path, model, what="resumed_model_name"):
    """Load a reference-format checkpoint into ``model``; returns its round (epoch)."""
    ckpt = _read_checkpoint(path, what)
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what}: '{path}' holds no model state_dict")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{name} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for name, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("wrong shape", wrong)) if keys)
        raise CheckpointError(f"{what}: '{path}' does not fit model '{type(model).__name__}' ({detail}); "
                              "check `model` and `type` in the YAML")
    require_finite(state, path, what)
    model.load_state_dict(state)
    return checkpoint_epoch(ckpt)


def require_finite(state, path, what):
    """A model state with a NaN or infinite float value cannot start a run: CheckpointError
    naming the file and the first such key."""
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{what}: '{path}' has non-finite values in '{key}'")


def reference_checkpoint_round(path, what="resumed_model_name"):
    """The round (epoch) a reference-format checkpoint was saved after."""
    return checkpoint_epoch(_read_checkpoint(path, what))


def checkpoint_epoch(ckpt):
    """The `epoch` of a loaded reference-format checkpoint (0 for a bare state_dict)."""
    return int(ckpt.get("epoch", 0)) if isinstance(ckpt, dict) else 0


def to_plain(obj):
    """Numpy arrays (recursively inside dicts, lists and tuples) as tagged tensors, so that the
    object loads with torch.load(weights_only=True); ``from_plain`` undoes it."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(obj.copy())}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def from_plain(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_plain(v) for v in obj)
    return obj


def previous_checkpoint(path):
    return path[:-len(".pt")] + ".prev.pt"


def save_full_checkpoint(obj, path):
    """Write the resume checkpoint atomically, keeping the one it replaces as ``*.prev.pt``.
    ``path`` holds a whole checkpoint at every moment: the new one is written aside first and the
    old one is linked (or copied) to ``*.prev.pt``, so a process killed at any point leaves a
    checkpoint to resume from."""
    tmp = path + ".tmp"
    torch.save(to_plain(obj), tmp)
    if os.path.exists(path):
        prev = previous_checkpoint(path)
        staged = prev + ".tmp"
        if os.path.exists(staged):
            os.remove(staged)
        try:
            os.link(path, staged)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(path, staged)
        os.replace(staged, prev)
    os.replace(tmp, path)


def load_full_checkpoint(path):
    """The resume checkpoint; a corrupt one raises a CheckpointError that says how to fall back
    to the previous round's."""
    try:
        ckpt = from_plain(_read_checkpoint(path, "--resume"))
    except CheckpointError as e:
        raise CheckpointError(f"{e}{previous_checkpoint_hint(path)}") from None
    require_finite(ckpt.get("global_state", {}), path, "--resume")
    return ckpt


def previous_checkpoint_hint(path):
    """What to do when the resume checkpoint ``path`` does not read: use the previous round's
    only if that one reads."""
    prev = previous_checkpoint(path)
    if not os.path.isfile(prev):
        return "; there is no previous round's checkpoint to fall back to: start the run again"
    try:
        _read_checkpoint(prev, "--resume")
    except CheckpointError:
        return f"; the previous round's '{prev}' does not read either: start the run again"
    return f"; the previous round's is '{prev}': move it to '{path}' to resume from there"


class CsvLog:
    """An append-only CSV with a fixed header. On resume, rows after ``keep_rounds`` are dropped
    so that the file continues exactly where the checkpoint left off; the file keeps its header,
    with any new column added at the end."""

    def __init__(self, path, columns, keep_rounds=None):
        self.path, self.columns = path, columns
        if keep_rounds is None or not os.path.exists(path):
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(columns)
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if int(r["round"]) <= keep_rounds]
            header = list(reader.fieldnames or [])
        self.columns = header + [c for c in columns if c not in header]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
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


def detection_rates(counts, digits=4):
    """TPR = attackers rejected / attackers selected and FPR = benign clients rejected / benign
    clients selected, rounded to ``digits`` decimals (None: not rounded); None where nothing was
    selected. The one place the rates are computed: for a round (train.py), a run (summary.json)
    and a sweep's report."""
    def rate(rejected, selected):
        if not counts[selected]:
            return None
        value = counts[rejected] / counts[selected]
        return value if digits is None else round(value, digits)
    return {"tpr": rate("attackers_rejected", "attackers_selected"), "fpr": rate("benign_rejected", "benign_selected")}


def detection_totals(rows, digits=4):
    """The run's detection counts summed over rounds, with TPR and FPR."""
    totals = {k: sum(int(r.get(k) or 0) for r in rows)
              for k in ("attackers_selected", "attackers_rejected", "benign_selected", "benign_rejected")}
    return {**totals, **detection_rates(totals, digits)}


def write_summary(run_dir, metrics_path, extra):
    """summary.json: the last round's metrics, peak BA and run facts."""
    rows = read_csv(metrics_path)
    summary = dict(extra)
    if rows:
        last = rows[-1]
        summary["last_round"] = {k: float(v) if v != "" else None for k, v in last.items()}
        summary["peak_backdoor_acc"] = max(float(r["backdoor_acc"]) for r in rows)
        summary["peak_backdoor_acc_raw"] = max(float(r["backdoor_acc_raw"]) for r in rows)
        summary["total_seconds"] = round(sum(float(r["seconds"]) for r in rows), 2)
        summary["detection"] = detection_totals(rows)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
