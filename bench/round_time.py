"""Seconds per FLIP round, by phase, with peak memory (real Fashion-MNIST by default).

    python bench/round_time.py                     # batched executor, config defaults
    python bench/round_time.py --sequential        # one client after the other
    python bench/round_time.py --compare           # both, and how far their results differ
    python bench/round_time.py --adaptive          # the reference budget, then flip.adaptive_budget
    python bench/round_time.py --params utils/cifar.yaml --synthetic --clients 1 --budget-scale 0.1

The round is the first round after the YAML's resumed model (or round 1 without one), with no
attacker, so all `no_models` clients are benign and chosen for the first time: warm-up runs.
`--synthetic` replaces the dataset by synthetic images of its real shape and training-set size
(for CIFAR-10 and MNIST, which cannot be downloaded everywhere), from a fresh model.
`--budget-scale F` multiplies every inversion's step count by F (a CPU cannot run a CIFAR-10
round at the full budget in reasonable time); the JSON line then also gives `full_budget_estimate`,
the round's seconds with the inversion time divided by F (inversion time is linear in steps).
Each JSON line has the round's inversions by kind (`profile`): count, mean images, mean steps
asked and run, the mean step of the best trigger's last improvement, and the share of the steps
run after it.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config  # noqa: E402
import invert  # noqa: E402
import train  # noqa: E402


TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "cifar": 50000}
STEP_KEYS = ["warmup_steps", "pair_steps", "refine_steps", "retry_steps", "single_refine_steps", "single_retry_steps"]


def one_round(params, device):
    with tempfile.TemporaryDirectory() as run_dir:
        fed = train.Federation(params, run_dir, device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        row, clients = fed.run_round(fed.first_round)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    out = {"round_seconds": round(seconds, 2),
           "phases": {k: round(v, 2) for k, v in fed.timer.seconds.items()},
           "clients": len(clients), "flip_inversions": row["flip_inversions"],
           "main_acc": row["main_acc"], "backdoor_acc": row["backdoor_acc"],
           "flip_hardened": row["flip_hardened"], "profile": invert.profile_round(fed.last_defense_stats), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if device == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
    return out, fed.global_state


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="utils/fashion_mnist.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sequential", action="store_true", help="run clients one after the other")
    p.add_argument("--compare", action="store_true", help="run batched and sequential, compare results")
    p.add_argument("--clients", type=int, help="benign clients in the round (default: no_models)")
    p.add_argument("--synthetic", action="store_true", help="synthetic data of the dataset's real shape and size")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every inversion's steps by this")
    p.add_argument("--adaptive", action="store_true",
                   help="run the reference budget and the adaptive budget (flip.adaptive_budget) on the same round")
    args = p.parse_args()
    overrides = ["invert=true", "is_poison=false"]
    if args.clients:
        overrides.append(f"no_models={args.clients}")
    if args.synthetic:
        dataset = config.load_raw(args.params)["type"]
        shape, _ = config.DATASET_SHAPES[dataset]
        overrides += ["type=synthetic", f"synthetic_shape={list(shape)}", f"model={config.DEFAULT_MODEL[dataset]}",
                      f"synthetic_train_size={TRAIN_SIZES[dataset]}", "resumed_model=false"]
    params = config.load_config(args.params, overrides + args.set)
    for key in STEP_KEYS:
        params["flip"][key] = max(1, round(params["flip"][key] * args.budget_scale))
    if params["resumed_model"] and not os.path.isfile(params["resumed_model_name"]):
        params["resumed_model"] = False
    if args.compare:
        modes = [("batched", {"batched": True}), ("sequential", {"batched": False})]
    else:
        modes = [("batched" if not args.sequential else "sequential", {"batched": not args.sequential})]
    if args.adaptive:
        modes = [(name, {**flags, "adaptive_budget": adaptive}) for name, flags in modes for adaptive in (False, True)]
    states = {}
    for name, flags in modes:
        run_params = {**params, "flip": {**params["flip"], **flags}}
        result, states[name, flags.get("adaptive_budget", False)] = one_round(run_params, args.device)
        result.update(mode=name, adaptive_budget=run_params["flip"]["adaptive_budget"], device=args.device,
                      threads=torch.get_num_threads(), cpu=os.cpu_count(), dataset=args.params,
                      synthetic=args.synthetic, budget_scale=args.budget_scale)
        if args.budget_scale != 1.0:
            inversion = result["phases"].get("inversion", 0.0)
            result["full_budget_estimate"] = round(result["round_seconds"] + inversion * (1 / args.budget_scale - 1), 1)
        print(json.dumps(result))
    if args.compare:
        a, b = states["batched", False], states["sequential", False]
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        print(json.dumps({"max_abs_difference_batched_vs_sequential": diff}))


if __name__ == "__main__":
    main()
