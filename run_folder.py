"""A run folder's integrity and provenance: one process at a time (an OS lock), checked before
anything is written, and a record of which code ran which rounds.

The lock is ``flock`` on ``<folder>/.lock``: the OS releases it when the process ends, however it
ends, so a killed run never leaves a stale lock; the file keeps the holder's process id for the
message a second process prints.
"""

import csv
import os
import platform
import subprocess
import time

import torch
import yaml

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not locked
    fcntl = None

LOCK_FILE = ".lock"
SEGMENT_COLUMNS = ["started", "first_round", "last_round", "commit", "dirty", "torch", "device", "threads", "cpu",
                   "gpu"]
# the segment columns a run repeats bit for bit only where they agree
REPEATABILITY_COLUMNS = ("threads", "torch", "device", "cpu", "gpu")


class RunFolderError(RuntimeError):
    """A run folder that cannot be used; the message is one line naming the folder."""


def usable_folder(path, what):
    """Make ``path`` a folder (with its parents) or raise a RunFolderError that says why it
    cannot be one; returns True when this call created it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunFolderError(f"{what}: '{path}' is a file, not a folder")
    created = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"{what}: cannot make folder '{path}' ({e.strerror or type(e).__name__})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunFolderError(f"{what}: folder '{path}' is not writable")
    return created


class FolderLock:
    """Hold ``<folder>/.lock`` for the life of a run: ``acquire`` raises a RunFolderError naming
    the process that holds it; ``release`` (or the process's end) lets it go."""

    def __init__(self, folder, what="run folder"):
        self.folder, self.what, self.fd = folder, what, None

    def acquire(self):
        if fcntl is None:
            return self
        path = os.path.join(self.folder, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"{self.what} '{self.folder}': cannot open its lock file "
                                 f"({e.strerror or type(e).__name__})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"{self.what} '{self.folder}' is in use by {holder}; wait for it to end "
                                 "or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# Tracked records of runs, not code: a run in progress changes them without changing the code.
RECORD_FOLDERS = ("experiments/results", "experiments/sweeps", "saved_models")


def code_version():
    """The commit of the code that runs and whether its tracked files other than run records
    (``RECORD_FOLDERS``) differ from it ("unknown" outside a git checkout)."""
    root = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     *(f":(exclude){folder}" for folder in RECORD_FOLDERS))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": ""}
    if head.returncode != 0:
        return {"commit": "unknown", "dirty": ""}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def describe_code(code):
    return f"commit {code['commit']}" + (" with uncommitted changes" if code["dirty"] else "")


def cpu_description():
    """The CPU's model name as the OS reports it and the instruction set torch's kernels use on it
    (e.g. "AVX512"): the same seed gives the same numbers only on CPUs that agree on both."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    model = model or platform.processor() or "unknown CPU"
    return f"{model}, torch {torch.backends.cpu.get_cpu_capability()}"


def gpu_description(device):
    return torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else ""


def record_segment(run_dir, first_round, last_round, device):
    """Add to segments.csv a row saying which code and hardware run rounds
    ``first_round``..``last_round`` of this run (a row per start or resume); returns every row,
    this one last. The file is rewritten aside and swapped in, so that rows of a file written
    before a column existed gain it, left blank."""
    row = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "first_round": first_round, "last_round": last_round,
           **code_version(), "torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
           "cpu": cpu_description(), "gpu": gpu_description(device)}
    rows = read_segments(run_dir) + [row]
    path = os.path.join(run_dir, "segments.csv")
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, SEGMENT_COLUMNS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)
    return rows


def repeatability_changes(segments):
    """What the last segment runs on that the one before did not, among the settings a run repeats
    bit for bit only where they agree: the CPU thread count (matrix products and convolution
    gradients split their sums by thread), the torch build, the device, the CPU and the GPU.
    Returns "name: before -> now" strings; a value the earlier row left blank (not recorded
    then) is not compared."""
    if len(segments) < 2:
        return []
    before, now = segments[-2], segments[-1]
    return [f"{name}: {before[name]} -> {now.get(name, '')}" for name in REPEATABILITY_COLUMNS
            if before.get(name) not in (None, "") and str(before[name]) != str(now.get(name, ""))]


def read_segments(run_dir):
    path = os.path.join(run_dir, "segments.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_params(run_dir, params):
    """params.yaml: the resolved configuration, headed by a comment naming the code that wrote it."""
    with open(os.path.join(run_dir, "params.yaml"), "w") as f:
        f.write(f"# written by {describe_code(code_version())}\n")
        yaml.safe_dump(params, f, sort_keys=False)
