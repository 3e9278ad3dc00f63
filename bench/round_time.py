"""Seconds per FLIP round on real Fashion-MNIST, by phase, with peak memory.

    python bench/round_time.py                     # batched executor, config defaults
    python bench/round_time.py --sequential        # one client after the other
    python bench/round_time.py --compare           # both, and how far their results differ

The round is the first round after the YAML's resumed model (or round 1 without one), with no
attacker, so all `no_models` clients are benign and chosen for the first time: warm-up runs.
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
import train  # noqa: E402


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
           "main_acc": row["main_acc"], "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
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
    args = p.parse_args()
    overrides = ["invert=true", "is_poison=false"] + args.set
    params = config.load_config(args.params, overrides)
    if params["resumed_model"] and not os.path.isfile(params["resumed_model_name"]):
        params["resumed_model"] = False
    modes = [True, False] if args.compare else [not args.sequential]
    states = {}
    for batched in modes:
        run_params = {**params, "flip": {**params["flip"], "batched": batched}}
        result, states[batched] = one_round(run_params, args.device)
        result.update(mode="batched" if batched else "sequential", device=args.device,
                      threads=torch.get_num_threads(), cpu=os.cpu_count())
        print(json.dumps(result))
    if args.compare:
        diff = max(float((states[True][k].float() - states[False][k].float()).abs().max()) for k in states[True])
        print(json.dumps({"max_abs_difference_batched_vs_sequential": diff}))


if __name__ == "__main__":
    main()
