"""Invert a trigger for every ordered class pair (s -> t) of saved global models with FLIP's
kernel and settings (a pair's first inversion: `flip.pair_steps` Adam steps at `flip.init_cost`,
from a random trigger), on the first `--images` test images of each source class. It shows
what FLIP's benign clients can find in a model: how small the trigger toward the attack's target
is beside the other labels', how much of its mask lies within one pixel of the attack's pixels,
and how many of the pairs that involve the target exceed the size cap above which FLIP does not
harden.

    python experiments/trigger_scan.py --params utils/fashion_mnist.yaml \
        experiments/sweeps/fmnist_horizon/cells/continuous__flip/model_last.pt.tar.epoch_240

Prints one line per checkpoint; `--csv FILE` also writes every pair's mask size, its share within
one pixel of the global trigger and the (row, column) of its largest mask value.
"""

import argparse
import csv
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import stack_module_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import helper  # noqa: E402
from config import load_config  # noqa: E402
from image_helper import image_shape, load_arrays, trigger_mask, trigger_pixels  # noqa: E402
from inversion import Invert, invert_batch  # noqa: E402
from models import build_model  # noqa: E402


def pair_requests(test_x, test_y, num_classes, n_images, fp):
    """One single-trigger request per ordered pair (s, t), s != t, on the first ``n_images``
    test images of class s; returns the pairs and the requests."""
    pairs, requests = [], []
    for s in range(num_classes):
        x = test_x[test_y == s][:n_images]
        for t in range(num_classes):
            if t == s:
                continue
            pairs.append((s, t))
            requests.append(Invert(x, torch.full((len(x),), t), torch.zeros(len(x), dtype=torch.long), 1,
                                   fp["pair_steps"], fp["init_cost"], [None], "pair"))
    return pairs, requests


def scan(model, pairs, requests, fp, shape, seed):
    """(mask size, stamped accuracy, success, mask) per pair, each pair's trigger drawn from its
    own generator seeded by (seed, s, t)."""
    template = model.eval()
    params, buffers = stack_module_state([model] * len(requests))
    params = {k: v.detach() for k, v in params.items()}
    generators = [helper.generator("cpu", seed, s, t) for s, t in pairs]
    results = invert_batch(template, params, buffers, requests, fp, shape, generators)
    return [(float(r.sizes[0]), float(r.accuracy[0]), bool(r.success[0]), r.masks[0]) for r in results]


def near(pixels):
    """The boolean (H, W) mask ``pixels`` grown by one pixel in every direction (diagonals too)."""
    return F.max_pool2d(pixels[None, None].float(), 3, stride=1, padding=1)[0, 0].bool()


def share_on(mask, pixels):
    """Share of a mask's L1 that lies on ``pixels`` (boolean, same shape)."""
    return float(mask[pixels].sum()) / max(float(mask.sum()), 1e-12)


def pair_records(pairs, found, near_trigger, width):
    """One record per pair: its trigger's size, stamped accuracy and success, the share of its
    mask's L1 on ``near_trigger`` and the (row, column) of its largest mask value."""
    return [{"source": s, "target": t, "size": size, "accuracy": acc, "success": ok,
             "share_near_trigger": share_on(mask, near_trigger), "peak_pixel": divmod(int(mask.argmax()), width)}
            for (s, t), (size, acc, ok, mask) in zip(pairs, found)]


def summarize(records, target, cap):
    """The numbers of one checkpoint: per target label the median size of the successful triggers
    toward it; for the attack's target the median share of its masks near the trigger and the
    pairs with the target as source or target whose trigger exceeds ``cap`` or was not found."""
    sizes = {}
    for r in records:
        if r["success"]:
            sizes.setdefault(r["target"], []).append(r["size"])
    medians = {t: float(np.median(v)) for t, v in sorted(sizes.items())}
    shares = [r["share_near_trigger"] for r in records if r["target"] == target and r["success"]]
    involving = [r for r in records if target in (r["source"], r["target"])]
    return {"median_size_per_target": medians,
            "target_median_share_near_trigger": float(np.median(shares)) if shares else None,
            "target_pairs_found": len(shares),
            "pairs_with_target_over_cap": sum(1 for r in involving if not r["success"] or r["size"] > cap),
            "pairs_with_target": len(involving)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", required=True, help="the dataset's YAML (test set, triggers, model, flip group)")
    p.add_argument("--images", type=int, default=20, help="test images per source class (default 20)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--csv", help="write every pair's numbers to this file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("checkpoints", nargs="+")
    args = p.parse_args(argv)
    params = load_config(args.params, args.set + ["resumed_model=false"])
    fp = params["flip"]
    _, _, test_x, test_y = load_arrays(params)
    shape, num_classes = image_shape(params)
    near_trigger = near(trigger_mask(trigger_pixels(params, -1), shape[1], shape[2]))
    cap = fp["max_trigger_frac"] * shape[1] * shape[2]
    target = params["poison_label_swap"]
    pairs, requests = pair_requests(test_x, test_y, num_classes, args.images, fp)
    rows = []
    for path in args.checkpoints:
        model = build_model(params["model"], shape, num_classes)
        round_no = helper.load_reference_checkpoint(path, model, "checkpoint")
        records = pair_records(pairs, scan(model, pairs, requests, fp, shape, args.seed), near_trigger, shape[2])
        print(path, round_no, summarize(records, target, cap), flush=True)
        rows += [{"file": path, "round": round_no, **r, "size": round(r["size"], 3), "accuracy": round(r["accuracy"], 4),
                  "share_near_trigger": round(r["share_near_trigger"], 4)} for r in records]
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
