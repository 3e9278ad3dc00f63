"""Evaluate saved global models (ours or the authors' code's, same file format) on a dataset's test
set with our model and test code: main accuracy, backdoor accuracy on the global trigger and on
each local trigger, at the YAML's confidence threshold (or --threshold).

    python experiments/evaluate_checkpoints.py --params utils/mnist.yaml \
        saved_models/mnist_pretrain/model_last.pt.tar.epoch_10 /path/to/authors/model_last.pt.tar.epoch_10

Prints one CSV row per checkpoint (file, round, the metric columns of metrics.csv).
"""

import argparse
import csv
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import helper  # noqa: E402
import test  # noqa: E402
from config import load_config  # noqa: E402
from image_helper import load_federated_data, trigger_mask, trigger_name, trigger_pixels  # noqa: E402
from models import build_model  # noqa: E402


def evaluate_checkpoints(params, paths, device="cpu"):
    """[{file, round, metrics...}] for each reference-format checkpoint in ``paths``."""
    data = load_federated_data(params, device)
    _, h, w = data.image_shape
    indices = [-1] + list(range(params["trigger_num"]))
    triggers = {trigger_name(k): trigger_mask(trigger_pixels(params, k), h, w, device) for k in indices}
    rows = []
    for path in paths:
        model = build_model(params["model"], data.image_shape, data.num_classes).to(device)
        round_no = helper.load_reference_checkpoint(path, model, "checkpoint")
        rows.append({"file": path, "round": round_no, **test.evaluate(model.to(device), data, params, triggers)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", required=True, help="the dataset's YAML (test set, triggers, model)")
    p.add_argument("--threshold", type=float, help="confidence threshold (default: the YAML's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("checkpoints", nargs="+")
    args = p.parse_args(argv)
    overrides = args.set + ["resumed_model=false"]
    if args.threshold is not None:
        overrides.append(f"confidence_threshold={args.threshold}")
    torch.manual_seed(0)
    rows = evaluate_checkpoints(load_config(args.params, overrides), args.checkpoints)
    writer = csv.DictWriter(sys.stdout, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
