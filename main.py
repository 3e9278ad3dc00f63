"""Command line entry point: `python main.py --params utils/fashion_mnist.yaml`."""

import argparse
import datetime
import logging
import os
import shutil
import signal
import sys

import torch

import helper
import run_folder
from config import (ConfigError, apply_overrides, drop_spelled_out_schedule, load_config, load_raw,
                    pretrain_rounds, resolve)
from image_helper import DataError

logger = logging.getLogger("main")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Federated backdoor simulation: DBA attacks, FedAvg/FLAME/robust rules, FLIP.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python main.py --params utils/fashion_mnist.yaml --set invert=false --set epochs=203 "
               "--run-dir runs/quickstart\n"
               "      three no-defense rounds with the first single-shot attack: about a minute on a CPU\n"
               "  python main.py --params utils/fashion_mnist.yaml\n"
               "      FLIP against single-shot DBA, rounds 201-300: minutes a round on a CPU\n"
               "  python main.py --resume runs/quickstart --set epochs=205\n"
               "      continue (or extend) a run from its last completed round\n"
               "see README.md for every option and docs/algorithms.md for what runs")
    p.add_argument("--params", help="experiment YAML, e.g. utils/fashion_mnist.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (value parsed as YAML); repeatable")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--run-dir", help="output folder (default: runs/<type>_<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--no-pretrain", action="store_true",
                   help="stop with an error when resumed_model_name does not exist, instead of training it")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: all cores); 1 leaves the other cores to other work")
    args = p.parse_args(argv)
    if bool(args.params) == bool(args.resume):
        p.error("give exactly one of --params or --resume")
    if args.threads is not None and args.threads < 1:
        p.error("--threads: must be >= 1")
    return args


def load_params(args):
    """Resolved params and the run folder, for a new run or a resumed one."""
    if args.resume:
        raw = load_raw(os.path.join(args.resume, "params.yaml"))
        drop_spelled_out_schedule(raw)
        return resolve(apply_overrides(raw, args.set)), args.resume
    params = load_config(args.params, args.set + (["pretrain=false"] if args.no_pretrain else []))
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    return params, args.run_dir or os.path.join("runs", f"{params['type']}_{stamp}")


def check_rounds(params):
    """A new run must have a round to run: its last round (`epochs`) after its start model's."""
    if not params["resumed_model"]:
        return
    path = params["resumed_model_name"]
    start = helper.reference_checkpoint_round(path) if os.path.isfile(path) else pretrain_rounds(params)
    if params["epochs"] <= start:
        raise ConfigError(f"epochs: the last round ({params['epochs']}) is not after the start model's round "
                          f"({start}, '{path}'): no round to run")


def finished_round(run_dir, params):
    """The last round of a resumable run when it has reached `epochs` already, else None."""
    last = helper.load_full_checkpoint(os.path.join(run_dir, helper.FULL_CHECKPOINT))["round"]
    return last if last >= params["epochs"] else None


# The exit code of a run stopped on request before its last round: resumable, not finished.
STOPPED = 3


class StopRequest:
    """While held, SIGUSR1 asks the run to stop after the round in progress, once that round's
    resume checkpoint is written: `kill -USR1 <pid>`, or a batch scheduler's warning signal
    (Slurm: `--signal=USR1@600`), ends a run without losing the round it is in."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def _request(self, signum, frame):
        self.requested = True
        logging.getLogger("main").info("SIGUSR1: stopping after the round in progress")

    def __enter__(self):
        if hasattr(signal, "SIGUSR1"):
            self.previous = signal.signal(signal.SIGUSR1, self._request)
        return self

    def __exit__(self, *exc):
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, self.previous)


def has_rounds(run_dir):
    path = os.path.join(run_dir, "metrics.csv")
    return os.path.isfile(path) and len(helper.read_csv(path)) > 0


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params, run_dir = load_params(args)
        if not args.resume:
            check_rounds(params)
    except (ConfigError, helper.CheckpointError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.resume and not os.path.isfile(os.path.join(run_dir, helper.FULL_CHECKPOINT)):
        print(f"--resume: no {helper.FULL_CHECKPOINT} in '{run_dir}'", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    try:
        created = run_folder.usable_folder(run_dir, "--resume" if args.resume else "--run-dir")
        lock = run_folder.FolderLock(run_dir).acquire()
    except run_folder.RunFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code = None  # an exception (Ctrl-C, a crash) keeps the folder and its log
    try:
        code = run_in_folder(args, params, run_dir, device)
        return code
    finally:
        lock.release()
        if code and created and not has_rounds(run_dir):
            helper.close_logging()
            shutil.rmtree(run_dir, ignore_errors=True)


def run_in_folder(args, params, run_dir, device):
    """The run itself, with its folder held; returns the exit code."""
    import train

    if args.resume:
        try:
            last = finished_round(run_dir, params)
        except helper.CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if last is not None:
            print(f"the run in '{run_dir}' is finished: it ran to round {last} (epochs: {params['epochs']}); "
                  "give --set epochs=<later round> to extend it")
            return 0
    logging.getLogger().handlers.clear()
    helper.setup_logging(run_dir)
    logger.info("run folder %s on %s (%d CPU threads)", run_dir, device, torch.get_num_threads())
    try:
        with StopRequest() as stop:
            summary = train.run(params, run_dir, device, resume=bool(args.resume),
                                stop_requested=lambda: stop.requested)
    except DataError as e:
        logger.error("%s", e)
        return 1
    except (helper.CheckpointError, run_folder.RunFolderError) as e:
        logger.error("%s", e)
        return 2
    if summary is None:
        return STOPPED
    logger.info("done: %s", {k: summary[k] for k in ("peak_backdoor_acc", "total_seconds") if k in summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
